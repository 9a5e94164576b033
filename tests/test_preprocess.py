"""edge_agent.preprocess: resize modes (stretch, letterbox, crop) checked against hand-computed images, the
geometry helpers, the manifest form of Preprocessing, and the fast path (resize first, one table look-up for
normalise + quantize) against a straightforward float reference, bit for bit."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edge_agent.errors import InputError
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import (
    RESIZE_MODES,
    Preprocessing,
    crop_box,
    image_to_input,
    image_to_tensor,
    letterbox_geometry,
    pixel_table,
    quantize,
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


# ------------------------------------------------------------------------------ fast path vs reference
#
# ``image_to_tensor`` / ``image_to_input`` resize first (on the source's channels) and normalise (and quantize)
# with a per-channel table; ``reference`` below is the straightforward float computation they replaced, in the
# order the module docstring defines (colour, resize, float32 normalise, layout, ``quantize``). The results
# must be identical, bit for bit.


def _reference_resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape[:2] == (h, w):
        return image
    interp = cv2.INTER_AREA if image.shape[0] > h or image.shape[1] > w else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def reference(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The float path: colour on the full image, resize, (pixel * scale - mean) / std in float32, layout."""
    if image.ndim == 2:
        image = image[:, :, None]
    h, w = pre.size
    if pre.resize_mode == "crop":
        top, left, ch, cw = crop_box(image.shape[:2], (h, w))
        image = image[top:top + ch, left:left + cw]
    if image.shape[2] == 4:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGRA2BGR)
    if pre.color == "gray" and image.shape[2] == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2GRAY)[:, :, None]
    elif pre.color != "gray" and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if pre.color == "rgb":
        image = image[:, :, ::-1]
    if pre.resize_mode == "letterbox" and image.shape[:2] != (h, w):
        _, (nh, nw), (top, left) = letterbox_geometry(image.shape[:2], (h, w))
        canvas = np.full((h, w, image.shape[2]), pre.pad_value, dtype=image.dtype)
        canvas[top:top + nh, left:left + nw] = _reference_resize(image, nh, nw)
        image = canvas
    else:
        image = _reference_resize(image, h, w)
    x = image.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None, ...], dtype=np.float32)


IMAGENET = {"scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
SOURCES = [(480, 640, 3), (37, 53, 3), (5, 7, 3), (31, 29), (20, 30, 1), (24, 18, 4), (16, 16, 3), (2, 90, 3)]


@pytest.mark.parametrize("shape", SOURCES)
@pytest.mark.parametrize("color", ["rgb", "bgr", "gray"])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_fast_path_equals_reference_bit_for_bit(shape: tuple[int, ...], color: str, layout: str,
                                                mode: str) -> None:
    rng = np.random.default_rng([*shape, len(color), len(layout), RESIZE_MODES.index(mode)])
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    k = 1 if color == "gray" else 3
    norm = IMAGENET if k == 3 else {"scale": 1 / 127.5, "mean": (1.0,), "std": (0.5,)}
    for size in ((16, 16), (224, 224), (9, 40), (1, 3)):  # shrinking, enlarging, one axis each way
        pre = Preprocessing(size=size, color=color, layout=layout, resize_mode=mode,
                            pad_value=114 if mode == "letterbox" else 0, **norm)
        want = reference(image, pre)
        got = image_to_tensor(image, pre)
        assert got.dtype == np.float32 and got.shape == want.shape and got.flags.c_contiguous
        assert np.array_equal(got, want), (size, float(np.abs(got - want).max()))
        for dtype, q_scale, zp in (("int8", 0.018631115555763245, -14), ("uint8", 1 / 64, 128)):
            q = image_to_input(image, pre, TensorSpec("x", want.shape, dtype, q_scale, zp))
            assert q.dtype == np.dtype(dtype) and np.array_equal(q, quantize(want, q_scale, zp, dtype)), size


def test_camera_frame_to_mobilenet_int8_equals_reference() -> None:
    """The case the table exists for: a 640x480 BGR frame -> MobileNetV2's int8 NCHW (1, 3, 224, 224)."""
    frame = np.random.default_rng(7).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    pre = Preprocessing(size=(224, 224), color="rgb", layout="NCHW", **IMAGENET)
    spec = TensorSpec("input", (1, 3, 224, 224), "int8", 0.018631115555763245, -14)
    q = image_to_input(frame, pre, spec)
    assert q.shape == (1, 3, 224, 224) and q.flags.c_contiguous
    assert np.array_equal(q, quantize(reference(frame, pre), spec.scale, spec.zero_point, "int8"))


def test_strided_and_reversed_views_are_read_correctly() -> None:
    rng = np.random.default_rng(8)
    big = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    pre = Preprocessing(size=(8, 8), color="rgb", layout="NHWC", **IMAGENET)
    for view in (big[5:35, 7:50], big[:, ::-1], big[::2, ::3], big[:, :, ::-1]):
        assert np.array_equal(image_to_tensor(view, pre), reference(view, pre))


def _normalised(p: np.ndarray, scale: float, mean: float, std: float) -> np.ndarray:
    """Step 3 written out: (pixel * scale - mean) / std, every operation in float32."""
    return (p.astype(np.float32) * np.float32(scale) - np.float32(mean)) / np.float32(std)


@pytest.mark.parametrize(("norm", "quant"), [
    ({"scale": 1 / 255, **{k: IMAGENET[k] for k in ("mean", "std")}}, ("int8", 0.018631115555763245, -14)),
    ({"scale": 1 / 255, "mean": (0.0,), "std": (1.0,)}, ("uint8", 1 / 255, 0)),  # the identity: q == pixel
    ({"scale": 1 / 255, "mean": (0.0,), "std": (1.0,)}, ("int8", 1 / 255, -128)),
    ({"scale": 1.0, "mean": (127.5,), "std": (127.5,)}, ("int8", 1 / 128, 0)),
    ({"scale": 1.0, "mean": (0.0, 1.0, 0.5), "std": (1.0, 1.0, 1.0)}, ("int8", 2.0, 3)),  # exact ties
    ({"scale": 1.0, "mean": (0.0, 1.0, 0.5), "std": (1.0, 1.0, 1.0)}, ("uint8", 2.0, 7)),
    ({"scale": 1 / 127.5, "mean": (1.0,), "std": (1.0,)}, ("int8", 0.25, 100)),  # clipped at both ends
    ({"scale": 1 / 255, "mean": (0.5, 0.25, 0.0), "std": (0.5, 0.25, 2.0)}, ("uint8", 0.01, 90)),
])
def test_pixel_table_equals_the_float_path_on_all_256_values(norm: dict[str, Any],
                                                            quant: tuple[str, float, int]) -> None:
    dtype, q_scale, zp = quant
    pre = Preprocessing(size=(4, 4), color="rgb", **norm)
    table = pixel_table(pre, dtype, q_scale, zp)
    floats = pixel_table(pre)
    assert table.shape == floats.shape == (3, 256) and table.dtype == np.dtype(dtype)
    assert not table.flags.writeable  # shared by every call: read-only
    p = np.arange(256)
    for c in range(3):
        mean, std = (v[c] if len(v) == 3 else v[0] for v in (pre.mean, pre.std))
        want = _normalised(p, pre.scale, mean, std)
        assert np.array_equal(floats[c], want)
        assert np.array_equal(table[c], quantize(want, q_scale, zp, dtype))
    assert pixel_table(pre, dtype, q_scale, zp) is table  # built once


def test_pixel_table_rounds_ties_half_to_even_like_quantize() -> None:
    pre = Preprocessing(size=(4, 4), color="rgb", scale=1.0, mean=(0.0, 1.0, 0.5), std=(1.0,))
    table = pixel_table(pre, "int8", 2.0, 0).astype(int)
    # channel 0: p / 2 -> 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 3.5 -> 4; channel 1: (p - 1) / 2 -> -0.5 -> 0
    assert list(table[0, :8]) == [0, 0, 1, 2, 2, 2, 3, 4]
    assert list(table[1, :4]) == [0, 0, 0, 1]
    assert table[0, 255] == 127 and table[1, 255] == 127  # 127.5 -> 128 (even) -> clipped to 127
    # channel 2: (p - 0.5) / 2 -> 0.25, 0.75, 1.25 ... no ties: round to nearest
    assert list(table[2, :4]) == [0, 0, 1, 1]


def test_image_to_input_per_dtype() -> None:
    image = np.random.default_rng(9).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    pre = Preprocessing(size=(8, 8), color="rgb", layout="NCHW", **IMAGENET)
    x = image_to_tensor(image, pre)
    assert np.array_equal(image_to_input(image, pre, TensorSpec("x", (1, 3, 8, 8), "float32")), x)
    half = image_to_input(image, pre, TensorSpec("x", (1, 3, 8, 8), "float16"))
    assert half.dtype == np.float16 and np.array_equal(half, x.astype(np.float16))
    with pytest.raises(InputError, match="no quantization scale"):
        image_to_input(image, pre, TensorSpec("x", (1, 3, 8, 8), "int8"))
    with pytest.raises(InputError, match="int32"):
        image_to_input(image, pre, TensorSpec("x", (1, 3, 8, 8), "int32"))
    for bad in (("int8", None, None), ("int8", 0.1, None), ("float32", 0.1, 0), ("int16", 0.1, 0)):
        with pytest.raises(InputError, match="int8/uint8 need a scale and a zero point"):
            pixel_table(pre, *bad)


def test_images_that_are_not_8_bit_take_the_float_path() -> None:
    image = np.random.default_rng(10).integers(0, 65536, (12, 10, 3), dtype=np.uint16)
    pre = Preprocessing(size=(8, 8), color="rgb", layout="NCHW", scale=1 / 65535, mean=(0.5,), std=(0.25,))
    want = reference(image, pre)
    assert np.array_equal(image_to_tensor(image, pre), want)
    q = image_to_input(image, pre, TensorSpec("x", (1, 3, 8, 8), "int8", 1 / 64, 0))
    assert np.array_equal(q, quantize(want, 1 / 64, 0, "int8"))
