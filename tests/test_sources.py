"""edge_agent.sources: synthetic, npy:/npz and images: sources, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import SourceError
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import quantize
from edge_agent.sources import SYNTHETIC_POOL, open_source

X = (TensorSpec("x", (1, 16), "float32"),)
IMG = (TensorSpec("image", (1, 1, 8, 8), "float32"),)
Q = (TensorSpec("q", (1, 4), "int8", scale=0.05, zero_point=-3),)
PRE = {"size": [8, 8], "color": "gray", "layout": "NCHW", "scale": 1 / 255, "mean": [0.5], "std": [0.25]}


def take(src, n: int) -> list[list[np.ndarray]]:
    return [src.next() for _ in range(n)]


# ---------------------------------------------------------------------------------------------- synthetic

def test_synthetic_matches_shapes_and_dtypes_and_cycles() -> None:
    specs = (TensorSpec("a", (1, 3, 4, 4), "float32"), TensorSpec("b", (-1, 5), "int64"))
    src = open_source("synthetic", specs, None)
    feeds = take(src, SYNTHETIC_POOL + 1)
    assert feeds[0][0].shape == (1, 3, 4, 4) and feeds[0][0].dtype == np.float32
    assert feeds[0][1].shape == (1, 5) and feeds[0][1].dtype == np.int64  # dynamic dim -> 1
    assert feeds[SYNTHETIC_POOL][0] is feeds[0][0]  # a pool, cycled: no RNG in the loop
    assert not np.array_equal(feeds[0][0], feeds[1][0])


def test_synthetic_int8_uses_full_range() -> None:
    src = open_source("synthetic", (TensorSpec("q", (1, 4096), "int8", 0.1, 0),), None)
    x = np.concatenate([f[0] for f in take(src, SYNTHETIC_POOL)], axis=None)
    assert x.dtype == np.int8 and x.min() == -128 and x.max() == 127


def test_synthetic_is_deterministic_per_seed() -> None:
    a = open_source("synthetic", X, None, seed=5).next()[0]
    b = open_source("synthetic", X, None, seed=5).next()[0]
    c = open_source("synthetic", X, None, seed=6).next()[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------------------------------------- npy

def test_npy_stack_is_split_and_cycled(tmp_path: Path) -> None:
    data = np.arange(3 * 16, dtype=np.float32).reshape(3, 16)
    np.save(tmp_path / "s.npy", data)
    feeds = take(open_source(f"npy:{tmp_path / 's.npy'}", X, None), 4)
    assert [f[0].shape for f in feeds] == [(1, 16)] * 4
    assert np.array_equal(feeds[1][0][0], data[1])
    assert np.array_equal(feeds[3][0], feeds[0][0])


def test_npy_sample_without_batch_axis(tmp_path: Path) -> None:
    np.save(tmp_path / "one.npy", np.ones(16, dtype=np.float64))
    (x,) = open_source(f"npy:{tmp_path / 'one.npy'}", X, None).next()
    assert x.shape == (1, 16) and x.dtype == np.float32


def test_npy_float_for_int8_input_is_quantized(tmp_path: Path) -> None:
    data = np.array([[0.0, 0.5, -1.0, 10.0]], dtype=np.float32)
    np.save(tmp_path / "f.npy", data)
    (q,) = open_source(f"npy:{tmp_path / 'f.npy'}", Q, None).next()
    assert q.dtype == np.int8
    assert np.array_equal(q, quantize(data, 0.05, -3, "int8"))
    assert q[0, 3] == 127  # clipped


def test_npz_multi_input(tmp_path: Path) -> None:
    specs = (TensorSpec("a", (1, 2), "float32"), TensorSpec("b", (1, 3), "float32"))
    np.savez(tmp_path / "m.npz", a=np.zeros((2, 2)), b=np.ones((2, 3)))
    feeds = open_source(f"npy:{tmp_path / 'm.npz'}", specs, None).next()
    assert [f.shape for f in feeds] == [(1, 2), (1, 3)]
    assert feeds[1].sum() == 3


def test_npy_wrong_shape_names_file_and_shapes(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.zeros((2, 7), np.float32))
    with pytest.raises(SourceError) as e:
        open_source(f"npy:{tmp_path / 'bad.npy'}", X, None)
    msg = str(e.value)
    assert "bad.npy" in msg and "(2, 7)" in msg and "(1, 16)" in msg
    assert e.value.exit_code == 2


def test_npy_missing_and_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"npy:{tmp_path / 'nope.npy'}", X, None)
    np.save(tmp_path / "empty.npy", np.zeros((0, 16), np.float32))
    with pytest.raises(SourceError, match="no samples"):
        open_source(f"npy:{tmp_path / 'empty.npy'}", X, None)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(SourceError, match=r"junk\.npy"):
        open_source(f"npy:{tmp_path / 'junk.npy'}", X, None)


def test_npy_for_multi_input_model_asks_for_npz(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 2), np.float32))
    specs = (TensorSpec("a", (1, 2), "float32"), TensorSpec("b", (1, 3), "float32"))
    with pytest.raises(SourceError, match="npz"):
        open_source(f"npy:{tmp_path / 'a.npy'}", specs, None)


def test_int_data_out_of_range_for_int8(tmp_path: Path) -> None:
    np.save(tmp_path / "i.npy", np.array([[0, 1, 2, 300]], dtype=np.int32))
    with pytest.raises(SourceError, match="outside the range"):
        open_source(f"npy:{tmp_path / 'i.npy'}", Q, None)


# ---------------------------------------------------------------------------------------------- images

def _write_images(folder: Path, n: int) -> list[np.ndarray]:
    import cv2

    folder.mkdir()
    imgs = []
    for i in range(n):
        img = np.full((12, 10, 3), 20 * (i + 1), dtype=np.uint8)
        assert cv2.imwrite(str(folder / f"{i:02d}.png"), img)
        imgs.append(img)
    (folder / "notes.txt").write_text("not an image")
    return imgs


def test_images_are_preprocessed_and_cycled(tmp_path: Path) -> None:
    from edge_agent.preprocess import Preprocessing, image_to_tensor

    imgs = _write_images(tmp_path / "imgs", 3)
    src = open_source(f"images:{tmp_path / 'imgs'}", IMG, PRE)
    feeds = take(src, 4)
    assert feeds[0][0].shape == (1, 1, 8, 8) and feeds[0][0].dtype == np.float32
    expected = image_to_tensor(imgs[1], Preprocessing.from_dict(PRE))
    assert np.allclose(feeds[1][0], expected)
    assert np.array_equal(feeds[3][0], feeds[0][0])


def test_images_in_class_subfolders_are_found_in_sorted_order(tmp_path: Path) -> None:
    import cv2

    root = tmp_path / "labelled"
    for label, value in (("b", 200), ("a", 100)):
        (root / label).mkdir(parents=True)
        assert cv2.imwrite(str(root / label / "x.png"), np.full((8, 8), value, np.uint8))
    (root / ".hidden").mkdir()
    assert cv2.imwrite(str(root / ".hidden" / "y.png"), np.zeros((8, 8), np.uint8))
    src = open_source(f"images:{root}", IMG, PRE)
    first, second, third = (f[0] for f in take(src, 3))
    # a/x.png (100) before b/x.png (200); the hidden folder is skipped, so the third cycles to a/x.png
    assert first.mean() < second.mean()
    assert np.array_equal(third, first)


def test_images_for_int8_input_are_quantized(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 1)
    spec = (TensorSpec("image", (1, 1, 8, 8), "uint8", scale=1 / 64, zero_point=128),)
    (x,) = open_source(f"images:{tmp_path / 'imgs'}", spec, PRE).next()
    assert x.dtype == np.uint8


def test_images_cache_is_bounded(tmp_path: Path) -> None:
    from edge_agent.sources import ImageSource

    _write_images(tmp_path / "imgs", 3)
    src = ImageSource(tmp_path / "imgs", IMG, PRE, cache_bytes=2 * 8 * 8 * 4)
    first = take(src, 3)
    again = take(src, 3)
    assert again[0][0] is first[0][0] and again[1][0] is first[1][0]  # cached
    assert again[2][0] is not first[2][0] and np.array_equal(again[2][0], first[2][0])  # re-read


def test_images_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no preprocessing"):
        open_source(f"images:{tmp_path}", IMG, None)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(f"images:{tmp_path / 'nope'}", IMG, PRE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        open_source(f"images:{tmp_path / 'empty'}", IMG, PRE)
    _write_images(tmp_path / "imgs", 1)
    wrong = (TensorSpec("image", (1, 3, 8, 8), "float32"),)
    with pytest.raises(SourceError, match=r"00\.png.*\(1, 1, 8, 8\).*\(1, 3, 8, 8\)"):
        open_source(f"images:{tmp_path / 'imgs'}", wrong, PRE)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SourceError, match=r"a\.jpg"):
        open_source(f"images:{tmp_path / 'broken'}", IMG, PRE)


# ---------------------------------------------------------------------------------------------- specs

@pytest.mark.parametrize("spec", ["camera:0", "random", "npy", "npy:", "images:", "synthetic:3", ""])
def test_unknown_or_incomplete_spec(spec: str) -> None:
    with pytest.raises(SourceError) as e:
        open_source(spec, X, None)
    assert e.value.exit_code == 2
    if spec not in ("npy", "npy:", "images:"):
        assert "synthetic, npy:PATH, images:DIR" in str(e.value)
