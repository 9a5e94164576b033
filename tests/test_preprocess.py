"""edge_agent.preprocess: resize modes (stretch, letterbox, crop) checked against hand-computed images, the
geometry helpers, and the manifest form of Preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent.errors import InputError
from edge_agent.preprocess import (
    RESIZE_MODES,
    Preprocessing,
    crop_box,
    image_to_tensor,
    letterbox_geometry,
)

cv2 = pytest.importorskip("cv2")

# 2x2 blocks of one value each: an exact 2x shrink (INTER_AREA) gives back the block values
BLOCKS = np.array([[10, 20, 30, 40], [50, 60, 70, 80]], dtype=np.uint8)
WIDE = np.kron(BLOCKS, np.ones((2, 2), np.uint8))  # 4 x 8
TALL = np.ascontiguousarray(WIDE.T)  # 8 x 4


def raw(size: tuple[int, int], mode: str, pad_value: int = 0) -> Preprocessing:
    """Pixel values pass through unchanged (scale 1, mean 0, std 1), gray, NHWC."""
    return Preprocessing(size=size, color="gray", layout="NHWC", scale=1.0, resize_mode=mode, pad_value=pad_value)


def pixels(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    x = image_to_tensor(image, pre)
    assert x.dtype == np.float32 and x.shape[0] == 1
    return x[0, :, :, 0]


# ---------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(("src", "dst", "expected"), [
    ((4, 8), (4, 4), (0.5, (2, 4), (1, 0))),
    ((8, 4), (4, 4), (0.5, (4, 2), (0, 1))),
    ((1080, 1920), (640, 640), (1 / 3, (360, 640), (140, 0))),  # YOLO: 140 rows above and below
    ((2, 6), (4, 4), (2 / 3, (1, 4), (1, 0))),  # odd leftover (3 rows): 1 above, 2 below
    ((4, 4), (8, 8), (2.0, (8, 8), (0, 0))),  # enlarging, same aspect: no padding
    ((1, 1000), (4, 4), (0.004, (1, 4), (1, 0))),  # never less than one row
])
def test_letterbox_geometry(src: tuple[int, int], dst: tuple[int, int],
                            expected: tuple[float, tuple[int, int], tuple[int, int]]) -> None:
    r, hw, offset = letterbox_geometry(src, dst)
    assert r == pytest.approx(expected[0]) and hw == expected[1] and offset == expected[2]


@pytest.mark.parametrize(("src", "dst", "expected"), [
    ((4, 8), (4, 4), (0, 2, 4, 4)),
    ((8, 4), (4, 4), (2, 0, 4, 4)),
    ((480, 640), (224, 224), (0, 80, 480, 480)),
    ((3, 7), (2, 2), (0, 2, 3, 3)),
    ((6, 6), (2, 4), (1, 0, 3, 6)),  # a wide target from a square source: keep the full width
    ((5, 5), (5, 5), (0, 0, 5, 5)),
])
def test_crop_box(src: tuple[int, int], dst: tuple[int, int], expected: tuple[int, int, int, int]) -> None:
    assert crop_box(src, dst) == expected


# ---------------------------------------------------------------------------------------------- letterbox


def test_letterbox_wide_image_pads_rows_above_and_below() -> None:
    out = pixels(WIDE, raw((4, 4), "letterbox"))
    expected = np.zeros((4, 4), np.float32)
    expected[1:3] = BLOCKS  # 4x8 -> 2x4, centred: one row of padding above, one below
    assert np.array_equal(out, expected)


def test_letterbox_tall_image_pads_columns_with_pad_value() -> None:
    out = pixels(TALL, raw((4, 4), "letterbox", pad_value=114))
    expected = np.full((4, 4), 114, np.float32)
    expected[:, 1:3] = BLOCKS.T
    assert np.array_equal(out, expected)


def test_letterbox_odd_leftover_goes_to_the_bottom() -> None:
    image = np.full((2, 6), 200, np.uint8)
    out = pixels(image, raw((4, 4), "letterbox", pad_value=7))
    assert np.array_equal(out[:, 0], [7, 200, 7, 7])
    assert (out[1] == 200).all()


def test_letterbox_padding_is_normalised_like_any_pixel_rgb_nchw() -> None:
    image = np.zeros((4, 8, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 30, 60, 90  # B, G, R
    pre = Preprocessing(size=(4, 4), color="rgb", layout="NCHW", scale=1 / 255, mean=(0.5, 0.25, 0.0),
                        std=(0.5, 0.25, 2.0), resize_mode="letterbox", pad_value=114)
    x = image_to_tensor(image, pre)
    assert x.shape == (1, 3, 4, 4)
    mean, std = np.array([0.5, 0.25, 0.0], np.float32), np.array([0.5, 0.25, 2.0], np.float32)
    pad = (np.float32(114) * np.float32(1 / 255) - mean) / std
    img = (np.array([90, 60, 30], np.float32) * np.float32(1 / 255) - mean) / std  # R, G, B
    for c in range(3):
        assert np.allclose(x[0, c, [0, 3]], pad[c]) and np.allclose(x[0, c, 1:3], img[c])


def test_same_size_image_is_untouched_by_every_mode() -> None:
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    outs = [pixels(image, raw((4, 4), mode)) for mode in RESIZE_MODES]
    for out in outs:
        assert np.array_equal(out, image.astype(np.float32))


# ---------------------------------------------------------------------------------------------- crop


def test_crop_keeps_the_centre_of_a_wide_image() -> None:
    image = np.arange(32, dtype=np.uint8).reshape(4, 8)
    assert np.array_equal(pixels(image, raw((4, 4), "crop")), image[:, 2:6])


def test_crop_keeps_the_centre_of_a_tall_image() -> None:
    image = np.arange(32, dtype=np.uint8).reshape(8, 4)
    assert np.array_equal(pixels(image, raw((4, 4), "crop")), image[2:6])


def test_crop_then_shrink() -> None:
    image = np.zeros((4, 8), np.uint8)
    image[:, 2:6] = np.kron(np.array([[1, 2], [3, 4]], np.uint8) * 50, np.ones((2, 2), np.uint8))
    assert np.array_equal(pixels(image, raw((2, 2), "crop")), [[50, 100], [150, 200]])


def test_crop_of_a_bgr_image_to_gray_matches_opencv_on_the_centre() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    centre = np.ascontiguousarray(image[:, 2:8])
    expected = cv2.cvtColor(centre, cv2.COLOR_BGR2GRAY).astype(np.float32)
    assert np.array_equal(pixels(image, raw((6, 6), "crop")), expected)


# ---------------------------------------------------------------------------------------------- stretch


def test_stretch_is_unchanged() -> None:
    """The steps the converter's calibration relied on before the resize modes: colour, resize, normalise."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    pre = Preprocessing(size=(8, 8), color="rgb", layout="NCHW", mean=(0.4,), std=(0.2,))
    resized = cv2.resize(np.ascontiguousarray(image[:, :, ::-1]), (8, 8), interpolation=cv2.INTER_AREA)
    expected = ((resized.astype(np.float32) * np.float32(1 / 255) - np.float32(0.4)) / np.float32(0.2))
    assert np.array_equal(image_to_tensor(image, pre), expected.transpose(2, 0, 1)[None])
    small = rng.integers(0, 256, (3, 5), dtype=np.uint8)
    up = cv2.resize(small, (8, 8), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    assert np.array_equal(pixels(small, raw((8, 8), "stretch")), up)


# ---------------------------------------------------------------------------------------------- manifest form


OLD = {"size": [8, 8], "color": "gray", "layout": "NCHW", "scale": 1 / 255, "mean": [0.0], "std": [1.0],
       "resize_mode": "stretch"}


def test_manifest_form_of_stretch_and_crop_has_no_pad_value() -> None:
    assert Preprocessing.from_dict(OLD).to_dict() == OLD  # manifests written before pad_value existed
    crop = {**OLD, "resize_mode": "crop"}
    assert Preprocessing.from_dict(crop).to_dict() == crop


def test_manifest_form_of_letterbox_round_trips_pad_value() -> None:
    pre = Preprocessing(size=(8, 8), resize_mode="letterbox", pad_value=114)
    d = pre.to_dict()
    assert d["pad_value"] == 114 and d["resize_mode"] == "letterbox"
    assert Preprocessing.from_dict(d) == pre
    assert Preprocessing.from_dict({"size": [8, 8], "resize_mode": "letterbox"}).pad_value == 0


@pytest.mark.parametrize(("kw", "match"), [
    ({"resize_mode": "fit"}, "stretch, letterbox, crop"),
    ({"resize_mode": "letterbox", "pad_value": 256}, "0..255"),
    ({"resize_mode": "letterbox", "pad_value": -1}, "0..255"),
    ({"resize_mode": "letterbox", "pad_value": 1.5}, "0..255"),
    ({"resize_mode": "letterbox", "pad_value": True}, "0..255"),
    ({"resize_mode": "stretch", "pad_value": 114}, "only applies to resize_mode 'letterbox'"),
    ({"resize_mode": "crop", "pad_value": 3}, "only applies"),
])
def test_invalid_resize_settings(kw: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        Preprocessing.from_dict({"size": [8, 8], **kw})


def test_unknown_key_lists_pad_value() -> None:
    with pytest.raises(InputError, match="pad_value"):
        Preprocessing.from_dict({"size": [8, 8], "padding": 0})


def test_empty_image_is_an_input_error() -> None:
    with pytest.raises(InputError, match="expected an image"):
        image_to_tensor(np.zeros((0, 4, 3), np.uint8), raw((4, 4), "letterbox"))
