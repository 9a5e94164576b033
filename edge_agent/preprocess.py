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

Everything here is vectorised numpy; only ``resize`` and colour conversion call OpenCV, imported lazily
so the agent's base install does not need it for non-image models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edge_agent.errors import InputError, missing_extra

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


def _resize(cv2: Any, image: np.ndarray, h: int, w: int) -> np.ndarray:
    """(H, W, C) uint8 -> (h, w, C); INTER_AREA when shrinking either axis, else INTER_LINEAR."""
    if image.shape[:2] == (h, w):
        return image
    shrinking = image.shape[0] > h or image.shape[1] > w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def image_to_tensor(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """One OpenCV image (H, W, 3) BGR or (H, W) gray uint8 -> float32 tensor with batch axis 1."""
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
        canvas[top:top + nh, left:left + nw] = _resize(cv2, image, nh, nw)
        image = canvas
    else:
        image = _resize(cv2, image, h, w)
    x = image.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None, ...], dtype=np.float32)


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: str) -> np.ndarray:
    """Affine quantization: q = round(x / scale) + zero_point, clipped to the integer dtype."""
    info = np.iinfo(np.dtype(dtype))
    q = np.round(np.asarray(x, np.float32) / np.float32(scale)) + zero_point
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """Inverse of ``quantize``: real = (q - zero_point) * scale, as float32."""
    return ((np.asarray(q).astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)
