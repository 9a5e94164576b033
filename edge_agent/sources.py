"""Input sources: where the agent's inference inputs come from.

``open_source(spec, inputs, preprocessing)`` parses a source spec:

* ``synthetic`` — a small pool of random samples matching every input (shape, dtype), generated once and
  cycled, so the loop draws no random numbers; int8/uint8 inputs get full-range random integers;
* ``npy:PATH`` — a ``.npy`` array for a one-input model (one sample, with or without the batch axis, or a
  stack of samples along axis 0), or an ``.npz`` with one such array per input name; cycled. Float data for
  int8/uint8 inputs is quantized with the input's scale and zero point;
* ``images:DIR`` — the images of a folder (sorted by name), read with OpenCV and turned into tensors with
  the bundle's recorded preprocessing; loaded lazily, cached up to a byte bound, cycled.

``next()`` returns the feeds in model-input order. The arrays may be shared between calls: a backend must
not modify its inputs. Every problem is a ``SourceError`` (exit code 2) naming the file and the shapes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.errors import InputError, SourceError, missing_extra
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import Preprocessing, image_to_tensor, quantize

KINDS = ("synthetic", "npy:PATH", "images:DIR")
SYNTHETIC_POOL = 16
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".pgm", ".ppm", ".tif", ".tiff")
IMAGE_CACHE_BYTES = 256 * 2**20
_INT_DTYPES = ("int8", "uint8", "int16", "int32", "int64")


class Source(Protocol):
    def next(self) -> list[np.ndarray]:
        """The next feeds, one array per model input, in model-input order."""
        ...

    def close(self) -> None:
        ...


def _concrete(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A model shape with dynamic dimensions (-1) set to 1."""
    return tuple(1 if d < 0 else d for d in shape)


def _matches(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(got) == len(want) and all(w < 0 or g == w for g, w in zip(got, want, strict=True))


def _fmt(shape: Sequence[int]) -> str:
    return "(" + ", ".join("?" if d < 0 else str(d) for d in shape) + ")"


def _closed() -> list[np.ndarray]:
    raise SourceError("the source is closed")


class _Cycle:
    """Cycles through a fixed list of feed lists.

    ``next`` is itertools.cycle's C-level ``__next__`` (about 100 ns cheaper per call than a Python
    method, which matters for models that run in tens of microseconds).
    """

    def __init__(self, pool: list[list[np.ndarray]]) -> None:
        self._n = len(pool)
        self.next: Callable[[], list[np.ndarray]] = itertools.cycle(pool).__next__

    def __len__(self) -> int:
        return self._n

    def close(self) -> None:
        self.next = _closed


# --------------------------------------------------------------------------------------------------
# synthetic


def _random_tensor(rng: np.random.Generator, spec: TensorSpec) -> np.ndarray:
    shape = _concrete(spec.shape)
    dt = np.dtype(spec.dtype)
    if spec.dtype in _INT_DTYPES:
        info = np.iinfo(dt)
        lo, hi = (info.min, info.max) if dt.itemsize == 1 else (0, 255)
        return rng.integers(lo, hi, size=shape, endpoint=True, dtype=dt)
    if spec.dtype == "bool":
        return rng.integers(0, 1, size=shape, endpoint=True).astype(bool)
    return rng.standard_normal(shape, dtype=np.float32).astype(dt)


def synthetic_source(inputs: Sequence[TensorSpec], seed: int = 0, pool: int = SYNTHETIC_POOL) -> _Cycle:
    rng = np.random.default_rng(seed)
    return _Cycle([[_random_tensor(rng, spec) for spec in inputs] for _ in range(pool)])


# --------------------------------------------------------------------------------------------------
# npy / npz


def _to_dtype(arr: np.ndarray, spec: TensorSpec, file: Path) -> np.ndarray:
    want = np.dtype(spec.dtype)
    if arr.dtype == want:
        return arr
    if spec.dtype in ("int8", "uint8") and arr.dtype.kind == "f":
        if spec.scale is None or spec.zero_point is None:
            raise SourceError(f"{file}: float data for {spec.dtype} input {spec.name!r}, which has no "
                              "quantization scale/zero point in the manifest",
                              hint=f"give {spec.dtype} data, or rebuild the bundle with quantization parameters")
        return quantize(arr, spec.scale, spec.zero_point, spec.dtype)
    if want.kind in "iu" and arr.dtype.kind in "iu":
        info = np.iinfo(want)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise SourceError(f"{file}: values of {arr.dtype} data outside the range of {spec.dtype} "
                              f"input {spec.name!r}", hint=f"give {spec.dtype} data")
        return arr.astype(want)
    if want.kind == "f" and arr.dtype.kind in "fiub":
        return arr.astype(want)
    raise SourceError(f"{file}: {arr.dtype} data cannot feed the {spec.dtype} input {spec.name!r}",
                      hint=f"save the samples as {spec.dtype}")


def split_samples(arr: np.ndarray, spec: TensorSpec, file: Path) -> list[np.ndarray]:
    """One array -> samples shaped like ``spec`` (one sample, a sample without batch axis, or a stack)."""
    want = spec.shape
    if not want:
        if arr.ndim == 0:
            return [arr]
        return [a for a in arr]
    batch = want[0] if want[0] > 0 else 1
    if arr.ndim == len(want) and _matches(arr.shape[1:], want[1:]):
        n = arr.shape[0]
        if n == 0:
            raise SourceError(f"{file}: holds no samples (shape {tuple(arr.shape)})",
                              hint=f"save at least one sample of shape {_fmt(want)}")
        if n % batch:
            raise SourceError(f"{file}: {n} rows along axis 0 do not split into batches of {batch} for "
                              f"input {spec.name!r} of shape {_fmt(want)}")
        return [np.ascontiguousarray(arr[i:i + batch]) for i in range(0, n, batch)]
    if arr.ndim == len(want) - 1 and batch == 1 and _matches(arr.shape, want[1:]):
        return [np.ascontiguousarray(arr[None, ...])]
    stack = _fmt((-1, *want[1:])).replace("?", "N", 1)
    raise SourceError(
        f"{file}: shape {tuple(arr.shape)} does not fit input {spec.name!r} of shape {_fmt(want)}",
        hint=f"save one sample of shape {_fmt(want)}, or a stack of samples of shape {stack}",
    )


def npy_source(path: Path, inputs: Sequence[TensorSpec]) -> _Cycle:
    if not path.exists():
        raise SourceError(f"input file {path} does not exist", hint="check the path after npy:")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SourceError(f"{path}: not a readable .npy/.npz file: {e}",
                          hint="save the samples with numpy.save / numpy.savez") from e
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            missing = [s.name for s in inputs if s.name not in loaded.files]
            if missing:
                raise SourceError(f"{path}: no array for input(s) {', '.join(missing)} "
                                  f"(the file has {', '.join(loaded.files) or 'none'})",
                                  hint="name the arrays after the model inputs: numpy.savez(f, **{name: x})")
            arrays = {s.name: loaded[s.name] for s in inputs}
    else:
        if len(inputs) != 1:
            raise SourceError(f"{path}: a .npy file feeds a one-input model; this model has "
                              f"{len(inputs)} inputs ({', '.join(s.name for s in inputs)})",
                              hint="use an .npz file with one array per input name")
        arrays = {inputs[0].name: loaded}
    per_input = [[_to_dtype(a, spec, path) for a in split_samples(arrays[spec.name], spec, path)]
                 for spec in inputs]
    counts = {len(s) for s in per_input}
    if len(counts) != 1:
        raise SourceError(f"{path}: the inputs hold different numbers of samples "
                          f"({', '.join(f'{s.name}: {len(p)}' for s, p in zip(inputs, per_input, strict=True))})")
    return _Cycle([list(feeds) for feeds in zip(*per_input, strict=True)])


# --------------------------------------------------------------------------------------------------
# images


def _imread() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise missing_extra("opencv-python-headless", "vision", "the images: source") from e
    return cv2.imread


class ImageSource:
    """The images of a folder, preprocessed as the bundle says; cached up to ``cache_bytes``."""

    def __init__(self, folder: Path, inputs: Sequence[TensorSpec], preprocessing: dict[str, Any] | None,
                 cache_bytes: int = IMAGE_CACHE_BYTES) -> None:
        if len(inputs) != 1:
            raise SourceError(f"the images: source feeds one-input models; this model has {len(inputs)}",
                              hint="use npy: with an .npz file instead")
        if not preprocessing:
            raise SourceError("the bundle records no preprocessing, so images cannot be turned into inputs",
                              hint="rebuild the bundle with preprocessing (edgekit convert --size HxW "
                                   "--color ... --layout ...), or use --source npy:FILE with ready tensors")
        try:
            self._pre = Preprocessing.from_dict(preprocessing)
        except InputError as e:
            raise SourceError(f"the bundle's preprocessing is invalid: {e.message}") from e
        if not folder.is_dir():
            raise SourceError(f"image folder {folder} does not exist" if not folder.exists()
                              else f"{folder} is not a folder", hint="check the path after images:")
        # Subfolders too (a labelled set is laid out one folder per class); hidden entries are skipped.
        self._files = sorted(
            p for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        )
        if not self._files:
            raise SourceError(f"image folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), "
                              "not even in its subfolders")
        self._spec = inputs[0]
        self._imread = _imread()
        self._cache: dict[int, list[np.ndarray]] = {}
        self._cache_left = cache_bytes
        self._i = -1
        self._load(0)  # fail at open, not in the loop, when the first image does not fit the model

    def _load(self, i: int) -> list[np.ndarray]:
        path = self._files[i]
        image = self._imread(str(path), -1)  # IMREAD_UNCHANGED: keeps gray as gray, drops nothing
        if image is None:
            raise SourceError(f"{path}: OpenCV cannot read this image", hint="remove or replace the file")
        if image.dtype != np.uint8:
            raise SourceError(f"{path}: {image.dtype} image; expected 8-bit", hint="save it as 8-bit")
        x = image_to_tensor(image, self._pre)
        if not _matches(x.shape, self._spec.shape):
            raise SourceError(f"{path}: preprocessed to shape {x.shape}, but input {self._spec.name!r} "
                              f"has shape {_fmt(self._spec.shape)}",
                              hint="the bundle's preprocessing does not match its model; rebuild it")
        feeds = [_to_dtype(x, self._spec, path)]
        if feeds[0].nbytes <= self._cache_left:
            self._cache[i] = feeds
            self._cache_left -= feeds[0].nbytes
        return feeds

    def __len__(self) -> int:
        return len(self._files)

    def next(self) -> list[np.ndarray]:
        self._i = (self._i + 1) % len(self._files)
        feeds = self._cache.get(self._i)
        return feeds if feeds is not None else self._load(self._i)

    def close(self) -> None:
        self._cache.clear()


# --------------------------------------------------------------------------------------------------


def open_source(spec: str, inputs: Sequence[TensorSpec], preprocessing: dict[str, Any] | None,
                seed: int = 0) -> Source:
    """Open the source ``spec`` (``synthetic``, ``npy:PATH``, ``images:DIR``) for a model's inputs."""
    kind, sep, arg = spec.partition(":")
    if kind == "synthetic" and not sep:
        return synthetic_source(inputs, seed=seed)
    if kind == "npy" and arg:
        return npy_source(Path(arg).expanduser(), inputs)
    if kind == "images" and arg:
        return ImageSource(Path(arg).expanduser(), inputs, preprocessing)
    if kind in ("npy", "images"):
        raise SourceError(f"source {spec!r} needs a path: {kind}:PATH")
    raise SourceError(f"unknown source {spec!r}; kinds: {', '.join(KINDS)}",
                      hint="e.g. --source synthetic, --source npy:samples.npy, --source images:./frames")
