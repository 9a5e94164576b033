"""Telemetry benchmarks: the spool's replay rate after an outage, and the cost of telemetry on inference.

(a) replay: with the broker down, 10,000 windows (real ``build_window`` documents, ~650 bytes) are appended
    to a fresh spool; then a private Mosquitto (free loopback port, ``max_queued_messages 0``) is started
    and a ``SpoolingSink`` forwards them (QoS 1, at most ``--inflight`` unacknowledged, deleted on PUBACK).
    Rate = windows / (time from the connection to the spool being empty). Target >= 2,000 windows/s.
(b) cost: ``run_agent`` on the same tiny ONNX MLP (16->32->4, tests/models.py), synthetic source, 1 thread,
    windows of 0.2 s (50x the default rate), telemetry off (no MQTT, no state dir) vs on (durable spool in a
    temp state dir + MQTT to the private broker), rounds interleaved (off/on, on/off, ...). Throughput =
    inferences of all windows / their summed wall time. Ratio on / off per round and the median. Target
    >= 0.99.

    .venv/bin/python bench/telemetry_replay.py [--windows 10000] [--rounds 6] [--seconds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.keys import init_keys  # noqa: E402
from edge_agent.hardware import DeviceOptions  # noqa: E402
from edge_agent.service import run_agent  # noqa: E402
from edge_agent.telemetry.schema import build_window  # noqa: E402
from edge_agent.telemetry.spool import Spool, SpoolingSink  # noqa: E402
from tests.mosquitto import Mosquitto  # noqa: E402
from tests.test_agent_cli import make_bundle  # noqa: E402

BIRTH = {"agent_version": "bench", "model": {"name": "mlp", "version": "1.0.0", "sha256": "0" * 64}}


def sample_window(i: int, t: float) -> dict[str, Any]:
    return build_window(device="bench", seq=i, ts_start=t - 10, ts_end=t, model=BIRTH["model"],
                        backend_info={"engine": "onnxruntime", "providers": ["CPUExecutionProvider"],
                                      "delegate": None, "degraded": False, "degraded_reason": None},
                        latencies_ns=list(range(10_000, 60_000, 50)), power=None, temp_c=51.2, cpu_pct=98.0,
                        rss_mb=80.1, throttled=False, dropped=0, cpu_mhz=None, spool=(i, 12.0))


def replay(workdir: Path, n: int, inflight: int) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    spool = Spool(workdir / "spool.db", max_bytes=2**30, max_age_s=10 * 86400)
    now = time.time() - 3600
    template = sample_window(0, now)
    windows = [{**template, "ts_start": now + i * 0.1 - 10, "ts_end": now + i * 0.1} for i in range(n)]
    t0 = time.perf_counter()
    for w in windows:
        spool.append(w)
    fill_s = time.perf_counter() - t0
    payload = len(spool.pending(1)[0].payload)
    broker = Mosquitto(workdir / "broker")  # configured now, started after the spool is full
    broker.start()
    try:
        sink = SpoolingSink(spool, {"host": broker.host, "port": broker.port, "device_id": "bench",
                                    "birth": BIRTH}, max_inflight=inflight)
        if not sink.publisher.wait_connected(10):
            raise RuntimeError("no connection to the private broker")
        t_conn = time.perf_counter()
        while spool.depth() > 0:
            if time.perf_counter() - t_conn > 120:
                raise RuntimeError(f"replay stalled with {spool.depth()} windows left")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t_conn
        historical = sink.historical_sent
        sink.close(timeout=5)
    finally:
        broker.stop()
    return {"windows": n, "payload_bytes": payload, "fill_s": round(fill_s, 3),
            "append_us": round(fill_s / n * 1e6, 1), "replay_s": round(elapsed, 3),
            "windows_per_s": round(n / elapsed), "historical": historical, "inflight": inflight}


def agent_throughput(bundle: Path, pub: Path, seconds: float, telemetry: bool, workdir: Path,
                     broker: Mosquitto) -> float:
    counts: list[int] = []
    spans: list[float] = []

    def on_window(w: dict[str, Any]) -> None:
        counts.append(w["count"])
        spans.append(w["ts_end"] - w["ts_start"])

    state = Path(tempfile.mkdtemp(dir=workdir)) if telemetry else None
    run_agent(bundle, pub, source="synthetic", duration=seconds, window_s=0.2, threads=1, device_id="bench",
              mqtt=(broker.host, broker.port) if telemetry else None, state_dir=state, on_window=on_window,
              hardware=DeviceOptions(power="none"))
    return sum(counts) / sum(spans)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=10_000)
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edgekit-bench-") as tmp:
        work = Path(tmp)
        rep = replay(work / "replay", args.windows, args.inflight)
        private, pub = init_keys(work / "keys")
        bundle = make_bundle(work / "mlp.edgebundle", private)
        broker = Mosquitto(work / "broker2").start()
        rounds = []
        try:
            for r in range(args.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                res = {t: agent_throughput(bundle, pub, args.seconds, t, work, broker) for t in order}
                rounds.append({"off_ips": round(res[False]), "on_ips": round(res[True]),
                               "ratio": round(res[True] / res[False], 4)})
        finally:
            broker.stop()
    ratios = [r["ratio"] for r in rounds]
    result = {"replay": rep, "cost": {"rounds": rounds, "median_ratio": round(statistics.median(ratios), 4),
                                      "window_s": 0.2, "seconds": args.seconds}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"replay: {rep['windows']} windows of {rep['payload_bytes']} B, spool fill {rep['fill_s']} s "
          f"({rep['append_us']} us/append), replay {rep['replay_s']} s = {rep['windows_per_s']} windows/s "
          f"(target >= 2000; {rep['historical']} marked historical; {rep['inflight']} in flight)")
    print(f"{'round':>5} {'off ips':>10} {'on ips':>10} {'on/off':>8}")
    for i, r in enumerate(rounds):
        print(f"{i:>5} {r['off_ips']:>10} {r['on_ips']:>10} {r['ratio']:>8.4f}")
    print(f"median on/off = {result['cost']['median_ratio']} (target >= 0.99)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
