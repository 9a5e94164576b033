"""Calibration and validation samples for quantization.

``load_samples`` reads a source given by the user and returns every sample as a float32 array shaped
like the model input (batch axis of 1 kept). Accepted sources:

* a folder of ``.npy`` files, one sample each, shaped like the input with or without the batch axis;
* one ``.npy`` file whose first axis counts the samples;
* one ``.npz`` file: key ``x`` (and ``y`` for labels), else the input's name, else its only array;
* a folder of images (.png/.jpg/.jpeg/.bmp) read with OpenCV and preprocessed exactly as the device will
  (``edge_agent.preprocess.image_to_tensor``);
* a folder of class subfolders (of images or .npy files): the labels are the subfolder names, sorted,
  mapped to 0, 1, 2, ...
* one ``.csv`` file of numeric rows (UTF-8, a BOM and a header row are allowed): ``label_column`` (an
  index, or a header name) holds integer class labels; the remaining columns, in order, are one sample
  and must number exactly the input's element count (e.g. 42 for a (1, 42) input).

Files are taken in sorted order. Hidden files (``.name``) are skipped. ``split`` then draws disjoint
calibration and validation subsets with a seeded shuffle, so the same data and seed always give the same
bundle.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import CalibrationError
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import Preprocessing, image_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
_HINT_SOURCE = ("give a folder of .npy files or images (one subfolder per class for labels), "
                "a .npy whose first axis counts samples, a .npz with arrays 'x' (and 'y'), "
                "or a .csv of numeric rows (--label-column N|NAME for labels)")
_HINT_CSV = ("one sample per row: numbers separated by commas, an optional header row, and the label column "
             "named with --label-column N|NAME")


@dataclass(frozen=True)
class Samples:
    """Samples shaped like the model input: ``arrays`` is (N, *input_shape) float32."""

    arrays: np.ndarray
    labels: np.ndarray | None
    description: str
    preprocessing: Preprocessing | None
    class_names: tuple[str, ...] | None = None  # subfolder names, index = label, when labels came from folders

    def __len__(self) -> int:
        return int(self.arrays.shape[0])

    def subset(self, index: np.ndarray, description: str) -> Samples:
        """The samples at ``index`` (in that order)."""
        labels = None if self.labels is None else self.labels[index]
        return replace(self, arrays=np.ascontiguousarray(self.arrays[index]), labels=labels,
                       description=description)


def fixed_shape(spec: TensorSpec) -> tuple[int, ...]:
    """The input shape with a dynamic batch axis fixed to 1 (other dynamic axes stay -1 = any size)."""
    shape = tuple(int(s) if s is not None else -1 for s in spec.shape)
    if shape and shape[0] in (-1, 0):
        shape = (1, *shape[1:])
    return shape


def _fmt(shape: tuple[int, ...]) -> str:
    if len(shape) == 1:
        return f"({shape[0]},)"
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _accepted_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """A sample may have the input shape, or the input shape without a leading batch axis of 1."""
    shapes = [shape]
    if len(shape) >= 2 and shape[0] == 1:
        shapes.append(shape[1:])
    return shapes


def _matches(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    return len(actual) == len(expected) and all(e == -1 or a == e for a, e in zip(actual, expected, strict=True))


def _expected_text(spec: TensorSpec, shape: tuple[int, ...]) -> str:
    return f"the model input {spec.name!r} expects " + " or ".join(_fmt(s) for s in _accepted_shapes(shape))


def _display(path: Path, root: Path) -> str:
    """A path shown relative to the parent of the source (``digits/3.npy``)."""
    try:
        return str(path.relative_to(root.parent))
    except ValueError:
        return str(path)


def _as_float(array: np.ndarray, where: str) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise CalibrationError(
            f"calibration data {where} has dtype {array.dtype}, which is not numeric",
            hint="save the samples as float32 (or integer) numpy arrays",
        )
    return np.asarray(array, dtype=np.float32)


def _one_sample(array: np.ndarray, spec: TensorSpec, shape: tuple[int, ...], where: str) -> np.ndarray:
    """One sample with or without the batch axis -> the input shape."""
    array = _as_float(array, where)
    full, *rest = _accepted_shapes(shape)
    if _matches(array.shape, full):
        return array
    if rest and _matches(array.shape, rest[0]):
        return array[None, ...]
    raise CalibrationError(
        f"calibration sample {where} has shape {_fmt(array.shape)}; {_expected_text(spec, shape)}",
        hint="save each sample with the model input's shape",
    )


def _stacked(array: np.ndarray, spec: TensorSpec, shape: tuple[int, ...], where: str) -> np.ndarray:
    """Samples stacked on a first axis -> (N, *input shape)."""
    array = _as_float(array, where)
    full, *rest = _accepted_shapes(shape)
    if array.ndim == len(full) + 1 and _matches(array.shape[1:], full):
        return array
    if rest and array.ndim == len(rest[0]) + 1 and _matches(array.shape[1:], rest[0]):
        return array[:, None, ...]
    raise CalibrationError(
        f"calibration array {where} has shape {_fmt(array.shape)}; the first axis counts the samples, and "
        f"{_expected_text(spec, shape)} per sample",
        hint="reshape the array to (samples, *input shape)",
    )


def _check_uniform(arrays: list[np.ndarray], names: list[str]) -> None:
    """Samples of an input with a dynamic axis must still agree with each other to be stacked."""
    first = arrays[0].shape
    for arr, name in zip(arrays, names, strict=True):
        if arr.shape != first:
            raise CalibrationError(
                f"calibration sample {name} has shape {_fmt(arr.shape)} but {names[0]} has {_fmt(first)}",
                hint="give every sample the same shape",
            )


def derive_preprocessing(spec: TensorSpec, shape: tuple[int, ...]) -> Preprocessing:
    """Image preprocessing guessed from a 4-D input shape: layout, channels and size; scale 1/255."""
    if len(shape) != 4:
        raise CalibrationError(
            f"images cannot feed the model input {spec.name!r} of shape {_fmt(shape)}: it is not a 4-D image "
            "tensor (N, C, H, W) or (N, H, W, C)",
            hint="give .npy/.npz calibration samples instead",
        )
    if shape[1] in (1, 3):
        layout, channels, h, w = "NCHW", shape[1], shape[2], shape[3]
    else:
        layout, channels, h, w = "NHWC", shape[3], shape[1], shape[2]
    if channels not in (1, 3) or h < 1 or w < 1:
        raise CalibrationError(
            f"cannot derive image preprocessing for the model input {spec.name!r} of shape {_fmt(shape)} "
            "(needs 1 or 3 channels and a fixed height and width)",
            hint="pass the preprocessing explicitly, or give .npy/.npz calibration samples",
        )
    return Preprocessing(size=(h, w), color="gray" if channels == 1 else "rgb", layout=layout,
                         scale=1.0 / 255.0, mean=(0.0,), std=(1.0,))


def _check_preprocessing(pre: Preprocessing, spec: TensorSpec, shape: tuple[int, ...]) -> None:
    h, w = pre.size
    want = (1, pre.channels, h, w) if pre.layout == "NCHW" else (1, h, w, pre.channels)
    if not _matches(want, shape):
        raise CalibrationError(
            f"the preprocessing makes images of shape {_fmt(want)} ({pre.layout}, {pre.color}, {h}x{w}) but "
            f"the model input {spec.name!r} expects {_fmt(shape)}",
            hint="fix the preprocessing size, color or layout to match the model input",
        )


def _read_image(path: Path, pre: Preprocessing, where: str) -> np.ndarray:
    import cv2

    flag = cv2.IMREAD_GRAYSCALE if pre.color == "gray" else cv2.IMREAD_COLOR
    image = cv2.imread(str(path), flag)
    if image is None:
        raise CalibrationError(f"calibration image {where} cannot be read (corrupt or not an image)",
                               hint="remove or replace the file")
    if image.dtype != np.uint8:
        raise CalibrationError(f"calibration image {where} has dtype {image.dtype}; 8-bit images are expected",
                               hint="save the images with 8 bits per channel")
    return image_to_tensor(image, pre)


def _kind(path: Path, where: str) -> str:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return "npy"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    raise CalibrationError(
        f"calibration file {where} is of an unknown type ({suffix or 'no suffix'}); "
        f"expected .npy or an image ({', '.join(IMAGE_SUFFIXES)})",
        hint="remove the file from the calibration folder",
    )


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _load_npy(path: Path, where: str, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {where} cannot be read as .npy: {e}",
                               hint="save it with numpy.save") from e


def _load_folder(root: Path, spec: TensorSpec, shape: tuple[int, ...],
                 pre: Preprocessing | None) -> Samples:
    entries = _visible(root)
    dirs = [p for p in entries if p.is_dir()]
    files = [p for p in entries if not p.is_dir()]
    if dirs and files:
        raise CalibrationError(
            f"calibration folder {root} mixes files ({files[0].name}, ...) and class subfolders "
            f"({dirs[0].name}, ...)",
            hint="put every sample in a class subfolder, or use a flat folder without subfolders",
        )
    groups: list[tuple[str | None, list[Path]]] = (
        [(d.name, _visible(d)) for d in dirs] if dirs else [(None, files)]
    )
    for _, group in groups:
        nested = [p for p in group if p.is_dir()]
        if nested:
            raise CalibrationError(
                f"calibration folder {_display(nested[0], root)} is nested too deep: class subfolders must "
                "hold the samples directly",
                hint="use SOURCE/<class name>/<sample file>",
            )
    paths = [(label, p) for label, group in groups for p in group]
    if not paths:
        raise CalibrationError(f"calibration folder {root} contains no samples",
                               hint=_HINT_SOURCE)
    kinds = {_kind(p, _display(p, root)) for _, p in paths}
    if len(kinds) > 1:
        raise CalibrationError(f"calibration folder {root} mixes .npy files and images",
                               hint="use one kind of sample per folder")
    kind = kinds.pop()
    derived = False
    if kind == "image":
        if pre is None:
            pre = derive_preprocessing(spec, shape)
            derived = True
        else:
            _check_preprocessing(pre, spec, shape)
    arrays: list[np.ndarray] = []
    names: list[str] = []
    for _, p in paths:
        where = _display(p, root)
        if kind == "npy":
            arrays.append(_one_sample(_load_npy(p, where), spec, shape, where))
        else:
            assert pre is not None
            arrays.append(_one_sample(_read_image(p, pre, where), spec, shape, where))
        names.append(where)
    _check_uniform(arrays, names)
    class_names = tuple(d.name for d in dirs) or None
    labels = None
    if dirs:
        index = {name: i for i, name in enumerate(class_names or ())}
        labels = np.asarray([index[label] for label, _ in paths], dtype=np.int64)
    what = "images" if kind == "image" else ".npy files"
    description = f"{len(arrays)} {what} from {root}"
    if class_names:
        description += f", labels from {len(class_names)} class subfolders ({', '.join(class_names[:10])}"
        description += ", ...)" if len(class_names) > 10 else ")"
    if derived:
        assert pre is not None
        description += (f"; preprocessing derived from the input shape {_fmt(shape)}: {pre.layout}, {pre.color}, "
                        f"{pre.size[0]}x{pre.size[1]}, scale 1/255, mean 0, std 1 "
                        "(give the preprocessing explicitly if the model was trained otherwise)")
    return Samples(np.stack(arrays), labels, description, pre if kind == "image" else None, class_names)


def _labels(y: Any, n: int, where: str) -> np.ndarray:
    y = np.asarray(y)
    if y.dtype.kind not in "biu" or y.reshape(-1).shape[0] != n:
        raise CalibrationError(
            f"labels {where} must be {n} integers (one per sample), got shape {_fmt(y.shape)} dtype {y.dtype}",
            hint="store class indices as an integer array 'y' of shape (samples,)",
        )
    return y.reshape(-1).astype(np.int64)


def _load_npz(path: Path, spec: TensorSpec, shape: tuple[int, ...]) -> Samples:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise CalibrationError(f"calibration file {path} cannot be read as .npz: {e}",
                               hint="save it with numpy.savez(path, x=samples, y=labels)") from e
    if "x" in arrays:
        key = "x"
    elif spec.name in arrays:
        key = spec.name
    elif len(arrays) == 1:
        key = next(iter(arrays))
    else:
        raise CalibrationError(
            f"calibration file {path} has arrays {', '.join(sorted(arrays)) or '(none)'}; expected 'x' "
            f"(and 'y' for labels), the input name {spec.name!r}, or a single array",
            hint="save it with numpy.savez(path, x=samples, y=labels)",
        )
    x = _stacked(arrays[key], spec, shape, f"{path}[{key!r}]")
    labels = _labels(arrays["y"], len(x), f"{path}['y']") if key == "x" and "y" in arrays else None
    text = f"{len(x)} samples from {path} (array {key!r}{', labels from y' if labels is not None else ''})"
    return Samples(x, labels, text, None)


# --------------------------------------------------------------------------------------------------
# CSV


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of every non-blank row; the file is UTF-8 with or without a BOM."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return [(i, [c.strip() for c in row]) for i, row in enumerate(csv.reader(f), start=1)
                    if any(c.strip() for c in row)]
    except UnicodeDecodeError as e:
        raise CalibrationError(f"calibration file {path} is not UTF-8 text ({e.reason} at byte {e.start})",
                               hint="save the CSV as UTF-8") from e
    except (OSError, csv.Error) as e:
        raise CalibrationError(f"calibration file {path} cannot be read as CSV: {e}", hint=_HINT_CSV) from e


def _label_index(label_column: str | int, header: list[str] | None, width: int, path: Path) -> int:
    """The 0-based column of the labels: an index (negative counts from the end) or a header name."""
    if isinstance(label_column, str):
        name = label_column.strip()
        if header is not None and name in header:
            return header.index(name)
        try:
            label_column = int(name)
        except ValueError:
            columns = (f"its header has {', '.join(repr(h) for h in header[:12])}" if header
                       else "it has no header row")
            raise CalibrationError(
                f"label column {name!r} is not a column of {path}: {columns}",
                hint="give the label column as a 0-based index or as a name from the header row",
            ) from None
    if isinstance(label_column, bool) or not -width <= label_column < width:
        raise CalibrationError(f"label column {label_column!r} is out of range for {path}, whose rows have "
                               f"{width} columns (0..{width - 1})",
                               hint="give the label column as a 0-based index or a header name")
    return label_column % width


def _load_csv(path: Path, spec: TensorSpec, shape: tuple[int, ...], label_column: str | int | None) -> Samples:
    if any(d == -1 for d in shape):
        raise CalibrationError(
            f"a CSV row cannot feed the model input {spec.name!r} of shape {_fmt(shape)}: its size is not fixed",
            hint="give .npy/.npz calibration samples instead",
        )
    rows = _read_csv_rows(path)
    if not rows:
        raise CalibrationError(f"calibration source {path} contains zero samples (the CSV file is empty); "
                               f"{_expected_text(spec, shape)}", hint=_HINT_CSV)
    header: list[str] | None = None
    if not all(_is_number(c) for c in rows[0][1]):
        header = rows[0][1]
        rows = rows[1:]
    if not rows:
        raise CalibrationError(f"calibration source {path} contains zero samples (only a header row)",
                               hint=_HINT_CSV)
    width = len(rows[0][1]) if header is None else len(header)
    for line, cells in rows:
        if len(cells) != width:
            raise CalibrationError(f"calibration file {path}, line {line}: {len(cells)} columns where the "
                                   f"{'header' if header is not None else 'first row'} has {width}",
                                   hint="give every row the same number of columns")
    label_at = None if label_column is None else _label_index(label_column, header, width, path)
    expected = int(np.prod(shape))
    features = width - (label_at is not None)
    if features != expected:
        with_label = (f"{width} columns minus label column {label_at} leave {features} values"
                      if label_at is not None else f"{width} columns (no label column) give {features} values")
        raise CalibrationError(
            f"calibration file {path} has {len(rows)} rows of {width} columns: {with_label} per row, but "
            f"{_expected_text(spec, shape)}, i.e. {expected} values per row",
            hint=("name the label column with --label-column N|NAME"
                  if label_at is None and features == expected + 1
                  else f"give rows of {expected} values (plus the label column, if any)"),
        )
    keep = [i for i in range(width) if i != label_at]
    try:
        table = np.array([[float(cells[i]) for i in range(width)] for _, cells in rows], dtype=np.float64)
    except ValueError:
        line, cells = next((ln, c) for ln, c in rows if not all(_is_number(x) for x in c))
        bad = next(x for x in cells if not _is_number(x))
        raise CalibrationError(f"calibration file {path}, line {line}: {bad!r} is not a number",
                               hint="every cell except the header row must be numeric") from None
    labels = None
    if label_at is not None:
        raw = table[:, label_at]
        bad_rows = np.flatnonzero(~np.isfinite(raw) | (raw != np.round(raw)) | (raw < 0))
        if bad_rows.size:
            line = rows[int(bad_rows[0])][0]
            raise CalibrationError(
                f"calibration file {path}, line {line}: label {rows[int(bad_rows[0])][1][label_at]!r} in column "
                f"{label_at} is not a class index (an integer >= 0)",
                hint="store class indices 0, 1, 2, ... in the label column",
            )
        labels = raw.astype(np.int64)
    x = table[:, keep].astype(np.float32).reshape(len(rows), *shape)
    text = f"{len(rows)} rows from {path}"
    if header is not None:
        text += " (header row skipped)"
    if label_at is not None:
        name = f" {header[label_at]!r}" if header is not None else ""
        text += f", labels from column {label_at}{name}"
    return Samples(x, labels, text, None)


def load_samples(source: str | Path, spec: TensorSpec, preprocessing: Preprocessing | None, *,
                 label_column: str | int | None = None) -> Samples:
    """Every sample of ``source`` as float32 (N, *input shape); see the module doc for the sources.

    ``label_column`` (an index or a header name) names the label column of a CSV source; it is an error
    for other sources, whose labels come from class subfolders or an .npz array ``y``.
    """
    root = Path(source)
    shape = fixed_shape(spec)
    if not root.exists():
        raise CalibrationError(f"calibration source {root} does not exist", hint=_HINT_SOURCE)
    is_csv = root.is_file() and root.suffix.lower() == ".csv"
    if label_column is not None and not is_csv:
        raise CalibrationError(
            f"a label column ({label_column!r}) applies to a .csv calibration source only; {root} is not one",
            hint="drop --label-column: folders take labels from class subfolders, .npz files from array 'y'",
        )
    if is_csv:
        samples = _load_csv(root, spec, shape, label_column)
    elif root.is_dir():
        samples = _load_folder(root, spec, shape, preprocessing)
    elif root.suffix.lower() == ".npy":
        # memory-mapped: only the samples drawn from it are read into memory (see Samples.subset)
        x = _stacked(_load_npy(root, str(root), mmap=True), spec, shape, str(root))
        samples = Samples(x, None, f"{len(x)} samples from {root}", None)
    elif root.suffix.lower() == ".npz":
        samples = _load_npz(root, spec, shape)
    else:
        raise CalibrationError(
            f"calibration source {root} is of an unknown type ({root.suffix or 'no suffix'})",
            hint=_HINT_SOURCE,
        )
    if len(samples) == 0:
        raise CalibrationError(f"calibration source {root} contains zero samples; "
                               f"{_expected_text(spec, shape)}", hint=_HINT_SOURCE)
    arrays = np.ascontiguousarray(samples.arrays, dtype=np.float32)  # a memory map stays one when float32
    if not all(np.isfinite(arrays[i:i + 256]).all() for i in range(0, len(arrays), 256)):
        raise CalibrationError(f"calibration source {root} contains NaN or infinite values",
                               hint="clean the samples; quantization ranges would be meaningless")
    return replace(samples, arrays=arrays)


def split(samples: Samples, calib_count: int, val_count: int, seed: int) -> tuple[Samples, Samples, dict]:
    """Disjoint calibration and validation subsets drawn with a seeded shuffle.

    Calibration takes up to ``calib_count`` samples (leaving at least one for validation); validation
    takes what remains, up to ``val_count``. The dict records the counts, the seed and the sha256 of the
    calibration arrays, and ``notes`` when fewer samples than asked for were available.
    """
    n = len(samples)
    if n < 2:
        raise CalibrationError(
            f"need at least 2 samples (1 for calibration, 1 for validation); {samples.description} gives {n}",
            hint="add more samples to the calibration source",
        )
    if calib_count < 1 or val_count < 1:
        raise CalibrationError(f"calibration and validation counts must be at least 1, got {calib_count} "
                               f"and {val_count}")
    order = np.random.default_rng(seed).permutation(n)
    n_cal = min(calib_count, n - 1)
    n_val = min(val_count, n - n_cal)
    cal_idx, val_idx = order[:n_cal], order[n_cal:n_cal + n_val]
    calib = samples.subset(cal_idx, f"{n_cal} calibration samples drawn from {samples.description}")
    val = samples.subset(val_idx, f"{n_val} validation samples drawn from {samples.description}")
    notes = []
    if n_cal < calib_count:
        notes.append(f"calibration used {n_cal} samples, not the {calib_count} the profile asks for: the "
                     f"source has only {n} and at least 1 is kept for validation")
    if n_val < val_count:
        notes.append(f"validation used {n_val} samples, not the {val_count} the profile asks for: the source "
                     f"has only {n} and calibration took {n_cal}")
    info = {
        "count": n_cal,
        "validation_count": n_val,
        "available": n,
        "seed": seed,
        "sha256": hashlib.sha256(calib.arrays.tobytes()).hexdigest(),
        "source": samples.description,
        "notes": notes,
    }
    return calib, val, info


def draw(samples: Samples, count: int, seed: int, what: str) -> tuple[Samples, list[str]]:
    """Up to ``count`` samples drawn with a seeded shuffle (all of them, in order, when there are fewer).

    For a validation (or calibration) source given on its own, not split from another one. The notes say
    when fewer samples than asked for were available.
    """
    if count < 1:
        raise CalibrationError(f"the {what} count must be at least 1, got {count}")
    n = len(samples)
    if n <= count:
        index = np.arange(n)
    else:
        index = np.sort(np.random.default_rng(seed).permutation(n)[:count])
    notes = []
    if n < count:
        notes.append(f"{what} used {n} samples, not the {count} the profile asks for: the source has only {n}")
    drawn = samples.subset(index, f"{len(index)} {what} samples drawn from {samples.description}")
    return drawn, notes


def sha256_of(samples: Samples) -> str:
    """sha256 of the sample arrays (what the report records for the calibration set)."""
    return hashlib.sha256(np.ascontiguousarray(samples.arrays).tobytes()).hexdigest()
