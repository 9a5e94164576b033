"""Preprocessing recorded in the bundle manifest and applied identically on host and device.

An image (H, W, C) uint8 in BGR order (as OpenCV reads it) or (H, W) grayscale becomes a model input:

1. colour: convert to ``color`` ("gray", "rgb" or "bgr"),
2. resize to ``size`` = [height, width] (``resize_mode`` "stretch"; OpenCV INTER_AREA when shrinking),
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
RESIZE_MODES = ("stretch",)


@dataclass(frozen=True)
class Preprocessing:
    size: tuple[int, int]  # (height, width)
    color: str = "rgb"
    layout: str = "NCHW"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize_mode: str = "stretch"

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise InputError(f"preprocessing.color {self.color!r} is not one of {', '.join(COLORS)}")
        if self.layout not in LAYOUTS:
            raise InputError(f"preprocessing.layout {self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise InputError(f"preprocessing.resize_mode {self.resize_mode!r} is not one of "
                             f"{', '.join(RESIZE_MODES)}")
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
        d = asdict(self)
        for k in ("size", "mean", "std"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {"size", "color", "layout", "scale", "mean", "std", "resize_mode"}
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


def image_to_tensor(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """One OpenCV image (H, W, 3) BGR or (H, W) gray uint8 -> float32 tensor with batch axis 1."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise InputError(f"expected an image of shape (H, W[, 1|3|4]), got {image.shape}")
    cv2 = _cv2()
    if image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if pre.color == "gray" and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)[:, :, None]
    elif pre.color != "gray" and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if pre.color == "rgb":
        image = image[:, :, ::-1]
    h, w = pre.size
    if image.shape[:2] != (h, w):
        shrinking = image.shape[0] > h or image.shape[1] > w
        interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        image = cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)
        if image.ndim == 2:
            image = image[:, :, None]
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
