"""edge_agent.power.sampler: trapezoid integration (exhaustively, with hypothesis), windows over samples
taken with a fake clock, RAPL counter differences across a wrap, and the real sampling thread."""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from edge_agent.errors import SourceError
from edge_agent.power.base import SourceContext
from edge_agent.power.rapl import RaplSource
from edge_agent.power.sampler import (
    PowerSampler,
    energy_mj_per_inference_for,
    integrate_energy_j,
    telemetry_power,
)
from edge_agent.telemetry.schema import build_window, validate_window
from tests.fakes_sysfs import rapl, write

# sorted timestamps (ns) as increments from a start, so they never go backwards
increments = st.lists(st.integers(0, 10**10), min_size=1, max_size=60)
starts = st.integers(0, 10**15)
finite_w = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


def _ts(start: int, steps: list[int]) -> list[int]:
    return list(itertools.accumulate(steps, initial=start))


# --------------------------------------------------------------------------------------------------
# integrate_energy_j


@given(starts, increments, st.floats(0, 1e4, allow_nan=False))
def test_constant_power_gives_p_times_t(start: int, steps: list[int], p: float) -> None:
    ts = _ts(start, steps)
    span_s = (ts[-1] - ts[0]) / 1e9
    assert integrate_energy_j(ts, [p] * len(ts)) == pytest.approx(p * span_s, rel=1e-9, abs=1e-9)


@given(starts, increments, finite_w, st.floats(-1e3, 1e3, allow_nan=False))
def test_linear_ramp_is_integrated_exactly(start: int, steps: list[int], a: float, b: float) -> None:
    ts = _ts(start, steps)
    secs = [(t - ts[0]) / 1e9 for t in ts]  # w = a + b·s, s in seconds from the first sample
    watts = [a + b * s for s in secs]
    exact = a * secs[-1] + b * secs[-1] ** 2 / 2
    scale = abs(a) * secs[-1] + abs(b) * secs[-1] ** 2 + 1e-9
    assert integrate_energy_j(ts, watts) == pytest.approx(exact, abs=1e-9 * scale)


@given(starts, increments, st.data())
def test_splitting_the_samples_adds_up(start: int, steps: list[int], data: st.DataObject) -> None:
    ts = _ts(start, steps)
    watts = data.draw(st.lists(finite_w, min_size=len(ts), max_size=len(ts)))
    k = data.draw(st.integers(0, len(ts) - 1))
    whole = integrate_energy_j(ts, watts)
    parts = integrate_energy_j(ts[: k + 1], watts[: k + 1]) + integrate_energy_j(ts[k:], watts[k:])
    assert parts == pytest.approx(whole, rel=1e-9, abs=1e-6)


@given(st.lists(st.integers(0, 10**12), min_size=2, max_size=40, unique=True), st.randoms())
def test_unsorted_timestamps_are_refused(ts: list[int], rnd: object) -> None:
    shuffled = list(ts)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    assume(shuffled != sorted(shuffled))
    with pytest.raises(ValueError, match="sorted"):
        integrate_energy_j(shuffled, [1.0] * len(shuffled))


def test_known_values_and_edges() -> None:
    assert integrate_energy_j([], []) == 0.0
    assert integrate_energy_j([5], [3.0]) == 0.0  # one sample spans no time
    assert integrate_energy_j([0, 1_000_000_000], [2.0, 4.0]) == pytest.approx(3.0)
    step = [0, 500_000_000, 500_000_000, 1_500_000_000]  # a step from 1 W to 9 W at 0.5 s
    assert integrate_energy_j(step, [1.0, 1.0, 9.0, 9.0]) == pytest.approx(9.5)
    with pytest.raises(ValueError, match="2 timestamps but 1"):
        integrate_energy_j([0, 1], [1.0])
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            integrate_energy_j([0, 1], [1.0, bad])


# --------------------------------------------------------------------------------------------------
# windows, with a fake clock and sample_once (no thread, no timing)


class FakeClock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


class ScriptedSource:
    """Returns the watts it is told; raises SourceError for ``None``."""

    name = "fake"
    note = "scripted"
    energy_counter = False

    def __init__(self) -> None:
        self.w: float | None = 0.0
        self.reads = 0

    def read_w(self) -> float:
        self.reads += 1
        if self.w is None:
            raise SourceError("the fake sensor is unplugged")
        return self.w

    def read_energy_j(self) -> float | None:
        return None

    def rails(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass


S = 1_000_000_000


def _sample_at(sampler: PowerSampler, clock: FakeClock, src: ScriptedSource, t_s: float, w: float | None) -> None:
    clock.t, src.w = int(t_s * S), w
    sampler.sample_once()


def test_ramp_window_mean_energy_and_selection() -> None:
    clock, src = FakeClock(), ScriptedSource()
    sampler = PowerSampler(src, 10, clock=clock)
    for i in range(11):  # 1 W at 0 s rising to 11 W at 10 s
        _sample_at(sampler, clock, src, i, 1.0 + i)
    win = sampler.window(0, 10 * S)
    assert win["samples"] == 11
    assert win["energy_j"] == pytest.approx(60.0)  # ∫(1 + t) dt over 0..10
    assert win["mean_w"] == pytest.approx(6.0)
    assert win["span_s"] == pytest.approx(10.0) and win["duration_s"] == pytest.approx(10.0)
    part = sampler.window(2 * S, 4 * S)  # samples at 2, 3, 4 s only
    assert (part["samples"], part["energy_j"], part["mean_w"]) == (3, pytest.approx(8.0), pytest.approx(4.0))


def test_one_sample_has_a_mean_but_no_energy_and_none_has_neither() -> None:
    clock, src = FakeClock(), ScriptedSource()
    sampler = PowerSampler(src, 10, clock=clock)
    _sample_at(sampler, clock, src, 5, 3.5)
    assert sampler.window(4 * S, 6 * S) == {"mean_w": 3.5, "energy_j": None, "samples": 1, "span_s": 0.0,
                                            "duration_s": 2.0, "errors": 0}
    empty = sampler.window(7 * S, 8 * S)
    assert (empty["mean_w"], empty["energy_j"], empty["samples"]) == (None, None, 0)
    with pytest.raises(ValueError, match="before it starts"):
        sampler.window(8 * S, 7 * S)


def test_read_errors_are_counted_not_hidden() -> None:
    clock, src = FakeClock(), ScriptedSource()
    sampler = PowerSampler(src, 10, clock=clock)
    _sample_at(sampler, clock, src, 0, 2.0)
    _sample_at(sampler, clock, src, 1, None)
    _sample_at(sampler, clock, src, 2, 2.0)
    win = sampler.window(0, 2 * S)
    assert (win["samples"], win["errors"], win["mean_w"]) == (2, 1, pytest.approx(2.0))
    assert sampler.errors == 1 and "unplugged" in str(sampler.last_error)


def test_ring_buffer_keeps_the_newest() -> None:
    clock, src = FakeClock(), ScriptedSource()
    sampler = PowerSampler(src, 1, buffer_s=20, clock=clock)  # room for 20 samples
    for i in range(50):
        _sample_at(sampler, clock, src, i, float(i))
    kept = sampler.samples()
    assert len(kept) == 20 and kept[0] == (30 * S, 30.0) and kept[-1] == (49 * S, 49.0)


def test_energy_per_inference_reuses_the_telemetry_formula() -> None:
    clock, src = FakeClock(), ScriptedSource()
    sampler = PowerSampler(src, 10, clock=clock)
    for i in range(11):
        _sample_at(sampler, clock, src, i, 5.0)
    win = sampler.window(0, 10 * S)
    assert energy_mj_per_inference_for(win, count=100) == pytest.approx(500.0)  # 5 W × 10 s / 100 → 0.5 J
    assert energy_mj_per_inference_for(win, count=100, idle_w=3.0) == pytest.approx(200.0)  # (5 − 3) W
    assert energy_mj_per_inference_for(win, count=0) is None
    doc = build_window(device="d", seq=1, ts_start=0.0, ts_end=10.0, model={"name": "m", "version": "1",
                       "sha256": "x"}, backend_info={"engine": "onnxruntime"}, latencies_ns=[1_000_000] * 100,
                       power=telemetry_power("rapl", win, idle_w=3.0), temp_c=None, cpu_pct=None, rss_mb=None,
                       throttled=None, dropped=0)
    assert validate_window(doc) == []
    assert doc["power_w"] == {"mean": 5.0, "idle": 3.0, "source": "rapl"}
    assert doc["energy_mj_per_inference"] == pytest.approx(200.0)


def test_rapl_windows_use_counter_differences_across_a_wrap(tmp_path: Path) -> None:
    max_range = 10_000_000  # a tiny range so the counter wraps within the test
    zone = rapl(tmp_path, energy_uj=6_000_000, max_range_uj=max_range)
    clock = FakeClock()
    src = RaplSource(SourceContext(sysfs_root=tmp_path), clock=clock)
    sampler = PowerSampler(src, 10, clock=clock)
    assert sampler.counter
    for i, uj in enumerate([6_000_000, 8_000_000, 1_000_000, 3_000_000]):  # +2 J, +3 J (wrapped), +2 J
        write(zone / "energy_uj", uj)
        clock.t = i * S
        sampler.sample_once()
    win = sampler.window(0, 3 * S)
    assert win["energy_j"] == pytest.approx(7.0)
    assert win["mean_w"] == pytest.approx(7.0 / 3)
    assert sampler.window(1 * S, 2 * S)["energy_j"] == pytest.approx(3.0)


# --------------------------------------------------------------------------------------------------
# the thread


def test_thread_integrates_a_constant_source() -> None:
    src = ScriptedSource()
    src.w = 2.5
    sampler = PowerSampler(src, 200)
    t0 = time.monotonic_ns()
    with sampler:
        time.sleep(0.2)
        deadline = time.monotonic() + 10  # a loaded machine may sample slowly: wait for samples, not time
        while len(sampler.samples()) < 5:
            assert time.monotonic() < deadline, "the sampler took no samples"
            time.sleep(0.01)
        t1 = time.monotonic_ns()
        win = sampler.window(t0, t1)
    assert not sampler.running
    assert win["samples"] >= 5 and win["errors"] == 0
    assert win["mean_w"] == pytest.approx(2.5)
    assert win["energy_j"] == pytest.approx(2.5 * win["span_s"])
    ts = [t for t, _ in sampler.samples()]
    assert ts == sorted(ts) and ts[0] >= t0  # monotonic timestamps (some may follow t1, before stop)
    reads = src.reads
    time.sleep(0.05)
    assert src.reads == reads  # stopped means stopped


def test_a_crashed_sampler_is_reported_not_silent() -> None:
    class Broken(ScriptedSource):
        def read_w(self) -> float:
            raise ZeroDivisionError("a bug in a driver")

    sampler = PowerSampler(Broken(), 100).start()
    deadline = time.monotonic() + 10
    while sampler.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(SourceError, match="stopped: ZeroDivisionError: a bug in a driver"):
        sampler.window(0, time.monotonic_ns())
    with pytest.raises(SourceError):
        sampler.stop()


def test_rate_must_be_positive() -> None:
    for hz in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="positive"):
            PowerSampler(ScriptedSource(), hz)
