"""Preprocessing recorded in the bundle manifest and applied identically on host and device.

An image (H, W, C) uint8 in BGR order (as OpenCV reads it) or (H, W) grayscale becomes a model input:

1. colour: convert to ``color`` ("gray", "rgb" or "bgr"),
2. resize to ``size`` = [height, width] by ``resize_mode`` (OpenCV INTER_AREA when shrinking, else
   INTER_LINEAR):

   * "stretch" (default): scale both axes to the size; the aspect ratio changes;
   * "letterbox": keep the aspect ratio, scale the whole image to fit inside the size, and pad the rest
     with ``pad_value`` (a pixel value 0..255, default 0 = black; YOLO-family models expect 114). The
     image is centred; an odd leftover row/column goes to the bottom/right (as YOLO's letterbox does).
     The padding is a pixel like any other: steps 3-5 apply to it. ``letterbox_geometry`` gives the
     scale and offsets, to map detections back to the source image;
   * "crop": keep the aspect ratio, take the largest centred region of the source with the size's
     aspect ratio, and scale it to the size (nothing is padded; the edges of the longer side are lost).
     ``crop_box`` gives the region. Cropping happens first (a slice, no copy), so colour conversion
     only touches the kept pixels;

3. ``value = (pixel * scale - mean[c]) / std[c]`` as float32,
4. layout "NCHW" or "NHWC", with a leading batch axis of 1,
5. for int8/uint8 model inputs: ``q = round(value / input_scale) + zero_point``, clipped to the dtype.

``image_to_tensor`` gives steps 1-4 (float32); ``image_to_input`` gives the tensor in the input's dtype
(steps 1-5 for int8/uint8). Both compute exactly the values defined above, bit for bit, but in a faster order
(tests/test_preprocess.py compares them with the plain float computation on every mode, colour, layout and
several image shapes; bench/preprocess_cost.py times both):

* Crop is a slice; a BGRA image loses its alpha and a "gray" model's image is converted to gray before the
  resize (``cv2.cvtColor``; gray first is how the values are defined, and the resize then has a third of
  the work). Anything else stays in the source's BGR order, uint8, for the resize: OpenCV resizes every
  channel independently with the same arithmetic, so swapping channels after the resize gives the same
  values as before it. (Reversing a 640x480 frame to RGB first cost about 2 ms: a negative-stride view
  that had to be copied for OpenCV.) A gray image for a colour model is resized once, then copied to
  three planes.
* Steps 3-5 are one table look-up on the small uint8 image. For 8-bit pixels every channel's value depends
  only on the pixel value, so ``pixel_table`` computes the float32 arithmetic of step 3 (and ``quantize`` of
  step 5, numpy's round half to even included) once for the 256 values of each channel, cached per
  preprocessing and quantization; ``cv2.LUT`` maps each plane straight into its place in the output: NCHW
  takes the planes in the model's colour order (the swap costs nothing), NHWC swaps to RGB on the small
  image (``cv2.cvtColor``). ``cv2.dnn.blobFromImage`` is not used: it computes (pixel - mean) * factor
  with one factor and resizes with INTER_LINEAR, so its values differ from these.
* Images that are not 8-bit (the agent's sources never give any) take the float arithmetic after the
  resize.

Interpolation: INTER_AREA stays for shrinking. It is the anti-aliased choice (each output pixel is the mean
of the source pixels it covers) and, on uint8, most of what is left of the cost. The alternatives, for a
640x480 BGR frame -> 224x224 on 2 vCPUs (bench/preprocess_cost.py --interp; p50, and the largest difference
from INTER_AREA in pixel levels on random / on smooth (blurred) frames): INTER_AREA 2.0 ms; INTER_LINEAR
0.2 ms, 150 / 2 levels (it aliases: mean difference 29 levels on random frames); pyrDown then
INTER_LINEAR 0.7-0.9 ms, 79 / 6; INTER_AREA to half size then INTER_AREA 1.1 ms, 79 / 2. None stays within
one level of what models were calibrated with, so the resize is unchanged. The whole of a 640x480 frame ->
MobileNetV2's int8 NCHW (1, 3, 224, 224) input went from 6.3-6.6 ms to 2.1-2.2 ms p50 (bench/preprocess_cost.py),
the resize being ~90% of the rest.

Everything here is vectorised OpenCV/numpy; OpenCV is imported lazily so the agent's base install does not
need it for non-image models.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_agent.errors import InputError, missing_extra
from edge_agent.manifest import TensorSpec

COLORS = ("gray", "rgb", "bgr")
LAYOUTS = ("NCHW", "NHWC")
RESIZE_MODES = ("stretch", "letterbox", "crop")


@dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int]  # (height, width)
    color: str = "rgb"
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize_mode: str = "stretch"
    pad_value: int = 0  # letterbox only: the pixel value (0..255, every channel) of the padding

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise InputError(f"preprocessing.color {self.color!r} is not one of {', '.join(COLORS)}")
        if self.layout not in LAYOUTS:
            raise InputError(f"preprocessing.layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"preprocessing.resize_mode {self.resize_mode!r} is not one of "
                             f"{', '.join(RESIZE_MODES)}")
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, int) \
                or not 0 <= self.pad_value <= 255:
            raise InputError(f"preprocessing.pad_value must be an integer pixel value 0..255, "
                             f"got {self.pad_value!r}")
        if self.pad_value and self.resize_mode != "letterbox":
            raise InputError(f"preprocessing.pad_value only applies to resize_mode 'letterbox', "
                             f"not {self.resize_mode!r}", hint="drop pad_value or use resize_mode letterbox")
        if len(self.size) != 2 or min(self.size) < 1:
            raise InputError(f"preprocessing.size must be [height, width], got {list(self.size)}")
        channels = 1 if self.color == "gray" else 3
        for key in ("mean", "std"):
            vals = getattr(self, key)
            if len(vals) not in (1, channels):
                raise InputError(f"preprocessing.{key} needs 1 or {channels} values, got {len(vals)}")
        if any(s == 0 for s in self.std):
            raise InputError("preprocessing.std must not contain 0")

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3

    def to_dict(self) -> dict[str, Any]:
        """The manifest form. ``pad_value`` appears only for "letterbox", so the manifests of the other
        modes stay exactly as before (and readable by agents that predate it)."""
        d = asdict(self)
        for k in ("size", "mean", "std"):
            d[k] = list(d[k])
        if self.resize_mode != "letterbox":
            del d["pad_value"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {"size", "color", "layout", "scale", "mean", "std", "resize_mode", "pad_value"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"preprocessing: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        if "size" not in d:
            raise InputError("preprocessing: missing 'size' [height, width]")
        kw = dict(d)
        for k in ("size", "mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as e:
        raise missing_extra("opencv-python-headless", "vision", "reading images") from e
    return cv2


def letterbox_geometry(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[float, tuple[int, int],
                                                                                  tuple[int, int]]:
    """Where "letterbox" puts a ``src_hw`` image inside ``dst_hw``: (scale, (height, width) after scaling,
    (top, left) offset of the scaled image). A source point (y, x) lands at
    (top + y * scale, left + x * scale); invert that to map a detection back."""
    (ih, iw), (h, w) = src_hw, dst_hw
    r = min(h / ih, w / iw)
    nh = min(h, max(1, round(ih * r)))
    nw = min(w, max(1, round(iw * r)))
    return r, (nh, nw), ((h - nh) // 2, (w - nw) // 2)


def crop_box(src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centred region "crop" keeps of a ``src_hw`` image for ``dst_hw``: (top, left, height, width),
    the largest region with the aspect ratio of ``dst_hw`` (rounded to whole pixels)."""
    (ih, iw), (h, w) = src_hw, dst_hw
    if iw * h > ih * w:  # the source is wider: keep the full height
        ch, cw = ih, max(1, min(iw, (ih * w + h // 2) // h))
    else:  # taller (or the same aspect): keep the full width
        ch, cw = max(1, min(ih, (iw * h + w // 2) // w)), iw
    return (ih - ch) // 2, (iw - cw) // 2, ch, cw


def _rows(image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, C) itself when OpenCV can read it in place (each row contiguous: a crop slice is, and
    so is a 2-D image seen as (H, W, 1)), else a contiguous copy (e.g. a channel-reversed view)."""
    c = image.shape[2]
    row = image.itemsize * c
    if (c == 1 or image.strides[2] == image.itemsize) and image.strides[1] == row \
            and image.strides[0] >= row * image.shape[1]:
        return image
    return np.ascontiguousarray(image)


def _resize(cv2: Any, image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C); INTER_AREA when shrinking either axis, else INTER_LINEAR."""
    if image.shape[:2] == (h, w):
        return image
    shrinking = image.shape[0] > h or image.shape[1] > w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(_rows(image), (w, h), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def _resized(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Steps 1-2: the (h, w, 1) gray or (h, w, 3) image at the model's size, still in BGR order and the
    image's dtype."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or 0 in image.shape[:2]:
        raise InputError(f"expected an image of shape (H, W[, 1|3|4]), got {image.shape}")
    h, w = pre.size
    if pre.resize_mode == "crop":
        top, left, ch, cw = crop_box(image.shape[:2], (h, w))
        image = image[top:top + ch, left:left + cw]
    cv2 = _cv2()
    if image.shape[2] == 4:
        image = cv2.cvtColor(_rows(image), cv2.COLOR_BGRA2BGR)
    if pre.color == "gray" and image.shape[2] == 3:
        image = cv2.cvtColor(_rows(image), cv2.COLOR_BGR2GRAY)[:, :, None]
    if pre.resize_mode == "letterbox" and image.shape[:2] != (h, w):
        _, (nh, nw), (top, left) = letterbox_geometry(image.shape[:2], (h, w))
        canvas = np.full((h, w, image.shape[2]), pre.pad_value, dtype=image.dtype)
        canvas[top:top + nh, left:left + nw] = _resize(cv2, image, nh, nw)
        image = canvas
    else:
        image = _resize(cv2, image, h, w)
    if pre.color != "gray" and image.shape[2] == 1:  # a gray image for a colour model: three equal planes
        image = np.repeat(image, 3, axis=2)
    return image


@functools.lru_cache(maxsize=32)
def _tables(channels: int, scale: float, mean: tuple[float, ...], std: tuple[float, ...], dtype: str,
            q_scale: float | None, zero_point: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``pixel_table``, and the same as (1, 256, channels) for ``cv2.LUT`` on an (h, w, channels) image;
    both read-only (they are shared)."""
    p = np.arange(256, dtype=np.float32)[:, None]  # (256, 1): the float32 arithmetic of step 3, row by row
    x = p * np.float32(scale)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    x = np.broadcast_to(x, (256, channels))
    if q_scale is not None and zero_point is not None:
        x = quantize(x, q_scale, zero_point, dtype)
    table = np.ascontiguousarray(x.T, dtype=dtype)
    hwc = np.ascontiguousarray(x[None], dtype=dtype)
    table.setflags(write=False)
    hwc.setflags(write=False)
    return table, hwc


def pixel_table(pre: Preprocessing, dtype: str = "float32", scale: float | None = None,
                zero_point: int | None = None) -> np.ndarray:
    """(channels, 256): what each 8-bit pixel value of each model channel (in the model's colour order)
    becomes, i.e. step 3 and (with ``scale`` and ``zero_point``, for an int8/uint8 ``dtype``) step 5, computed
    with exactly the float32 operations ``image_to_tensor`` and ``quantize`` use. Cached, read-only."""
    quantized = scale is not None and zero_point is not None
    if quantized != (dtype in ("int8", "uint8")) or (scale is None) != (zero_point is None) \
            or dtype not in ("float32", "int8", "uint8"):
        raise InputError(f"pixel_table: float32 takes no quantization; int8/uint8 need a scale and a zero point "
                         f"(got {dtype}, scale {scale}, zero point {zero_point})")
    return _tables(pre.channels, float(pre.scale), tuple(pre.mean), tuple(pre.std), dtype,
                   None if scale is None else float(scale), None if zero_point is None else int(zero_point))[0]


def _lut(cv2: Any, src: np.ndarray, table: np.ndarray, dst: np.ndarray) -> None:
    out = cv2.LUT(src, table, dst=dst)
    if out is not dst:  # OpenCV allocated its own output (it does not when dst fits, as it always should)
        dst[...] = out


def _apply_table(small: np.ndarray, pre: Preprocessing, tables: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Steps 3-4 (and 5 when the tables quantize) on the uint8 (h, w, 1|3 BGR) image: one table look-up
    per value, written straight into the layout; the colour order is which plane feeds which channel."""
    cv2 = _cv2()
    table, hwc = tables
    h, w, _ = small.shape
    c = pre.channels
    if pre.layout == "NCHW":
        out = np.empty((1, c, h, w), table.dtype)
        planes = cv2.split(small) if c == 3 else [small[:, :, 0]]
        for i, plane in enumerate(planes[::-1] if pre.color == "rgb" else planes):
            _lut(cv2, plane, table[i], out[0, i])
        return out
    out = np.empty((1, h, w, c), table.dtype)
    if c == 1:
        _lut(cv2, small[:, :, 0], table[0], out[0, :, :, 0])
    else:
        _lut(cv2, cv2.cvtColor(small, cv2.COLOR_BGR2RGB) if pre.color == "rgb" else _rows(small), hwc, out[0])
    return out


def _normalise(small: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """Steps 3-4 in float arithmetic, for images that are not 8-bit (no table)."""
    if pre.color == "rgb":
        small = small[:, :, ::-1]
    x = small.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None, ...], dtype=np.float32)


def image_to_tensor(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """One OpenCV image (H, W, 3) BGR or (H, W) gray uint8 -> float32 tensor with batch axis 1."""
    small = _resized(image, pre)
    if small.dtype != np.uint8:
        return _normalise(small, pre)
    return _apply_table(small, pre, _tables(pre.channels, float(pre.scale), tuple(pre.mean), tuple(pre.std),
                                            "float32", None, None))


def image_to_input(image: np.ndarray, pre: Preprocessing, spec: TensorSpec) -> np.ndarray:
    """One OpenCV image -> the model-ready tensor in ``spec``'s dtype: float32 as ``image_to_tensor``;
    int8/uint8 (with the input's scale and zero point) equal to ``quantize(image_to_tensor(...))`` but
    normalised and quantized in one table look-up; float16/float64 converted from float32."""
    dtype = spec.dtype
    if dtype in ("int8", "uint8"):
        if spec.scale is None or spec.zero_point is None:
            raise InputError(f"{dtype} input {spec.name!r} has no quantization scale/zero point, so images "
                             "cannot be quantized for it",
                             hint="rebuild the bundle with the input's quantization parameters")
        small = _resized(image, pre)
        if small.dtype != np.uint8:
            return quantize(_normalise(small, pre), spec.scale, spec.zero_point, dtype)
        return _apply_table(small, pre, _tables(pre.channels, float(pre.scale), tuple(pre.mean),
                                                tuple(pre.std), dtype, float(spec.scale), int(spec.zero_point)))
    if dtype in ("float32", "float16", "float64"):
        return image_to_tensor(image, pre).astype(dtype, copy=False)
    raise InputError(f"images cannot feed the {dtype} input {spec.name!r}",
                     hint="images become float32, float16, int8 or uint8 (quantized) inputs")


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """Affine quantization: q = round(x / scale) + zero_point, clipped to the integer dtype."""
    info = np.iinfo(np.dtype(dtype))
    q = np.round(np.asarray(x, np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Inverse of ``quantize``: real = (q - zero_point) * scale, as float32."""
    return ((np.asarray(q).astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)
