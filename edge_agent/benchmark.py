"""``edge-agent bench``: measure a bundle on this device with the agent's own timing core.

Order: verify and unpack, create the backend (``init_ms``), one first inference (``first_inference_ms``,
which includes lazy allocations and kernel selection), ``warmup`` inferences (not counted), then
``count`` timed inferences through ``service.timed_loop``, exactly as the agent's loop runs them.
``throughput_ips`` is ``count`` divided by the wall time of the timed loop (input fetching included,
as in the agent).
"""

from __future__ import annotations

import os
import resource
import time
from array import array
from typing import Any

from edge_agent.errors import InputError
from edge_agent.service import open_session, timed_loop
from edge_agent.stats import latency_summary_ms

BENCH_LATENCY_KEYS = ("p50", "p90", "p95", "p99", "p999", "mean", "std", "max")
_NEVER = 1 << 62


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(bundle_path: str | os.PathLike, pubkey: str | os.PathLike | None, *, warmup: int = 20,
          count: int = 500, threads: int | None = None, source: str = "synthetic") -> dict[str, Any]:
    """Benchmark a verified bundle; see the module docstring for what each figure means."""
    if warmup < 0:
        raise InputError(f"--warmup must be 0 or more, got {warmup}")
    if count < 1:
        raise InputError(f"--count must be at least 1, got {count}")
    with open_session(bundle_path, pubkey, source=source, threads=threads) as sess:
        run, next_feeds = sess.backend.run, sess.source.next
        feeds = next_feeds()
        t0 = time.perf_counter_ns()
        run(feeds)
        first_ms = (time.perf_counter_ns() - t0) / 1e6
        timed_loop(run, next_feeds, array("q"), _NEVER, warmup)
        lat = array("q")
        start = time.perf_counter_ns()
        n, end = timed_loop(run, next_feeds, lat, _NEVER, count)
        wall_s = (end - start) / 1e9
        info = sess.backend.info()
        m = sess.manifest
        summary = latency_summary_ms(lat)
        return {
            "bundle": {"name": m.name, "version": m.version, "profile": m.profile},
            "engine": info["engine"],
            "providers": info["providers"],
            "providers_requested": info["providers_requested"],
            "delegate": info["delegate"],
            "delegated_nodes": info.get("delegated_nodes"),  # LiteRT: N of M nodes delegated; None elsewhere
            "total_nodes": info.get("total_nodes"),
            "degraded": info["degraded"],
            "degraded_reason": info["degraded_reason"],
            "threads": info["threads"],
            "source": source,
            "init_ms": _r(sess.init_ms, 3),
            "first_inference_ms": _r(first_ms, 4),
            "warmup": warmup,
            "count": n,
            "latency_ms": {k: _r(summary[k]) for k in BENCH_LATENCY_KEYS},
            "throughput_ips": _r(n / wall_s if wall_s > 0 else None, 2),
            "peak_rss_mb": _r(peak_rss_mb(), 1),
        }
