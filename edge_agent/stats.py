"""Pure functions for latency statistics (no I/O, no clocks).

Latencies are kept as integer nanoseconds from ``time.perf_counter_ns`` and summarised in milliseconds.
Percentiles use the "linear" method (numpy's default, type 7 of Hyndman & Fan), so figures match
``numpy.percentile`` and most benchmark tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


PERCENTILES = (50.0, 90.0, 95.0, 99.0, 99.9)
SUMMARY_KEYS = ("p50", "p90", "p95", "p99", "p999", "mean", "std", "max", "min")


def _key(p: float) -> str:
    return "p" + f"{p:g}".replace(".", "")


def latency_summary_ms(samples_ns: Sequence[int] | np.ndarray) -> dict[str, float | None]:
    """p50/p90/p95/p99/p99.9, mean, std (population), max and min in milliseconds.

    An empty sample gives ``None`` for every figure (a window with no inference is not zero latency).
    """
    import numpy as np  # imported on first use: the host CLI starts faster without it

    arr = np.asarray(samples_ns, dtype=np.float64)
    if arr.size == 0:
        return dict.fromkeys(SUMMARY_KEYS)
    ms = arr / 1e6
    pct = np.percentile(ms, PERCENTILES)
    out: dict[str, float | None] = {_key(p): float(v) for p, v in zip(PERCENTILES, pct, strict=True)}
    out["mean"] = float(ms.mean())
    out["std"] = float(ms.std())
    out["max"] = float(ms.max())
    out["min"] = float(ms.min())
    return out


def throughput(count: int, elapsed_s: float) -> float | None:
    """Inferences per second over a wall-clock span; None when the span is empty."""
    if elapsed_s <= 0:
        return None
    return count / elapsed_s


def ratio(a: float, b: float) -> float:
    """a / b, guarding b == 0."""
    if b == 0:
        return float("inf") if a else float("nan")
    return a / b
