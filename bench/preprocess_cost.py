"""The cost of preprocessing one 640x480 BGR camera frame: the previous path vs ``edge_agent.preprocess`` now.

  old  the implementation before the table look-up (kept here verbatim as ``old_image_to_tensor``): colour
       order reversed on the full frame (a negative-stride view, copied for OpenCV), resize, float
       normalise and transpose, then ``quantize`` for an int8 input
  new  ``image_to_input`` (int8: resize on the source channels, then normalise + quantize in one
       per-channel table look-up written straight into NCHW) and ``image_to_tensor`` (float32, the same
       with a float table)

Both are checked to give identical tensors, then timed alternately (old, new, old, new ...) on the same
frames, so both see the same load; p50 / p90 over ``--runs`` calls after a warm-up. Cases: MobileNetV2's
int8 NCHW (1, 3, 224, 224) input (ImageNet mean/std, scale 0.018631, zero point -14) and a float32 NHWC
(1, 224, 224, 3) one, stretch and crop.

A second table (``--interp``) backs the choice of INTER_AREA documented in ``edge_agent/preprocess.py``:
time and max / mean difference (pixel levels, before normalisation) of other ways to shrink 640x480 to
224x224 against INTER_AREA, on random frames (the worst case) and on smooth ones (Gaussian-blurred noise).

    .venv/bin/python bench/preprocess_cost.py [--runs 200] [--interp] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edge_agent.manifest import TensorSpec  # noqa: E402
from edge_agent.preprocess import (  # noqa: E402
    Preprocessing,
    crop_box,
    image_to_input,
    image_to_tensor,
    letterbox_geometry,
    quantize,
)

IMAGENET = {"color": "rgb", "scale": 1 / 255, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
MOBILENET_INPUT = TensorSpec("input", (1, 3, 224, 224), "int8", scale=0.018631115555763245, zero_point=-14)
WARMUP = 20


def _cv2() -> Any:
    import cv2

    return cv2


def _old_resize(cv2: Any, image: np.ndarray, h: int, w: int) -> np.ndarray:
    if image.shape[:2] == (h, w):
        return image
    shrinking = image.shape[0] > h or image.shape[1] > w
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    out = cv2.resize(np.ascontiguousarray(image), (w, h), interpolation=interp)
    return out[:, :, None] if out.ndim == 2 else out


def old_image_to_tensor(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """``image_to_tensor`` as it was before the table look-up (colour, resize, float normalise, layout)."""
    if image.ndim == 2:
        image = image[:, :, None]
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
        canvas[top:top + nh, left:left + nw] = _old_resize(cv2, image, nh, nw)
        image = canvas
    else:
        image = _old_resize(cv2, image, h, w)
    x = image.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "NCHW":
        x = x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None, ...], dtype=np.float32)


def old_image_to_input(image: np.ndarray, pre: Preprocessing, spec: TensorSpec) -> np.ndarray:
    x = old_image_to_tensor(image, pre)
    if spec.scale is None or spec.zero_point is None:
        return x
    return quantize(x, spec.scale, spec.zero_point, spec.dtype)


def _p(ns: list[int], q: float) -> float:
    return float(np.percentile(np.asarray(ns, np.float64), q)) / 1e6


def compare(frames: list[np.ndarray], old: Callable[[np.ndarray], np.ndarray],
            new: Callable[[np.ndarray], np.ndarray], runs: int) -> dict[str, float]:
    """p50/p90 (ms) of ``old`` and ``new``, called alternately on the same frames; results must be equal."""
    for f in frames:
        a, b = old(f), new(f)
        if a.dtype != b.dtype or not np.array_equal(a, b):
            raise SystemExit(f"old and new preprocessing differ (max {np.abs(a.astype(float) - b).max()})")
    times: dict[str, list[int]] = {"old": [], "new": []}
    clock = time.perf_counter_ns
    for i in range(WARMUP + runs):
        f = frames[i % len(frames)]
        order = (("old", old), ("new", new)) if i % 2 == 0 else (("new", new), ("old", old))
        for name, fn in order:
            t0 = clock()
            fn(f)
            t = clock() - t0
            if i >= WARMUP:
                times[name].append(t)
    old50, new50 = _p(times["old"], 50), _p(times["new"], 50)
    return {"old_p50_ms": round(old50, 3), "new_p50_ms": round(new50, 3),
            "old_p90_ms": round(_p(times["old"], 90), 3), "new_p90_ms": round(_p(times["new"], 90), 3),
            "speedup_p50": round(old50 / new50, 2)}


def cost_table(runs: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(8)]
    nhwc_f32 = TensorSpec("input", (1, 224, 224, 3), "float32")
    cases = [
        ("stretch -> NCHW int8 (MobileNetV2)", Preprocessing(size=(224, 224), layout="NCHW", **IMAGENET),
         MOBILENET_INPUT),
        ("stretch -> NHWC float32", Preprocessing(size=(224, 224), layout="NHWC", **IMAGENET), nhwc_f32),
        ("crop -> NCHW int8", Preprocessing(size=(224, 224), layout="NCHW", resize_mode="crop", **IMAGENET),
         MOBILENET_INPUT),
        ("crop -> NHWC float32", Preprocessing(size=(224, 224), layout="NHWC", resize_mode="crop", **IMAGENET),
         nhwc_f32),
    ]
    rows = []
    for name, pre, spec in cases:
        def old(f: np.ndarray, pre: Preprocessing = pre, spec: TensorSpec = spec) -> np.ndarray:
            return old_image_to_input(f, pre, spec)

        def new(f: np.ndarray, pre: Preprocessing = pre, spec: TensorSpec = spec) -> np.ndarray:
            return image_to_input(f, pre, spec) if spec.scale is not None else image_to_tensor(f, pre)

        rows.append({"case": name, **compare(frames, old, new, runs)})
    return rows


def interp_table(runs: int) -> list[dict[str, Any]]:
    cv2 = _cv2()
    rng = np.random.default_rng(2)
    noise = [rng.integers(0, 256, size=(480, 640, 3), dtype=np.uint8) for _ in range(4)]
    smooth = [cv2.GaussianBlur(f, (0, 0), 3) for f in noise]
    area = cv2.INTER_AREA
    size = (224, 224)

    def resize(f: np.ndarray, interp: int) -> np.ndarray:
        return cv2.resize(f, size, interpolation=interp)

    ways: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "INTER_AREA (kept)": lambda f: resize(f, area),
        "INTER_AREA, x then y": lambda f: resize(cv2.resize(f, (224, 480), interpolation=area), area),
        "2x INTER_AREA, then INTER_AREA": lambda f: resize(cv2.resize(f, (320, 240), interpolation=area), area),
        "pyrDown, then INTER_AREA": lambda f: resize(cv2.pyrDown(f), area),
        "pyrDown, then INTER_LINEAR": lambda f: resize(cv2.pyrDown(f), cv2.INTER_LINEAR),
        "INTER_LINEAR": lambda f: resize(f, cv2.INTER_LINEAR),
    }
    rows = []
    for name, fn in ways.items():
        ts = []
        for i in range(WARMUP + runs):
            t0 = time.perf_counter_ns()
            fn(noise[i % len(noise)])
            if i >= WARMUP:
                ts.append(time.perf_counter_ns() - t0)
        row: dict[str, Any] = {"way": name, "p50_ms": round(_p(ts, 50), 3)}
        for label, frames in (("noise", noise), ("smooth", smooth)):
            d = [np.abs(fn(f).astype(np.int16) - resize(f, area).astype(np.int16)) for f in frames]
            row[f"{label}_max"] = int(max(x.max() for x in d))
            row[f"{label}_mean"] = round(float(np.mean([x.mean() for x in d])), 3)
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=200, help="timed calls of each path (default 200)")
    ap.add_argument("--interp", action="store_true", help="also time and compare other interpolations")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    cv2 = _cv2()
    result: dict[str, Any] = {"cpus": os.cpu_count(), "opencv": cv2.__version__,
                              "opencv_threads": cv2.getNumThreads(), "numpy": np.__version__, "runs": args.runs,
                              "load_average_1min": os.getloadavg()[0]}
    result["cost"] = cost_table(args.runs)
    if args.interp:
        result["interp"] = interp_table(args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"640x480 BGR frame -> 224x224; {result['cpus']} CPUs, OpenCV {result['opencv']} "
          f"({result['opencv_threads']} threads), numpy {result['numpy']}, load average "
          f"{result['load_average_1min']:.2f}; p50 / p90 of {args.runs} alternating calls (identical output)")
    print(f"  {'case':38s} {'old p50':>8s} {'new p50':>8s} {'old p90':>8s} {'new p90':>8s} {'speedup':>8s}")
    for r in result["cost"]:
        print(f"  {r['case']:38s} {r['old_p50_ms']:8.3f} {r['new_p50_ms']:8.3f} {r['old_p90_ms']:8.3f} "
              f"{r['new_p90_ms']:8.3f} {r['speedup_p50']:7.2f}x")
    if args.interp:
        print("shrinking 640x480 -> 224x224 (uint8, 3 channels) vs INTER_AREA: p50 ms; |difference| in levels")
        print(f"  {'way':32s} {'p50':>7s} {'noise max':>9s} {'mean':>7s} {'smooth max':>10s} {'mean':>7s}")
        for r in result["interp"]:
            print(f"  {r['way']:32s} {r['p50_ms']:7.3f} {r['noise_max']:9d} {r['noise_mean']:7.3f} "
                  f"{r['smooth_max']:10d} {r['smooth_mean']:7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
