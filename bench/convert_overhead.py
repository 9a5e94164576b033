"""Conversion overhead of `edgekit convert` against the bare library, and int8 vs fp32 latency per runtime.

Part 1, ONNX conversion wall time, interleaved round after round on the same data:

  edgekit  ``converters.convert.convert`` with the x86-64 profile (QDQ, per-channel int8, MinMax); timed as
           the sum of its report's steps inspect + calibration + quantize + package, i.e. without the
           validation, golden and ladder steps (the gate passes first time on these models)
  direct   what a user would write with onnxruntime alone for the same model: ``np.load`` the same samples,
           the same seeded draw, weights removed from the graph inputs where an old exporter listed them
           there (else onnxruntime does not treat them as weights), ``onnx.version_converter`` to opset 13
           when the model is older (per-channel QDQ needs it), ``quant_pre_process``, ``quantize_static``
           (QDQ, QInt8/QInt8, per_channel=True, MinMax) with a plain CalibrationDataReader

and prints the median of edgekit/direct over the rounds (target: at most 1.10).

Part 2, int8 vs fp32 host latency per runtime, from the bundles' own validation (both models interleaved in
alternating blocks after a warm-up, ``--latency-runs`` each): onnxruntime on the digits CNN and
super_resolution (x86-64 profile), LiteRT + XNNPACK on the hand-gesture MLP and the digits Keras CNN
(rpi5 profile, full int8).

    .venv/bin/python bench/convert_overhead.py [--rounds 5] [--threads 2] [--latency-runs 500] [--json]

Ratios, not raw times, because this machine is shared and noisy. Needs ../shared/realmodels for
super_resolution and the hand-gesture model (skipped when absent).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.convert import convert  # noqa: E402
from converters.keys import init_keys  # noqa: E402
from edge_agent.profiles import load_profile  # noqa: E402

OURS_STEPS = ("inspect", "calibration", "quantize", "package")


def direct_quantize(model: Path, calib_npy: Path, count: int, seed: int, work: Path) -> float:
    """Seconds for the bare onnxruntime recipe (see the module doc) on the same samples."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    t0 = time.perf_counter()
    x = np.load(calib_npy)
    order = np.random.default_rng(seed).permutation(len(x))
    cal = x[order[:min(count, len(x) - 1)]]
    m = onnx.load(str(model))
    weights = {t.name for t in m.graph.initializer}
    if any(i.name in weights for i in m.graph.input):  # old exporters list weights as inputs too
        keep = [i for i in m.graph.input if i.name not in weights]
        del m.graph.input[:]
        m.graph.input.extend(keep)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:
        m = onnx.version_converter.convert_version(m, 13)
    src = work / "direct_src.onnx"
    onnx.save(m, str(src))
    pre = work / "direct_pre.onnx"
    quant_pre_process(str(src), str(pre))
    name = onnx.load(str(pre)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(cal)

        def get_next(self) -> dict[str, np.ndarray] | None:
            sample = next(self.it, None)
            return None if sample is None else {name: sample}

    quantize_static(str(pre), str(work / "direct_int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax)
    return time.perf_counter() - t0


def ours(model: Path, calib_npy: Path, work: Path, key: Path, threads: int, tag: str) -> dict[str, Any]:
    result = convert(model, load_profile("x86-64"), str(calib_npy), work / f"out-{tag}", key, name=model.stem,
                     threads=threads, latency_runs=20)
    t = result.report["timings_s"]
    if result.report["ladder"]["ran"]:
        raise SystemExit(f"{model.name}: the gate failed and the ladder ran; pick data the gate passes")
    return {"seconds": sum(t[s] for s in OURS_STEPS), "timings": t,
            "calib_count": result.report["calibration"]["count"]}


def _quiet() -> contextlib.AbstractContextManager[Any]:
    return contextlib.redirect_stdout(io.StringIO())


def overhead(models: list[tuple[str, Path, Path]], work: Path, key: Path, rounds: int,
             threads: int) -> list[dict[str, Any]]:
    rows = []
    for label, model, calib in models:
        ratios, mine, bare = [], [], []
        count = 0
        with _quiet():  # warm-up, not counted: imports, first sessions, page cache
            ours(model, calib, work, key, threads, f"{model.stem}-warmup")
            direct_quantize(model, calib, 200, 0, work)
        for r in range(rounds):
            order = ("ours", "direct") if r % 2 == 0 else ("direct", "ours")
            got: dict[str, float] = {}
            for which in order:
                with _quiet():
                    if which == "ours":
                        o = ours(model, calib, work, key, threads, f"{model.stem}-{r}")
                        got["ours"], count = o["seconds"], o["calib_count"]
                    else:
                        got["direct"] = direct_quantize(model, calib, 200, 0, work)
            mine.append(got["ours"])
            bare.append(got["direct"])
            ratios.append(got["ours"] / got["direct"])
        rows.append({"model": label, "calibration_samples": count, "rounds": rounds,
                     "edgekit_s": statistics.median(mine), "direct_s": statistics.median(bare),
                     "edgekit_over_direct": statistics.median(ratios)})
    return rows


def latency(cases: list[tuple[str, str, Path, str, dict[str, Any]]], work: Path, key: Path, threads: int,
            runs: int) -> list[dict[str, Any]]:
    rows = []
    for label, profile, model, calib, kwargs in cases:
        with _quiet():
            result = convert(model, load_profile(profile), calib, work / "lat", key,
                             name=model.stem.replace(".", "_"), threads=threads, latency_runs=runs, **kwargs)
        v = result.report["validation"]
        rows.append({"model": label, "runtime": "onnxruntime" if profile == "x86-64" else "LiteRT + XNNPACK",
                     "profile": profile, "threads": threads, "runs": runs,
                     "fp32_p50_ms": v["fp32_p50_ms"], "int8_p50_ms": v["quant_p50_ms"], "speedup": v["speedup"],
                     "size_ratio": v["size_ratio"], "gate": result.manifest.validation["gate"],
                     "ladder_rung": result.manifest.validation["ladder_rung"]})
    return rows


def _table(rows: list[dict[str, Any]], cols: list[tuple[str, str, str]]) -> str:
    cells = [[fmt.format(r[k]) if r[k] is not None else "-" for _, k, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--latency-runs", type=int, default=500)
    ap.add_argument("--realmodels", default=os.environ.get("EDGEKIT_REALMODELS",
                                                           str(ROOT.parent / "shared" / "realmodels")))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    realmodels = Path(args.realmodels)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        key, _ = init_keys(work / "keys")
        digits = work / "digits"
        subprocess.run([sys.executable, str(ROOT / "examples" / "make_digits_model.py"), str(digits)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with np.load(digits / "test.npz") as test:
            np.save(work / "digits_calib.npy", test["x"][:201, None])  # (N, 1, 1, 8, 8); 200 calibrate
        models = [("digits CNN 8x8 (opset 13)", digits / "digits_fp32.onnx", work / "digits_calib.npy")]
        sr = realmodels / "super_resolution" / "super_resolution.onnx"
        if sr.is_file():
            rng = np.random.default_rng(0)
            np.save(work / "sr_calib.npy", rng.uniform(0, 1, size=(51, 1, 1, 224, 224)).astype(np.float32))
            models.append(("super_resolution 224x224 (opset 10)", sr, work / "sr_calib.npy"))
        over = overhead(models, work, key, args.rounds, args.threads)

        cases: list[tuple[str, str, Path, str, dict[str, Any]]] = [
            ("digits CNN 8x8", "x86-64", digits / "digits_fp32.onnx", str(digits / "calib"),
             {"labels": digits / "labels.txt"})]
        if sr.is_file():
            cases.append(("super_resolution 224x224", "x86-64", sr, str(work / "sr_calib.npy"), {}))
        hand = realmodels / "hand_gesture"
        if (hand / "keypoint_classifier.hdf5").is_file():
            cases.append(("hand-gesture MLP 42->3", "rpi5", hand / "keypoint_classifier.hdf5",
                          str(hand / "keypoint.csv"), {"label_column": 0}))
        cases.append(("digits CNN 8x8 (Keras)", "rpi5", digits / "digits.keras", str(digits / "calib"),
                      {"labels": digits / "labels.txt"}))
        lat = latency(cases, work, key, args.threads, args.latency_runs)
    if args.json:
        print(json.dumps({"overhead": over, "latency": lat}, indent=2, default=str))
        return 0
    print("ONNX conversion wall time: edgekit (inspect+calibration+quantize+package) vs bare onnxruntime")
    print(_table(over, [("model", "model", "{}"), ("calib", "calibration_samples", "{}"),
                        ("edgekit s", "edgekit_s", "{:.3f}"), ("direct s", "direct_s", "{:.3f}"),
                        ("edgekit/direct", "edgekit_over_direct", "{:.3f}")]))
    print(f"(median of {args.rounds} interleaved rounds, {args.threads} threads; <= 1.10 is the target)\n")
    print("int8 vs fp32 host latency (interleaved, from each bundle's validation)")
    print(_table(lat, [("model", "model", "{}"), ("runtime", "runtime", "{}"), ("thr", "threads", "{}"),
                       ("fp32 p50 ms", "fp32_p50_ms", "{:.4f}"), ("int8 p50 ms", "int8_p50_ms", "{:.4f}"),
                       ("speed-up", "speedup", "{:.2f}x"), ("size", "size_ratio", "{:.2f}"),
                       ("rung", "ladder_rung", "{}")]))
    print("(speed-up > 1 means int8 is faster; size = int8 bytes / fp32 bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
