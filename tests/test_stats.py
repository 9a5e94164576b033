"""edge_agent.stats: latency percentiles match numpy, empty windows are None, order properties hold."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.stats import SUMMARY_KEYS, latency_summary_ms, ratio, throughput

samples_ns = st.lists(st.integers(min_value=0, max_value=10**11), min_size=1, max_size=300)


def test_percentiles_match_numpy_linear() -> None:
    rng = np.random.default_rng(1)
    ns = rng.integers(50_000, 5_000_000, size=1001)
    s = latency_summary_ms(ns)
    ms = ns / 1e6
    for key, p in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99), ("p999", 99.9)):
        assert s[key] == pytest.approx(np.percentile(ms, p), rel=1e-12)
    assert s["mean"] == pytest.approx(ms.mean())
    assert s["std"] == pytest.approx(ms.std())
    assert s["max"] == pytest.approx(ms.max())
    assert s["min"] == pytest.approx(ms.min())


def test_known_values() -> None:
    s = latency_summary_ms([1_000_000, 2_000_000, 3_000_000, 4_000_000])
    assert s["p50"] == pytest.approx(2.5)
    assert s["max"] == pytest.approx(4.0)
    assert s["mean"] == pytest.approx(2.5)
    assert s["p90"] == pytest.approx(3.7)


@pytest.mark.parametrize("empty", [[], np.array([], dtype=np.int64)])
def test_empty_window_is_none_not_zero(empty: list[int]) -> None:
    s = latency_summary_ms(empty)
    assert set(s) == set(SUMMARY_KEYS)
    assert all(v is None for v in s.values())


def test_single_sample() -> None:
    s = latency_summary_ms([1_500_000])
    assert s["p50"] == s["p99"] == s["max"] == s["min"] == s["mean"] == pytest.approx(1.5)
    assert s["std"] == 0.0


@given(samples_ns)
def test_percentiles_are_ordered(ns: list[int]) -> None:
    s = latency_summary_ms(ns)
    order = [s[k] for k in ("min", "p50", "p90", "p95", "p99", "p999", "max")]
    assert all(a <= b * (1 + 1e-12) + 1e-12 for a, b in itertools.pairwise(order))


@given(samples_ns)
def test_mean_between_min_and_max(ns: list[int]) -> None:
    s = latency_summary_ms(ns)
    assert s["min"] - 1e-9 <= s["mean"] <= s["max"] + 1e-9
    assert s["std"] >= 0


@given(samples_ns)
def test_permutation_invariant(ns: list[int]) -> None:
    assert latency_summary_ms(ns) == pytest.approx(latency_summary_ms(list(reversed(ns))))


def test_throughput_and_ratio() -> None:
    assert throughput(100, 2.0) == 50.0
    assert throughput(5, 0.0) is None
    assert ratio(6, 3) == 2
    assert ratio(1, 0) == float("inf")
    assert math.isnan(ratio(0, 0))
