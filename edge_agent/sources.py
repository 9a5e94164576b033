"""Input sources: where the agent's inference inputs come from.

``open_source(spec, inputs, preprocessing, seed, stop=None)`` parses a source spec:

* ``synthetic`` — a small pool of random samples matching every input (shape, dtype), generated once and
  cycled, so the loop draws no random numbers; int8/uint8 inputs get full-range random integers;
* ``npy:PATH`` — a ``.npy`` array for a one-input model (one sample, with or without the batch axis, or a
  stack of samples along axis 0), or an ``.npz`` with one such array per input name; cycled. Float data for
  int8/uint8 inputs is quantized with the input's scale and zero point;
* ``images:DIR`` — the images of a folder (sorted by name), read with OpenCV and turned into tensors with
  the bundle's recorded preprocessing; loaded lazily, cached up to a byte bound, cycled;
* ``video:PATH[?loop=0]`` — the frames of a video file (OpenCV: FFmpeg or its own MJPEG reader),
  preprocessed like images, delivered as fast as the model takes them (no real-time pacing). At the end
  of the file the source starts again from the first frame (``loop=1``, the default); with ``loop=0``
  ``next()`` raises ``SourceEnded`` (see below);
* ``camera:N`` / ``camera:/dev/videoN`` — a V4L2 camera by index or device node (on Linux; other
  systems let OpenCV choose the backend). The driver queue is set to one buffer, so a model slower than
  the camera gets a fresh frame, not one queued seconds ago;
* ``rtsp://...``, ``rtsps://...``, ``http://...``, ``https://...`` — a network stream through OpenCV's
  FFmpeg backend, with open and read timeouts of ``STREAM_TIMEOUT_S``. Credentials in the URL never
  appear in logs or errors;
* ``serial:PORT[?baud=115200][&window=N[&hop=H]]`` — line-based CSV samples from a serial port (a device
  path or any pyserial URL such as ``loop://`` or ``rfc2217://host:port``), for non-vision models.
  Each line holds numbers separated by commas (white space around them allowed) or by white space; an
  empty field (``1,,3`` or a trailing comma) makes the line bad. Without ``window`` one line is one
  sample: it must hold exactly as many values as the input has elements, and is reshaped to the input
  shape (row-major). With ``window=N`` each line is one time step of K values (K = elements / N, e.g.
  an accelerometer's x,y,z), and N consecutive lines form one sample: a (N, K) array, fed to an input
  laid out (…, N, K) or flat (…, N*K), or transposed for an input laid out (…, K, N). Windows slide by
  ``hop`` lines (default N: no overlap; ``hop`` > N skips lines between windows). Blank lines are
  ignored. A line that is not numbers (a header, garbage, a line cut by a lost byte), holds a
  non-finite value, has the wrong number of values or is longer than ``MAX_LINE_BYTES`` is skipped and
  counted in ``bad_lines`` (logged the 1st, 10th, 100th… time); a window is not reset by a bad line
  (one lost time step), but is after a reconnect. Float values are quantized for int8/uint8 inputs.

``next()`` returns the feeds in model-input order. The arrays may be shared between calls: a backend must
not modify its inputs. Every problem is a ``SourceError`` (exit code 2) naming the file and the shapes.

Live sources (cameras, streams, serial ports) never fail the run on a device hiccup. When a read fails
(``cap.read()`` gives no frame; the serial port raises), ``next()`` closes the device and reopens it
with exponential back-off (0.5 s, 1 s, 2 s … capped at 10 s, reset after a success), logging the loss,
each failed attempt and the recovery, and returns once it has a sample again: it blocks for as long as
the outage lasts. Meanwhile ``healthy`` is False. The counters ``frames`` / ``samples``,
``dropped_frames`` (reads that returned no frame), ``bad_lines``, ``reconnects`` (successful reopenings)
and ``reconnect_attempts`` are attributes, and ``stats()`` returns them as a dict for telemetry. A
serial source also turns ``healthy`` False when no valid line arrived for ``SILENCE_S``.

The end of a run: ``next()`` raises ``SourceEnded`` (a ``SourceError``; ``reason`` says why) when a
``loop=0`` video ends (``"end"``), when the ``stop`` event given to ``open_source`` is set while a live
source waits for its device or its data (``"stopped"``), and after ``close()`` (``"closed"``). A run
loop catches it around its inference loop and finishes cleanly (last window, exit 0). Pass the agent's
stop event as ``stop``: the back-off waits on it, so SIGTERM ends a run whose camera is unplugged at
once (or after the read in progress: V4L2 gives up after about 10 s, a stream after
``STREAM_TIMEOUT_S``; a serial read after ``READ_TIMEOUT_S``). Without it such a ``next()`` waits for
the device. A live source asked again after ``"stopped"`` (the event cleared) resumes reconnecting.
Sources are not thread-safe: call ``next()`` from one thread; set ``stop`` from anywhere.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from edge_agent.errors import InputError, MissingDependencyError, SourceError, missing_extra
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import Preprocessing, image_to_input, image_to_tensor, quantize

log = logging.getLogger(__name__)

KINDS = ("synthetic", "npy:PATH", "images:DIR", "video:PATH[?loop=0]", "camera:N|/dev/videoN",
         "rtsp://|http(s)://URL", "serial:PORT[?baud=B&window=N&hop=H]")
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 10.0
STREAM_TIMEOUT_S = 10.0  # FFmpeg open and read timeouts of a network stream
SERIAL_BAUD = 115200
READ_TIMEOUT_S = 0.2  # a serial read returns at least this often, to look at the stop event
SILENCE_S = 10.0  # a serial source without a valid line for this long is not healthy
MAX_LINE_BYTES = 64 * 1024
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


def _to_dtype(arr: np.ndarray, spec: TensorSpec, file: Path | str) -> np.ndarray:
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


def _cv2(what: str) -> Any:
    try:
        import cv2
    except ImportError as e:
        raise missing_extra("opencv-python-headless", "vision", what) from e
    return cv2


def _imread() -> Any:
    return _cv2("the images: source").imread


def _image_input(kind: str, inputs: Sequence[TensorSpec],
                 preprocessing: dict[str, Any] | None) -> tuple[TensorSpec, Preprocessing]:
    """The one input an image source feeds, and the bundle's preprocessing for it."""
    if len(inputs) != 1:
        raise SourceError(f"the {kind} source feeds one-input models; this model has {len(inputs)}",
                          hint="use npy: with an .npz file instead")
    if not preprocessing:
        raise SourceError("the bundle records no preprocessing, so images cannot be turned into inputs",
                          hint="rebuild the bundle with preprocessing (edgekit convert --size HxW "
                               "--color ... --layout ...), or use --source npy:FILE with ready tensors")
    try:
        return inputs[0], Preprocessing.from_dict(preprocessing)
    except InputError as e:
        raise SourceError(f"the bundle's preprocessing is invalid: {e.message}") from e


def _preprocess(image: np.ndarray, pre: Preprocessing, spec: TensorSpec) -> np.ndarray:
    """An image -> the input tensor: for an int8/uint8 input with quantization parameters already in its
    dtype (``image_to_input``: normalise and quantize in one table look-up, the same values as
    ``quantize(image_to_tensor(...))``); otherwise float32, which ``_to_dtype`` converts or rejects."""
    if spec.dtype in ("int8", "uint8") and spec.scale is not None and spec.zero_point is not None:
        return image_to_input(image, pre, spec)
    return image_to_tensor(image, pre)


class ImageSource:
    """The images of a folder, preprocessed as the bundle says; cached up to ``cache_bytes``."""

    def __init__(self, folder: Path, inputs: Sequence[TensorSpec], preprocessing: dict[str, Any] | None,
                 cache_bytes: int = IMAGE_CACHE_BYTES) -> None:
        self._spec, self._pre = _image_input("images:", inputs, preprocessing)
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
        x = _preprocess(image, self._pre, self._spec)
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
# live sources: the end signal, back-off, spec options


class SourceEnded(SourceError):
    """``next()`` has no more samples: ``reason`` is "end" (a ``loop=0`` video ended), "stopped" (the
    stop event was set while waiting for a device) or "closed". Not a failure: end the run cleanly."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, hint=None if reason != "end" else "use video:PATH (it loops by default) "
                                                                    "to run for longer than the file")
        self.reason = reason


def backoff_delays(start: float = BACKOFF_START_S, cap: float = BACKOFF_MAX_S) -> Iterator[float]:
    """The waits before successive reconnect attempts: start, 2×start, 4×start … capped at ``cap``."""
    delay = start
    while True:
        yield delay
        delay = min(delay * 2.0, cap)


class _Waiter:
    """Back-off sleeps that end early when the run stops; ``sleep`` is injectable (tests: no real wait)."""

    def __init__(self, name: str, stop: threading.Event | None,
                 sleep: Callable[[float], object] | None) -> None:
        self._name = name
        self._stop = stop
        self._sleep = sleep
        self.closed = threading.Event()

    def check(self) -> None:
        if self.closed.is_set():
            raise SourceEnded(f"{self._name}: the source is closed", reason="closed")
        if self._stop is not None and self._stop.is_set():
            raise SourceEnded(f"{self._name}: stopped while waiting for the device", reason="stopped")

    def wait(self, seconds: float) -> None:
        self.check()
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            (self._stop if self._stop is not None else self.closed).wait(seconds)
        self.check()


def _is_power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def _options(spec: str, arg: str, allowed: Sequence[str]) -> tuple[str, dict[str, str]]:
    """``PATH?k=v&k2=v2`` -> (PATH, {k: v}); unknown or repeated options are errors."""
    base, sep, query = arg.rpartition("?")
    if not sep:
        return arg, {}
    opts: dict[str, str] = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or key not in allowed:
            raise SourceError(f"source {spec!r}: unknown option {part!r}",
                              hint=f"options: {', '.join(f'{a}=…' for a in allowed) or 'none'}")
        if key in opts:
            raise SourceError(f"source {spec!r}: option {key!r} given twice")
        opts[key] = value
    return base, opts


def _is_decimal(text: str) -> bool:
    return text.isascii() and text.isdigit()


def _int_option(spec: str, opts: dict[str, str], key: str, default: int | None,
                minimum: int = 1) -> int | None:
    text = opts.get(key)
    if text is None:
        return default
    if not _is_decimal(text) or int(text) < minimum:
        raise SourceError(f"source {spec!r}: {key}={text!r} is not an integer >= {minimum}")
    return int(text)


def _redact(url: str) -> str:
    """A URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


# --------------------------------------------------------------------------------------------------
# video files, cameras, network streams (OpenCV VideoCapture)


class Capture(Protocol):
    """What the capture source needs of ``cv2.VideoCapture`` (a fake in tests)."""

    def isOpened(self) -> bool:
        ...

    def read(self) -> tuple[bool, np.ndarray | None]:
        ...

    def release(self) -> None:
        ...


CaptureOpener = Callable[[int | str], Capture]


def opencv_opener(kind: str) -> CaptureOpener:
    """``cv2.VideoCapture`` with the backend and options for ``kind`` ("video", "camera", "stream")."""
    cv2 = _cv2(f"the {kind} source")
    params: list[int] = []
    if kind == "camera":
        api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
    elif kind == "stream":
        ms = int(STREAM_TIMEOUT_S * 1000)
        api, params = cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
    else:
        api = cv2.CAP_ANY

    def open_capture(target: int | str) -> Capture:
        try:
            cap = cv2.VideoCapture(target, api, params)
        except cv2.error as e:
            raise SourceError(f"OpenCV cannot open {_redact(str(target))}: {e}") from e
        if kind == "camera" and cap.isOpened() and not cap.set(cv2.CAP_PROP_BUFFERSIZE, 1):
            log.info("camera %s: the driver keeps its own frame queue (buffer size 1 refused); frames may "
                     "lag when the model is slower than the camera", target)
        return cap

    return open_capture


class CaptureSource:
    """Frames of a video file, camera or network stream, preprocessed as the bundle says.

    ``kind`` is "video" (a file: EOF rewinds, or ends with ``loop=False``), "camera" or "stream" (live:
    a failed read reconnects with back-off, see the module docstring). ``opener`` makes a capture for
    ``target`` (default ``opencv_opener(kind)``); it returns an object like ``cv2.VideoCapture`` or
    raises ``SourceError``. ``sleep`` and ``clock`` are injectable for tests.
    """

    def __init__(self, target: int | str, kind: str, inputs: Sequence[TensorSpec],
                 preprocessing: dict[str, Any] | None, *, loop: bool = True,
                 opener: CaptureOpener | None = None, stop: threading.Event | None = None,
                 sleep: Callable[[float], object] | None = None, clock: Callable[[], float] = time.monotonic,
                 backoff: tuple[float, float] = (BACKOFF_START_S, BACKOFF_MAX_S)) -> None:
        if kind not in ("video", "camera", "stream"):
            raise ValueError(f"unknown capture kind {kind!r}")
        self.kind = kind
        self.live = kind != "video"
        self.loop = loop
        self.name = {"video": "video file ", "camera": "camera ", "stream": "stream "}[kind] + \
            _redact(str(target))
        self._spec, self._pre = _image_input(f"{kind}:" if kind != "stream" else "stream", inputs, preprocessing)
        if kind == "video" and not Path(str(target)).is_file():
            raise SourceError(f"video file {target} does not exist" if not Path(str(target)).exists()
                              else f"{target} is not a file", hint="check the path after video:")
        self._target = target
        self._opener = opener if opener is not None else opencv_opener(kind)
        self._waiter = _Waiter(self.name, stop, sleep)
        self._clock = clock
        self._backoff = backoff
        self.frames = 0  # frames delivered
        self.dropped_frames = 0  # reads that returned no frame (live sources)
        self.reconnects = 0  # successful reopenings after a failed read
        self.reconnect_attempts = 0
        self.loops = 0  # rewinds of a video file
        self.healthy = True
        self._ended = False
        self._cap: Capture | None = self._open()
        try:
            # the first frame is read at open (a source that cannot feed the model fails here, not in
            # the loop) and is the first one next() returns
            self._pending: list[np.ndarray] | None = self._first_feeds()
        except SourceError:
            self._release()
            raise
        self.frames = 1

    def _first_feeds(self) -> list[np.ndarray]:
        frame = self._read()
        if frame is None:
            raise SourceError(f"{self.name}: opened, but gave no frame",
                              hint="check that the file is a video OpenCV can decode (ffprobe FILE)"
                              if self.kind == "video" else "check that the device delivers video (e.g. ffplay)")
        feeds = self._feeds(frame)
        if not _matches(feeds[0].shape, self._spec.shape):
            raise SourceError(f"{self.name}: frames preprocess to shape {feeds[0].shape}, but input "
                              f"{self._spec.name!r} has shape {_fmt(self._spec.shape)}",
                              hint="the bundle's preprocessing does not match its model; rebuild it")
        return feeds

    def _open(self) -> Capture:
        cap = self._opener(self._target)
        if not cap.isOpened():
            cap.release()
            hint = {"video": "check that OpenCV can decode the file (opencv-python-headless reads it "
                             "through FFmpeg)",
                    "camera": "check that the device exists (v4l2-ctl --list-devices), is not used by "
                              "another process, and that the agent's user is in the 'video' group",
                    "stream": "check the URL, the credentials and that the camera is reachable"}[self.kind]
            raise SourceError(f"cannot open {self.name}", hint=hint)
        return cap

    def _read(self) -> np.ndarray | None:
        assert self._cap is not None
        ok, frame = self._cap.read()
        return frame if ok and frame is not None and frame.size else None

    def _release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def _feeds(self, frame: np.ndarray) -> list[np.ndarray]:
        if frame.dtype != np.uint8:
            raise SourceError(f"{self.name}: {frame.dtype} frames; expected 8-bit")
        try:
            x = _preprocess(frame, self._pre, self._spec)
        except InputError as e:
            raise SourceError(f"{self.name}: {e.message}") from e
        return [_to_dtype(x, self._spec, self.name)]

    def next(self) -> list[np.ndarray]:
        if self._pending is not None:
            feeds, self._pending = self._pending, None
            return feeds
        if self._ended:
            raise SourceEnded(f"{self.name} ended after {self.frames} frames", reason="end")
        if self._cap is None:  # closed, or a reconnect ended by the stop event, or a failed rewind
            self._waiter.check()
            if not self.live:
                raise SourceError(f"{self.name} is not open: rewinding it failed before")
            frame = self._reopen(self._clock())
        else:
            frame = self._read()
            if frame is None:
                frame = self._reconnect() if self.live else self._rewind()
        self.frames += 1
        return self._feeds(frame)

    def _rewind(self) -> np.ndarray:
        self._release()
        if not self.loop:
            self._ended = True
            raise SourceEnded(f"{self.name} ended after {self.frames} frames", reason="end")
        self._cap = self._open()
        frame = self._read()
        if frame is None:
            self._release()
            raise SourceError(f"{self.name}: no frame after rewinding to the start",
                              hint="the file was replaced or truncated while the agent ran")
        self.loops += 1
        return frame

    def _reconnect(self) -> np.ndarray:
        self.dropped_frames += 1
        self.healthy = False
        self._release()
        log.warning("%s: no frame; reconnecting (back-off %g s to %g s)", self.name, *self._backoff)
        return self._reopen(self._clock())

    def _reopen(self, lost: float) -> np.ndarray:
        """Reopen with back-off until a frame arrives (or the stop event / close() ends the wait)."""
        for delay in backoff_delays(*self._backoff):
            self._waiter.wait(delay)
            self.reconnect_attempts += 1
            try:
                self._cap = self._open()
            except SourceError as e:
                log.info("%s: reconnect attempt %d failed: %s", self.name, self.reconnect_attempts, e.message)
                continue
            frame = self._read()
            if frame is not None:
                self.reconnects += 1
                self.healthy = True
                log.warning("%s: reconnected after %.1f s", self.name, self._clock() - lost)
                return frame
            self.dropped_frames += 1
            self._release()
            log.info("%s: reconnect attempt %d opened the device but read no frame", self.name,
                     self.reconnect_attempts)
        raise AssertionError("unreachable: backoff_delays never ends")

    def stats(self) -> dict[str, int | bool]:
        return {"frames": self.frames, "dropped_frames": self.dropped_frames, "reconnects": self.reconnects,
                "reconnect_attempts": self.reconnect_attempts, "loops": self.loops, "healthy": self.healthy}

    def close(self) -> None:
        self._waiter.closed.set()
        self._pending = None
        self._release()


# --------------------------------------------------------------------------------------------------
# serial sensor streams (pyserial)

_SEPARATORS = re.compile(rb"\s*,\s*|\s+")  # one comma (white space around it allowed), or white space
_SERIAL_DTYPES = ("float32", "float16", "float64", "int8", "uint8")


def _serial_module() -> Any:
    try:
        import serial
    except ImportError as e:
        raise MissingDependencyError(
            "the serial: source needs the Python package 'pyserial', which is not installed",
            hint="pip install pyserial (a dependency of edgekit: reinstall edgekit)") from e
    return serial


def parse_line(line: bytes, count: int) -> np.ndarray | str:
    """One CSV line -> ``count`` float32 values, or the reason it is not a sample (pure)."""
    tokens = _SEPARATORS.split(line.strip())
    if b"" in tokens:
        return "an empty field"
    if len(tokens) != count:
        return f"{len(tokens)} values, expected {count}"
    try:
        values = np.array(tokens, dtype=np.float32)
    except ValueError:
        return "not numbers"
    if not np.isfinite(values).all():
        return "a non-finite value"
    return values


class SerialSource:
    """Samples from line-based CSV on a serial port; see the module docstring for the line format.

    ``opener`` makes the port (default: pyserial ``serial_for_url(port, baudrate, timeout)``); it raises
    ``SourceError`` when the port cannot be opened. ``sleep`` and ``clock`` are injectable for tests.
    """

    def __init__(self, port: str, inputs: Sequence[TensorSpec], *, baud: int = SERIAL_BAUD,
                 window: int | None = None, hop: int | None = None, stop: threading.Event | None = None,
                 opener: Callable[[], Any] | None = None, sleep: Callable[[float], object] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 backoff: tuple[float, float] = (BACKOFF_START_S, BACKOFF_MAX_S),
                 silence_s: float = SILENCE_S) -> None:
        self.name = f"serial port {_redact(port)}"
        if len(inputs) != 1:
            raise SourceError(f"the serial: source feeds one-input models; this model has {len(inputs)}",
                              hint="use npy: with an .npz file instead")
        spec = self._spec = inputs[0]
        if spec.dtype not in _SERIAL_DTYPES:
            raise SourceError(f"the serial: source feeds float or int8/uint8 inputs; input {spec.name!r} is "
                              f"{spec.dtype}", hint="use npy: with samples of that dtype")
        if spec.dtype in ("int8", "uint8") and (spec.scale is None or spec.zero_point is None):
            raise SourceError(f"{spec.dtype} input {spec.name!r} has no quantization scale/zero point in the "
                              "manifest, so serial values cannot be quantized",
                              hint="rebuild the bundle with quantization parameters")
        if hop is not None and window is None:
            raise SourceError("serial: hop needs window too", hint="e.g. serial:/dev/ttyACM0?window=128&hop=64")
        self._shape = _concrete(spec.shape)
        elements = math.prod(self._shape)
        self._window = window
        self._hop = hop if hop is not None else (window or 1)
        self._transpose = False
        if window is None:
            self._per_line = elements
        else:
            per_line, rest = divmod(elements, window)
            dims = [d for d in self._shape if d != 1]
            if rest or not per_line:
                raise SourceError(f"input {spec.name!r} of shape {_fmt(spec.shape)} holds {elements} values, "
                                  f"which window={window} lines cannot fill equally",
                                  hint="the window is the model's number of time steps")
            if dims == [window, per_line] or dims == [elements]:
                pass  # time-major (…, N, K), or flat (…, N*K)
            elif dims == [per_line, window]:
                self._transpose = True  # channels first (…, K, N)
            else:
                raise SourceError(f"input {spec.name!r} of shape {_fmt(spec.shape)} is not a window of "
                                  f"{window} time steps of {per_line} values ((…, {window}, {per_line}), "
                                  f"(…, {per_line}, {window}) or flat)",
                                  hint="set window to the model's number of time steps")
            self._per_line = per_line
        self._buf = np.zeros((window or 1, self._per_line), np.float32)
        self._filled = 0
        self._skip = 0
        if opener is None:
            if "://" not in port and not Path(port).exists():
                raise SourceError(f"serial port {port} does not exist",
                                  hint="plug in the sensor; `dmesg | tail` names the port it got")
            opener = self._pyserial_opener(port, baud)
        self._opener = opener
        self._waiter = _Waiter(self.name, stop, sleep)
        self._clock = clock
        self._backoff = backoff
        self._silence_s = silence_s
        self._rx = bytearray()
        self._discarding = False  # inside an over-long line: drop bytes up to the next newline
        self.samples = 0
        self.lines = 0  # valid lines
        self.bad_lines = 0
        self.reconnects = 0
        self.reconnect_attempts = 0
        self.healthy = True
        self._port: Any = self._opener()
        self._last_good = clock()

    @staticmethod
    def _pyserial_opener(port: str, baud: int) -> Callable[[], Any]:
        serial = _serial_module()

        def open_port() -> Any:
            try:
                return serial.serial_for_url(port, baudrate=baud, timeout=READ_TIMEOUT_S)
            except (serial.SerialException, ValueError, OSError) as e:
                raise SourceError(f"cannot open serial port {_redact(port)}: {e}",
                                  hint="check the port name, the baud rate, and that the agent's user is in "
                                       "the 'dialout' group") from e

        return open_port

    def next(self) -> list[np.ndarray]:
        while True:
            values = self._next_values()
            if self._window is None:
                self.samples += 1
                return self._emit(values)
            if self._skip:
                self._skip -= 1
                continue
            self._buf[self._filled] = values
            self._filled += 1
            if self._filled == self._window:
                sample = self._buf.copy()
                n, hop = self._window, self._hop
                if hop < n:
                    self._buf[:n - hop] = self._buf[hop:]
                    self._filled = n - hop
                else:
                    self._filled, self._skip = 0, hop - n
                self.samples += 1
                return self._emit(sample)

    def _emit(self, values: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(values.T) if self._transpose else values
        return [_to_dtype(x.reshape(self._shape), self._spec, self.name)]

    def _next_values(self) -> np.ndarray:
        """The values of the next valid line (blocks; reconnects; counts bad lines)."""
        while True:
            line = self._next_line()
            if not line.strip():
                continue
            values = parse_line(line, self._per_line)
            if isinstance(values, str):
                self._bad(values, line)
                continue
            self.lines += 1
            self._last_good = self._clock()
            if not self.healthy:
                self.healthy = True
                log.warning("%s: valid lines again", self.name)
            return values

    def _bad(self, reason: str, line: bytes) -> None:
        self.bad_lines += 1
        if _is_power_of_ten(self.bad_lines):
            log.warning("%s: skipped a line (%s): %r; %d bad line(s) so far", self.name, reason, line[:80],
                        self.bad_lines)

    def _next_line(self) -> bytes:
        while True:
            nl = self._rx.find(b"\n")
            if nl >= 0:
                line = bytes(self._rx[:nl])
                del self._rx[:nl + 1]
                if self._discarding:
                    self._discarding = False
                    continue
                return line
            if len(self._rx) > MAX_LINE_BYTES:
                self._bad(f"no newline within {MAX_LINE_BYTES} bytes", bytes(self._rx[:80]))
                self._rx.clear()
                self._discarding = True
            self._waiter.check()
            if self._port is None:  # a reopening that the stop event ended
                self._reopen(self._clock())
            try:
                chunk = self._port.read(max(1, self._port.in_waiting))
            except OSError as e:  # pyserial's SerialException is an OSError
                self._waiter.check()  # closed from another thread: not a device failure
                self._reconnect(e)
                continue
            if chunk:
                if self._discarding:
                    nl = chunk.find(b"\n")
                    if nl < 0:
                        continue
                    chunk, self._discarding = chunk[nl + 1:], False
                self._rx += chunk
            elif self.healthy and self._clock() - self._last_good > self._silence_s:
                self.healthy = False
                log.warning("%s: no valid line for %g s", self.name, self._silence_s)

    def _reconnect(self, err: OSError) -> None:
        self.healthy = False
        self._close_port()
        self._rx.clear()
        self._discarding = False
        self._filled = self._skip = 0  # a window never spans an outage
        log.warning("%s: %s; reopening (back-off %g s to %g s)", self.name, err, *self._backoff)
        self._reopen(self._clock())

    def _reopen(self, lost: float) -> None:
        for delay in backoff_delays(*self._backoff):
            self._waiter.wait(delay)
            self.reconnect_attempts += 1
            try:
                self._port = self._opener()
            except SourceError as e:
                log.info("%s: reconnect attempt %d failed: %s", self.name, self.reconnect_attempts, e.message)
                continue
            self.reconnects += 1
            log.warning("%s: reopened after %.1f s", self.name, self._clock() - lost)
            return
        raise AssertionError("unreachable: backoff_delays never ends")

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except OSError as e:  # pyserial's SerialException is an OSError
                log.info("%s: closing the port failed: %s", self.name, e)

    def stats(self) -> dict[str, int | bool]:
        return {"samples": self.samples, "lines": self.lines, "bad_lines": self.bad_lines,
                "reconnects": self.reconnects, "reconnect_attempts": self.reconnect_attempts,
                "healthy": self.healthy}

    def close(self) -> None:
        self._waiter.closed.set()
        self._close_port()


# --------------------------------------------------------------------------------------------------


def open_source(spec: str, inputs: Sequence[TensorSpec], preprocessing: dict[str, Any] | None,
                seed: int = 0, *, stop: threading.Event | None = None) -> Source:
    """Open the source ``spec`` (see the module docstring) for a model's inputs.

    ``stop`` (the agent's stop event) lets a live source that waits for its device end with
    ``SourceEnded(reason="stopped")``.
    """
    kind, sep, arg = spec.partition(":")
    if kind == "synthetic" and not sep:
        return synthetic_source(inputs, seed=seed)
    if kind == "npy" and arg:
        return npy_source(Path(arg).expanduser(), inputs)
    if kind == "images" and arg:
        return ImageSource(Path(arg).expanduser(), inputs, preprocessing)
    if kind == "video" and arg:
        path, opts = _options(spec, arg, ("loop",))
        loop = opts.get("loop", "1")
        if loop not in ("0", "1"):
            raise SourceError(f"source {spec!r}: loop={loop!r} must be 0 or 1")
        return CaptureSource(str(Path(path).expanduser()), "video", inputs, preprocessing, loop=loop == "1",
                             stop=stop)
    if kind == "camera" and arg:
        if _is_decimal(arg):
            return CaptureSource(int(arg), "camera", inputs, preprocessing, stop=stop)
        if arg.startswith("/dev/"):
            return CaptureSource(arg, "camera", inputs, preprocessing, stop=stop)
        raise SourceError(f"source {spec!r}: expected camera:N (an index) or camera:/dev/videoN")
    if kind.lower() in STREAM_SCHEMES and arg.startswith("//") and len(arg) > 2:
        return CaptureSource(spec, "stream", inputs, preprocessing, stop=stop)
    if kind == "serial" and arg:
        port, opts = _options(spec, arg, ("baud", "window", "hop"))
        if not port:
            raise SourceError(f"source {spec!r} needs a port: serial:PORT (e.g. serial:/dev/ttyACM0)")
        baud = _int_option(spec, opts, "baud", SERIAL_BAUD)
        assert baud is not None
        return SerialSource(port, inputs, baud=baud, window=_int_option(spec, opts, "window", None),
                            hop=_int_option(spec, opts, "hop", None), stop=stop)
    if kind in ("npy", "images", "video", "camera", "serial"):
        what = {"camera": "a camera", "serial": "a port"}.get(kind, "a path")
        raise SourceError(f"source {spec!r} needs {what}: {next(k for k in KINDS if k.startswith(kind + ':'))}")
    raise SourceError(f"unknown source {spec!r}; kinds: {', '.join(KINDS)}",
                      hint="e.g. --source synthetic, --source npy:samples.npy, --source images:./frames, "
                           "--source camera:0, --source serial:/dev/ttyACM0?window=128")
