"""Calibration sources (real files: .npy, .npz, PNG/JPEG read by OpenCV) and the seeded split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from converters.calibration import Samples, load_samples, split
from edge_agent.errors import CalibrationError
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import Preprocessing

IMAGE = TensorSpec("image", (1, 1, 8, 8), "float32")
VECTOR = TensorSpec("x", (-1, 16), "float32")


def _error(source: str | Path, spec: TensorSpec = IMAGE, pre: Preprocessing | None = None) -> CalibrationError:
    with pytest.raises(CalibrationError) as info:
        load_samples(source, spec, pre)
    assert info.value.exit_code == 2
    return info.value


# --------------------------------------------------------------------------------------------------
# sources


def test_folder_of_npy_with_and_without_batch_axis_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(12):  # names sort as 0, 1, 10, 11, 2, ...
        sample = np.full((1, 8, 8) if i % 2 else (1, 1, 8, 8), i, dtype=np.float64)
        np.save(folder / f"{i}.npy", sample)
    (folder / ".DS_Store").write_bytes(b"junk")  # hidden files are not samples
    s = load_samples(folder, IMAGE, None)
    assert s.arrays.shape == (12, 1, 1, 8, 8)
    assert s.arrays.dtype == np.float32
    assert [int(a[0, 0, 0, 0]) for a in s.arrays] == sorted(range(12), key=str)
    assert s.labels is None and s.preprocessing is None
    assert "12 .npy files" in s.description


def test_single_npy_first_axis_counts_samples(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(5, 16)).astype(np.float32)
    np.save(tmp_path / "a.npy", flat)
    s = load_samples(tmp_path / "a.npy", VECTOR, None)  # dynamic batch: samples are (1, 16)
    assert s.arrays.shape == (5, 1, 16)
    np.testing.assert_array_equal(s.arrays[:, 0], flat)
    np.save(tmp_path / "b.npy", flat[:, None, :])
    assert load_samples(tmp_path / "b.npy", VECTOR, None).arrays.shape == (5, 1, 16)


def test_npz_x_and_y(tmp_path: Path) -> None:
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)
    np.savez(tmp_path / "d.npz", x=x, y=np.array([2, 0, 1]))
    s = load_samples(tmp_path / "d.npz", IMAGE, None)
    assert s.arrays.shape == (3, 1, 1, 8, 8)
    np.testing.assert_array_equal(s.labels, [2, 0, 1])
    assert s.labels.dtype == np.int64


def test_npz_input_name_or_only_array(tmp_path: Path) -> None:
    x = np.ones((4, 1, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "named.npz", image=x, other=np.zeros(3))
    assert len(load_samples(tmp_path / "named.npz", IMAGE, None)) == 4
    np.savez(tmp_path / "only.npz", whatever=x)
    s = load_samples(tmp_path / "only.npz", IMAGE, None)
    assert len(s) == 4 and s.labels is None
    np.savez(tmp_path / "two.npz", a=x, b=x)
    err = _error(tmp_path / "two.npz")
    assert "two.npz" in err.message and "'x'" in err.message


def _png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def test_image_folder_derives_preprocessing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(3, 8, 8), dtype=np.uint8)
    for i, img in enumerate(images):
        _png(tmp_path / "imgs" / f"{i}.png", img)
    s = load_samples(tmp_path / "imgs", IMAGE, None)
    assert s.arrays.shape == (3, 1, 1, 8, 8)
    np.testing.assert_allclose(s.arrays[:, 0, 0], images / 255.0, atol=1e-7)
    assert s.preprocessing == Preprocessing(size=(8, 8), color="gray", layout="NCHW")
    assert "derived from the input shape" in s.description


def test_image_subfolders_give_labels_from_sorted_names(tmp_path: Path) -> None:
    img = np.zeros((8, 8), np.uint8)
    for cls, count in (("dog", 2), ("cat", 3)):
        for i in range(count):
            _png(tmp_path / "pets" / cls / f"{i}.png", img + i)
    s = load_samples(tmp_path / "pets", IMAGE, None)
    assert s.class_names == ("cat", "dog")
    np.testing.assert_array_equal(s.labels, [0, 0, 0, 1, 1])
    assert "labels from 2 class subfolders" in s.description


def test_color_images_nhwc_with_explicit_preprocessing(tmp_path: Path) -> None:
    spec = TensorSpec("input", (1, 4, 4, 3), "float32")
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 200  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.jpg"), bgr, [cv2.IMWRITE_JPEG_QUALITY, 100])
    pre = Preprocessing(size=(4, 4), color="rgb", layout="NHWC", scale=1.0, mean=(100.0,), std=(2.0,))
    s = load_samples(tmp_path, spec, pre)
    assert s.arrays.shape == (1, 1, 4, 4, 3)
    np.testing.assert_allclose(s.arrays[0, 0, :, :, 0], 50.0, atol=1.5)  # (200 - 100) / 2 in channel R
    np.testing.assert_allclose(s.arrays[0, 0, :, :, 2], -50.0, atol=1.5)
    assert s.preprocessing is pre
    derived = load_samples(tmp_path, spec, None).preprocessing
    assert derived is not None and (derived.layout, derived.color) == ("NHWC", "rgb")


# --------------------------------------------------------------------------------------------------
# errors


def test_missing_source(tmp_path: Path) -> None:
    err = _error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in err.message and "does not exist" in err.message


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    err = _error(tmp_path / "empty")
    assert "empty" in err.message and "no samples" in err.message


def test_zero_samples_in_array(tmp_path: Path) -> None:
    np.save(tmp_path / "none.npy", np.zeros((0, 1, 8, 8), np.float32))
    err = _error(tmp_path / "none.npy")
    assert "zero samples" in err.message and "(1, 1, 8, 8)" in err.message


def test_unknown_file_type_in_folder(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 8, 8), np.float32))
    (tmp_path / "notes.txt").write_text("hello")
    err = _error(tmp_path)
    assert "notes.txt" in err.message and "unknown type" in err.message


def test_unknown_source_type(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("1,2,3\n")
    assert "data.csv" in _error(tmp_path / "data.csv").message


def test_wrong_shape_names_file_and_expected_shapes(tmp_path: Path) -> None:
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(5):
        np.save(folder / f"{i}.npy", np.zeros((1, 8, 8) if i != 3 else (3, 3), np.float32))
    err = _error(folder)
    assert err.message == ("calibration sample digits/3.npy has shape (3, 3); the model input 'image' expects "
                           "(1, 1, 8, 8) or (1, 8, 8)")


def test_wrong_shape_of_stacked_array(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros((10, 7), np.float32))
    err = _error(tmp_path / "x.npy", VECTOR)
    assert "x.npy" in err.message and "(10, 7)" in err.message and "(1, 16)" in err.message


def test_unreadable_image(tmp_path: Path) -> None:
    _png(tmp_path / "ok.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    err = _error(tmp_path)
    assert "broken.png" in err.message and "cannot be read" in err.message


def test_non_numeric_dtype(tmp_path: Path) -> None:
    np.save(tmp_path / "words.npy", np.array([["a"] * 16] * 2))
    err = _error(tmp_path / "words.npy", VECTOR)
    assert "words.npy" in err.message and "not numeric" in err.message


def test_nan_values(tmp_path: Path) -> None:
    x = np.zeros((2, 1, 16), np.float32)
    x[1, 0, 3] = np.nan
    np.save(tmp_path / "nan.npy", x)
    assert "NaN" in _error(tmp_path / "nan.npy", VECTOR).message


def test_preprocessing_that_does_not_fit_the_input(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    err = _error(tmp_path, IMAGE, Preprocessing(size=(8, 8), color="rgb", layout="NCHW"))
    assert "(1, 3, 8, 8)" in err.message and "(1, 1, 8, 8)" in err.message


def test_images_for_a_non_image_input(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    assert "not a 4-D image" in _error(tmp_path, VECTOR).message


# --------------------------------------------------------------------------------------------------
# split


def _samples(n: int, seed: int = 0) -> Samples:
    x = np.random.default_rng(seed).normal(size=(n, 1, 4)).astype(np.float32)
    return Samples(x, np.arange(n, dtype=np.int64), f"{n} test samples", None)


def _rows(s: Samples) -> set[bytes]:
    return {a.tobytes() for a in s.arrays}


def test_split_is_deterministic_and_disjoint() -> None:
    s = _samples(50)
    cal, val, info = split(s, 20, 10, seed=7)
    cal2, val2, info2 = split(s, 20, 10, seed=7)
    assert (len(cal), len(val)) == (20, 10)
    np.testing.assert_array_equal(cal.arrays, cal2.arrays)
    np.testing.assert_array_equal(val.labels, val2.labels)
    assert info == info2
    assert not _rows(cal) & _rows(val)
    assert not set(cal.labels.tolist()) & set(val.labels.tolist())
    for sub in (cal, val):  # labels still belong to their arrays
        np.testing.assert_array_equal(sub.arrays, s.arrays[sub.labels])
    assert info["count"] == 20 and info["validation_count"] == 10 and info["seed"] == 7
    assert info["notes"] == []
    other, _, info3 = split(s, 20, 10, seed=8)
    assert not np.array_equal(other.arrays, cal.arrays)
    assert info3["sha256"] != info["sha256"]


def test_split_sha256_follows_the_data() -> None:
    _, _, a = split(_samples(30, seed=1), 10, 5, seed=0)
    _, _, b = split(_samples(30, seed=2), 10, 5, seed=0)
    assert len(a["sha256"]) == 64 and a["sha256"] != b["sha256"]


def test_split_with_few_samples_keeps_one_for_validation() -> None:
    cal, val, info = split(_samples(5), 200, 200, seed=0)
    assert (len(cal), len(val)) == (4, 1)
    assert len(info["notes"]) == 2 and "4 samples, not the 200" in info["notes"][0]


def test_split_needs_two_samples() -> None:
    with pytest.raises(CalibrationError, match="need at least 2 samples") as info:
        split(_samples(1), 10, 10, seed=0)
    assert info.value.exit_code == 2


# --------------------------------------------------------------------------------------------------
# CSV


def _csv(path: Path, rows: list[list[object]], header: list[str] | None = None, *, bom: bool = False,
         newline: str = "\n") -> Path:
    lines = ([",".join(header)] if header else []) + [",".join(str(v) for v in row) for row in rows]
    path.write_text(("\ufeff" if bom else "") + newline.join(lines) + newline, encoding="utf-8")
    return path


def _table(n: int, width: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, n), np.round(rng.normal(size=(n, width)), 4)


def test_csv_with_bom_header_crlf_and_label_name(tmp_path: Path) -> None:
    labels, x = _table(7)
    header = ["f" + str(i) for i in range(8)] + ["class"] + ["f" + str(i) for i in range(8, 16)]
    rows = [[*row[:8], lab, *row[8:]] for lab, row in zip(labels, x, strict=True)]
    src = _csv(tmp_path / "d.csv", rows, header, bom=True, newline="\r\n")
    s = load_samples(src, VECTOR, None, label_column="class")
    assert s.arrays.shape == (7, 1, 16) and s.arrays.dtype == np.float32
    np.testing.assert_allclose(s.arrays[:, 0], x, atol=1e-6)  # the label column is taken out, order kept
    np.testing.assert_array_equal(s.labels, labels)
    assert s.labels.dtype == np.int64
    assert "7 rows" in s.description and "header row skipped" in s.description and "'class'" in s.description
    by_index = load_samples(src, VECTOR, None, label_column=8)
    np.testing.assert_array_equal(by_index.labels, labels)


def test_csv_without_header_label_first_or_last(tmp_path: Path) -> None:
    labels, x = _table(5)
    first = _csv(tmp_path / "first.csv", [[lab, *row] for lab, row in zip(labels, x, strict=True)])
    s = load_samples(first, VECTOR, None, label_column=0)
    np.testing.assert_array_equal(s.labels, labels)
    np.testing.assert_allclose(s.arrays[:, 0], x, atol=1e-6)
    assert load_samples(first, VECTOR, None, label_column="0").labels.tolist() == labels.tolist()
    last = _csv(tmp_path / "last.csv", [[*row, float(lab)] for lab, row in zip(labels, x, strict=True)])
    np.testing.assert_array_equal(load_samples(last, VECTOR, None, label_column=-1).labels, labels)


def test_csv_rows_fill_an_image_input_in_c_order(tmp_path: Path) -> None:
    values = np.arange(2 * 64).reshape(2, 64)
    s = load_samples(_csv(tmp_path / "img.csv", values.tolist()), IMAGE, None)
    assert s.arrays.shape == (2, 1, 1, 8, 8) and s.labels is None
    np.testing.assert_array_equal(s.arrays[1, 0, 0], values[1].reshape(8, 8))


def test_csv_of_the_wrong_width_names_file_rows_and_width(tmp_path: Path) -> None:
    _, x = _table(12, width=10)
    err = _error(_csv(tmp_path / "narrow.csv", x.tolist()), VECTOR)
    assert "narrow.csv" in err.message and "12 rows of 10 columns" in err.message and "16 values" in err.message
    labels, x = _table(4)
    labelled = _csv(tmp_path / "labelled.csv", [[lab, *row] for lab, row in zip(labels, x, strict=True)])
    err = _error(labelled, VECTOR)
    assert "17 columns (no label column)" in err.message
    assert "--label-column" in (err.hint or "")  # one column too many: probably the labels


def test_csv_label_column_errors(tmp_path: Path) -> None:
    labels, x = _table(3)
    src = _csv(tmp_path / "d.csv", [[lab, *row] for lab, row in zip(labels, x, strict=True)],
               ["label", *(f"x{i}" for i in range(16))])
    with pytest.raises(CalibrationError) as info:
        load_samples(src, VECTOR, None, label_column="target")
    assert "'target'" in info.value.message and "'label'" in info.value.message
    with pytest.raises(CalibrationError, match="out of range"):
        load_samples(src, VECTOR, None, label_column=17)
    fractional = _csv(tmp_path / "f.csv", [[0.5, *x[0]], [1, *x[1]]])
    with pytest.raises(CalibrationError, match=r"line 1: label '0.5' in column 0 is not a class index"):
        load_samples(fractional, VECTOR, None, label_column=0)
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    with pytest.raises(CalibrationError, match=r"applies to a \.csv calibration source only"):
        load_samples(tmp_path / "x.npy", VECTOR, None, label_column=0)


def test_csv_bad_cells_and_ragged_rows_name_the_line(tmp_path: Path) -> None:
    _, x = _table(3)
    rows = [list(r) for r in x.tolist()]
    rows[1][5] = "oops"
    err = _error(_csv(tmp_path / "bad.csv", rows), VECTOR)
    assert "bad.csv, line 2: 'oops' is not a number" in err.message
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("\n".join([",".join(["1"] * 16), ",".join(["1"] * 15)]) + "\n")
    assert "ragged.csv, line 2: 15 columns where the first row has 16" in _error(ragged, VECTOR).message


def test_csv_empty_or_header_only(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("\n\n")
    assert "zero samples" in _error(tmp_path / "empty.csv", VECTOR).message
    (tmp_path / "header.csv").write_text("a,b,c\n")
    assert "only a header row" in _error(tmp_path / "header.csv", VECTOR).message


@pytest.mark.realmodels
def test_real_keypoint_csv(realmodels: Path) -> None:
    spec = TensorSpec("input_1", (-1, 42), "float32")
    s = load_samples(realmodels / "hand_gesture" / "keypoint.csv", spec, None, label_column=0)
    assert s.arrays.shape == (4450, 1, 42)
    assert np.bincount(s.labels).tolist() == [1522, 1572, 1356]
    assert float(np.abs(s.arrays).max()) == pytest.approx(1.0)  # landmarks normalised to [-1, 1]
    with pytest.raises(CalibrationError) as info:
        load_samples(realmodels / "hand_gesture" / "keypoint.csv", spec, None)
    assert "4450 rows of 43 columns" in info.value.message and "42 values per row" in info.value.message
