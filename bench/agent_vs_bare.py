"""Agent overhead and INT8 speed-up, measured side by side in one process.

For each model it builds (in a temp folder) an x86-64 INT8 bundle with `edgekit convert`, then
alternates, round after round on the same threads:

  bare   a plain onnxruntime ``session.run`` loop on the bundle's int8 model (same session options)
  agent  ``edge_agent.benchmark.bench`` on the signed bundle (verify, unpack, backend, timed loop)
  fp32   a plain ``session.run`` loop on the original fp32 model

and prints p50 latencies and the ratios agent/bare and fp32/int8 (median over rounds). Ratios, not raw
times, because this machine is shared and noisy.

    .venv/bin/python bench/agent_vs_bare.py [--rounds 5] [--count 2000] [--threads 2] [--json]

Models: the demo's digits CNN (made from scikit-learn's bundled data) and, when ../shared/realmodels is
present, super_resolution.onnx (a real 224x224 model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.convert import convert  # noqa: E402
from converters.keys import init_keys  # noqa: E402
from edge_agent.benchmark import bench  # noqa: E402
from edge_agent.bundle import unpack_bundle  # noqa: E402
from edge_agent.hardware import DeviceOptions  # noqa: E402
from edge_agent.profiles import load_profile  # noqa: E402
from edge_agent.stats import latency_summary_ms  # noqa: E402


def bare_loop(model: Path, threads: int, count: int, warmup: int, feed: np.ndarray) -> dict:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # as the agent does (old exporters' initializer warnings are noise here)
    sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feeds = {name: feed}
    for _ in range(warmup):
        sess.run(None, feeds)
    lat = np.empty(count, dtype=np.int64)
    clock = time.perf_counter_ns
    start = clock()
    for i in range(count):
        t0 = clock()
        sess.run(None, feeds)
        lat[i] = clock() - t0
    wall = (clock() - start) / 1e9
    return {"p50": latency_summary_ms(lat)["p50"], "throughput_ips": count / wall}


def make_models(work: Path, realmodels: Path) -> list[tuple[str, Path, str, str | None]]:
    """(label, fp32 model, calibration source, preprocessing size) for each model to measure."""
    models = []
    digits = work / "digits"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_digits_model.py"), str(digits)],
                   check=True, stdout=subprocess.DEVNULL)
    models.append(("digits CNN (8x8)", digits / "digits_fp32.onnx", str(digits / "calib"), None))
    sr = realmodels / "super_resolution" / "super_resolution.onnx"
    if sr.is_file():
        rng = np.random.default_rng(0)
        calib = rng.uniform(0, 1, size=(24, 1, 1, 224, 224)).astype(np.float32)
        np.save(work / "sr_calib.npy", calib)
        models.append(("super_resolution (224x224)", sr, str(work / "sr_calib.npy"), None))
    return models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=2000, help="timed inferences per loop (small models)")
    ap.add_argument("--threads", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--realmodels", default=os.environ.get("EDGEKIT_REALMODELS",
                                                           str(ROOT.parent / "shared" / "realmodels")))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        priv, pub = init_keys(work / "keys")
        profile = load_profile("x86-64")
        for label, fp32, calib, _ in make_models(work, Path(args.realmodels)):
            result = convert(fp32, profile, calib, work / "bundles", priv, name=fp32.stem,
                             threads=args.threads)
            unpacked = unpack_bundle(result.bundle, work / f"unpacked-{fp32.stem}", pub)
            spec = result.manifest.inputs[0]
            feed = np.random.default_rng(0).standard_normal(spec.shape).astype(np.float32)
            probe = bare_loop(unpacked.model_path, args.threads, 20, 5, feed)
            count = max(50, min(args.count, int(2.0 / max(probe["p50"] / 1e3, 1e-6))))
            warmup = max(10, count // 20)
            agent_p50, bare_p50, fp32_p50, agent_tp, bare_tp = [], [], [], [], []
            for _ in range(args.rounds):
                b = bare_loop(unpacked.model_path, args.threads, count, warmup, feed)
                a = bench(result.bundle, pub, warmup=warmup, count=count, threads=args.threads,
                          hardware=DeviceOptions(power="none"))  # overhead only; the bare loop has no sampler
                f = bare_loop(fp32, args.threads, count, warmup, feed)
                bare_p50.append(b["p50"])
                bare_tp.append(b["throughput_ips"])
                agent_p50.append(a["latency_ms"]["p50"])
                agent_tp.append(a["throughput_ips"])
                fp32_p50.append(f["p50"])
            rows.append({
                "model": label,
                "threads": args.threads,
                "count": count,
                "rounds": args.rounds,
                "bare_int8_p50_ms": statistics.median(bare_p50),
                "agent_int8_p50_ms": statistics.median(agent_p50),
                "agent_over_bare_p50": statistics.median(a / b for a, b in zip(agent_p50, bare_p50, strict=True)),
                "agent_over_bare_throughput": statistics.median(
                    a / b for a, b in zip(agent_tp, bare_tp, strict=True)),
                "fp32_p50_ms": statistics.median(fp32_p50),
                "int8_speedup_vs_fp32": statistics.median(f / b for f, b in zip(fp32_p50, bare_p50, strict=True)),
            })
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = [("model", "model", "{}"), ("thr", "threads", "{}"), ("n", "count", "{}"),
            ("bare int8 p50 ms", "bare_int8_p50_ms", "{:.4f}"),
            ("agent int8 p50 ms", "agent_int8_p50_ms", "{:.4f}"),
            ("agent/bare p50", "agent_over_bare_p50", "{:.3f}"),
            ("agent/bare thrpt", "agent_over_bare_throughput", "{:.3f}"),
            ("fp32 p50 ms", "fp32_p50_ms", "{:.4f}"), ("int8 speed-up", "int8_speedup_vs_fp32", "{:.2f}x")]
    table = [[fmt.format(r[key]) for _, key, fmt in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, (h, _, _) in enumerate(cols)]
    print("  ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths, strict=True)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))
    print(f"(median of {args.rounds} interleaved rounds; agent/bare p50 near 1.00 means no overhead; "
          "int8 speed-up > 1 means int8 is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
