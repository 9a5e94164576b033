"""``edge-agent bench``: measure a bundle on this device with the agent's own timing core.

Order: open the device side (profile, power source + sampler, thermal/throttle readers: an absent
configured power source fails here, before the model loads), verify and unpack, create the backend
(``init_ms``), one first inference (``first_inference_ms``, which includes lazy allocations and kernel
selection), ``warmup`` inferences (not counted), then the timed inferences through
``service.timed_loop``, exactly as the agent's loop runs them. ``throughput_ips`` is the count divided by
the wall time of the timed loop (input fetching included, as in the agent).

How many timed inferences:

- ``count`` alone (``--count N``): exactly N. This is the default (500) when nothing is given.
- ``duration_s`` and/or ``min_count`` (``--duration S`` / ``--min-count N``), MLPerf single-stream style:
  run until **both** at least ``min_count`` inferences (default 1) **and** at least ``duration_s`` seconds
  (default 0) have passed.
- ``count`` together with ``duration_s`` or ``min_count`` is an error (an exact count and a lower bound
  contradict each other).

Around the timed loop the device is read twice (start, end): hottest thermal zone, mean CPU MHz and the
throttle state; ``throttled_seen`` is true when either reading says so or a "has occurred" bit of
``vcgencmd get_throttled`` appeared in between. ``power`` is the mean power over the loop (see
``hardware.Device.span_power``), the idle baseline from ``state_dir`` when it matches, and energy per
inference; ``null`` without a power source.
"""

from __future__ import annotations

import math
import os
import resource
import time
from array import array
from typing import Any

from edge_agent.errors import InputError
from edge_agent.hardware import DeviceOptions
from edge_agent.service import open_session, timed_loop
from edge_agent.stats import latency_summary_ms

BENCH_LATENCY_KEYS = ("p50", "p90", "p95", "p99", "p999", "mean", "std", "max")
DEFAULT_COUNT = 500
_NEVER = 1 << 62


def _r(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stop_rule(count: int | None, duration_s: float | None, min_count: int | None) -> tuple[int, float]:
    """(minimum inferences, minimum seconds) for the timed loop; see the module docstring (pure)."""
    if count is not None and (duration_s is not None or min_count is not None):
        raise InputError("--count is an exact count; it cannot be combined with --duration or --min-count",
                         hint="use --count N alone, or --duration S with --min-count N (run until both are met)")
    if count is not None:
        if count < 1:
            raise InputError(f"--count must be at least 1, got {count}")
        return count, 0.0
    if duration_s is None and min_count is None:
        return DEFAULT_COUNT, 0.0
    if duration_s is not None and not (duration_s > 0 and math.isfinite(duration_s)):
        raise InputError(f"--duration must be longer than 0 s, got {duration_s}")
    if min_count is not None and min_count < 1:
        raise InputError(f"--min-count must be at least 1, got {min_count}")
    return (min_count if min_count is not None else 1), (duration_s or 0.0)


def bench(bundle_path: str | os.PathLike, pubkey: str | os.PathLike | None, *, warmup: int = 20,
          count: int | None = None, threads: int | None = None, source: str = "synthetic",
          duration_s: float | None = None, min_count: int | None = None,
          hardware: DeviceOptions | None = None, state_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Benchmark a verified bundle; see the module docstring for what each figure means.

    ``hardware`` defaults to ``DeviceOptions()`` (the manifest's profile under /sys).
    """
    if warmup < 0:
        raise InputError(f"--warmup must be 0 or more, got {warmup}")
    need_count, need_s = stop_rule(count, duration_s, min_count)
    exact = count is not None or (duration_s is None and min_count is None)
    with open_session(bundle_path, pubkey, source=source, threads=threads,
                      hardware=hardware if hardware is not None else DeviceOptions(), state_dir=state_dir) as sess:
        dev = sess.device
        assert dev is not None  # opened because hardware was given
        run, next_feeds = sess.backend.run, sess.source.next
        feeds = next_feeds()
        t0 = time.perf_counter_ns()
        run(feeds)
        first_ms = (time.perf_counter_ns() - t0) / 1e6
        timed_loop(run, next_feeds, array("q"), _NEVER, warmup)
        lat = array("q")
        r0 = dev.read()
        mono0 = time.monotonic_ns()
        start = time.perf_counter_ns()
        if exact:
            n, end = timed_loop(run, next_feeds, lat, _NEVER, need_count)
        else:
            n, end = timed_loop(run, next_feeds, lat, start + int(need_s * 1e9), _NEVER)
            if n < need_count:
                more, end = timed_loop(run, next_feeds, lat, _NEVER, need_count - n)
                n += more
        mono1 = time.monotonic_ns()
        wall_s = (end - start) / 1e9
        power = dev.span_power(mono0, mono1, n, wall_s)
        r1 = dev.read()
        info = sess.backend.info()
        m = sess.manifest
        summary = latency_summary_ms(lat)
        seen = [r.throttled for r in (r0, r1) if r.throttled is not None]
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
            "golden_check": sess.golden,
            "first_inference_ms": _r(first_ms, 4),
            "warmup": warmup,
            "stop_rule": ({"count": need_count} if exact else {"min_count": need_count, "duration_s": need_s}),
            "count": n,
            "wall_s": _r(wall_s, 6),
            "latency_ms": {k: _r(summary[k]) for k in BENCH_LATENCY_KEYS},
            "throughput_ips": _r(n / wall_s if wall_s > 0 else None, 2),
            "peak_rss_mb": _r(peak_rss_mb(), 1),
            "power": power,
            "temp_c_start": _r(r0.temp_c, 2),
            "temp_c_end": _r(r1.temp_c, 2),
            "throttled_seen": any(seen) if seen else None,
            "throttle_reasons": sorted({*r0.reasons, *r1.reasons}),
            "get_throttled": None if r1.state is None else r1.state.to_dict(),  # at the end (Raspberry Pi)
            "cpu_mhz_start": _r(r0.cpu_mhz, 1),
            "cpu_mhz_end": _r(r1.cpu_mhz, 1),
            "device": dev.describe(),
        }
