"""Sample a power source on a thread and turn a time window into mean watts and joules.

``PowerSampler(source, hz)`` reads the source ``hz`` times a second into a ring buffer of
``(monotonic ns, watts | cumulative joules)``. ``window(t0_ns, t1_ns)`` summarises the samples taken in
``[t0_ns, t1_ns]`` (timestamps from ``time.monotonic_ns``, the sampler's clock):

- watt sources: energy by the trapezoid rule over the samples (``integrate_energy_j``), mean watts =
  energy / time between the first and the last sample (one sample: its watts, energy ``None``);
- energy counters (RAPL, ``source.energy_counter``): energy = counter difference between the first and
  the last sample in the window, mean = energy / their time difference (needs two samples).

The figures describe the span the samples cover (``span_s``), which is at most one sampling period
shorter at each end than the window. Energy per inference is ``telemetry.schema.energy_mj_per_inference``
(mean watts minus the idle baseline, times the window duration, per inference): see
``energy_mj_per_inference_for``.

A read that fails with an edgekit error (the sensor vanished, a meter timed out) is counted in
``errors`` (and in each window's ``errors``) and sampling goes on; ``last_error`` keeps the newest. Any
other exception stops the thread, and ``window``/``stop`` re-raise it as a ``SourceError``: a dead
sampler is never mistaken for a quiet one. The sampler does not own the source; close it yourself.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from edge_agent.errors import EdgekitError, SourceError
from edge_agent.power.base import PowerSource
from edge_agent.telemetry.schema import energy_mj_per_inference

DEFAULT_BUFFER_S = 900.0  # a ring of 15 minutes of samples


def integrate_energy_j(ts_ns: Sequence[int], watts: Sequence[float]) -> float:
    """Joules under the samples by the trapezoid rule (pure).

    ``ts_ns`` must be non-decreasing (equal timestamps add nothing) and as long as ``watts``; every value
    must be finite. Fewer than two samples span no time: 0.0.
    """
    if len(ts_ns) != len(watts):
        raise ValueError(f"{len(ts_ns)} timestamps but {len(watts)} power values")
    for w in watts:
        if not math.isfinite(w):
            raise ValueError(f"power values must be finite, got {w!r}")
    total = 0.0
    for i in range(1, len(ts_ns)):
        dt = ts_ns[i] - ts_ns[i - 1]
        if dt < 0:
            raise ValueError(f"timestamps must be sorted: {ts_ns[i]} comes after {ts_ns[i - 1]} (index {i})")
        total += (watts[i] + watts[i - 1]) * 0.5 * (dt / 1e9)
    return total


def energy_mj_per_inference_for(window: dict[str, Any], count: int, idle_w: float | None = None) -> float | None:
    """Millijoules per inference over a ``PowerSampler.window`` result (None without power or inferences)."""
    return energy_mj_per_inference(window["mean_w"], idle_w, window["duration_s"], count)


def telemetry_power(source_name: str, window: dict[str, Any], idle_w: float | None = None) -> dict[str, Any]:
    """The ``power`` argument of ``telemetry.schema.build_window``."""
    return {"source": source_name, "mean_w": window["mean_w"], "idle_w": idle_w}


class PowerSampler:
    """Samples ``source`` at ``hz`` on a daemon thread (``start``/``stop``, or ``with``)."""

    def __init__(self, source: PowerSource, hz: float, *, buffer_s: float = DEFAULT_BUFFER_S,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        if not (hz > 0 and math.isfinite(hz)):
            raise ValueError(f"sampling rate must be a positive number of Hz, got {hz!r}")
        self.source = source
        self.hz = float(hz)
        self.period_ns = int(1e9 / hz)
        self.counter = bool(getattr(source, "energy_counter", False))
        self._clock = clock
        self._samples: deque[tuple[int, float]] = deque(maxlen=max(16, math.ceil(hz * buffer_s)))
        self._error_ts: deque[int] = deque(maxlen=max(16, math.ceil(hz * buffer_s)))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fatal: BaseException | None = None
        self.errors = 0
        self.last_error: EdgekitError | None = None

    # ---------------------------------------------------------------------------------------------
    def sample_once(self) -> None:
        """Take one sample now (the thread calls this; tests may call it directly)."""
        try:
            value = self.source.read_energy_j() if self.counter else self.source.read_w()
        except EdgekitError as e:
            t = self._clock()
            with self._lock:
                self.errors += 1
                self.last_error = e
                self._error_ts.append(t)
            return
        if value is None:
            raise SourceError(f"power source {self.source.name!r} says it has an energy counter but read none")
        t = self._clock()
        with self._lock:
            self._samples.append((t, float(value)))

    def _run(self) -> None:
        try:
            next_t = time.monotonic_ns()
            while not self._stop.is_set():
                self.sample_once()
                next_t += self.period_ns
                now = time.monotonic_ns()
                if next_t < now:  # fell behind (a slow read): skip the missed slots, no burst
                    next_t = now
                self._stop.wait((next_t - now) / 1e9)
        except Exception as e:  # stored and re-raised by window()/stop(), never swallowed
            self._fatal = e

    def start(self) -> PowerSampler:
        if self._thread is not None:
            raise RuntimeError("the power sampler is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"power-sampler-{self.source.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (the source stays open); re-raises a failure that killed it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._check()

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check(self) -> None:
        if self._fatal is not None:
            raise SourceError(f"the power sampler for {self.source.name!r} stopped: "
                              f"{type(self._fatal).__name__}: {self._fatal}") from self._fatal

    # ---------------------------------------------------------------------------------------------
    def samples(self) -> list[tuple[int, float]]:
        """A copy of the ring buffer: (monotonic ns, watts or cumulative joules)."""
        with self._lock:
            return list(self._samples)

    def window(self, t0_ns: int, t1_ns: int) -> dict[str, Any]:
        """``{"mean_w", "energy_j", "samples", "span_s", "duration_s", "errors"}`` for ``[t0_ns, t1_ns]``."""
        self._check()
        if t1_ns < t0_ns:
            raise ValueError(f"window ends ({t1_ns}) before it starts ({t0_ns})")
        with self._lock:
            inside = [s for s in self._samples if t0_ns <= s[0] <= t1_ns]
            errors = sum(1 for t in self._error_ts if t0_ns <= t <= t1_ns)
        ts = [t for t, _ in inside]
        values = [v for _, v in inside]
        span_s = (ts[-1] - ts[0]) / 1e9 if len(ts) >= 2 else 0.0
        mean_w: float | None = None
        energy_j: float | None = None
        if self.counter:
            if len(ts) >= 2:
                energy_j = values[-1] - values[0]
                mean_w = energy_j / span_s if span_s > 0 else None
        elif len(ts) == 1:
            mean_w = values[0]
        elif len(ts) >= 2:
            energy_j = integrate_energy_j(ts, values)
            mean_w = energy_j / span_s if span_s > 0 else sum(values) / len(values)
        return {"mean_w": mean_w, "energy_j": energy_j, "samples": len(ts), "span_s": span_s,
                "duration_s": (t1_ns - t0_ns) / 1e9, "errors": errors}
