"""edge_agent.telemetry.schema: build_window fields and validate_window (pure functions)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.telemetry.schema import (
    FIELDS,
    LATENCY_KEYS,
    SCHEMA,
    build_window,
    energy_mj_per_inference,
    validate_window,
)

MODEL = {"name": "digits", "version": "1.2.0", "sha256": "ab" * 32}
INFO = {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "delegate": None, "degraded": False,
        "degraded_reason": None, "providers_requested": ["CPUExecutionProvider"], "threads": 2}


def window(**over: object) -> dict:
    kw = dict(device="pi-7", seq=3, ts_start=1_700_000_000.0, ts_end=1_700_000_010.0, model=MODEL,
              backend_info=INFO, latencies_ns=[1_000_000, 2_000_000, 3_000_000, 4_000_000], power=None,
              temp_c=51.234, cpu_pct=97.12, rss_mb=61.5, throttled=None, dropped=0)
    kw.update(over)
    return build_window(**kw)  # type: ignore[arg-type]


def test_fields_and_values() -> None:
    w = window()
    assert tuple(w) == FIELDS
    assert w["schema"] == SCHEMA
    assert w["count"] == 4
    assert w["latency_ms"] == {"p50": 2.5, "p90": 3.7, "p95": 3.85, "p99": 3.97, "max": 4.0, "mean": 2.5}
    assert w["fps"] == pytest.approx(0.4)
    assert w["providers"] == ["CPUExecutionProvider"]
    assert w["power_w"] == {"mean": None, "idle": None, "source": "none"}
    assert w["energy_mj_per_inference"] is None
    assert w["temp_c"] == 51.23
    assert w["historical"] is False
    assert w["throttled"] is None
    assert validate_window(w) == []
    json.dumps(w, allow_nan=False)  # plain JSON, no NaN


def test_empty_window_has_null_latencies() -> None:
    w = window(latencies_ns=[])
    assert w["count"] == 0
    assert all(v is None for v in w["latency_ms"].values())
    assert w["fps"] == 0.0
    assert validate_window(w) == []


def test_array_q_buffer_is_accepted() -> None:
    from array import array

    w = window(latencies_ns=array("q", [5_000_000, 1_000_000]))
    assert w["count"] == 2 and w["latency_ms"]["max"] == 5.0


def test_zero_length_window_has_no_fps() -> None:
    assert window(ts_end=1_700_000_000.0)["fps"] is None


def test_power_and_energy() -> None:
    w = window(power={"source": "ina3221", "mean_w": 5.0, "idle_w": 3.0})
    # (5 - 3) W * 10 s / 4 inferences = 5 J = 5000 mJ
    assert w["energy_mj_per_inference"] == pytest.approx(5000.0)
    assert w["power_w"] == {"mean": 5.0, "idle": 3.0, "source": "ina3221"}
    assert validate_window(w) == []
    w2 = window(power={"source": "rapl", "mean_w": 2.0, "idle_w": None})
    assert w2["energy_mj_per_inference"] == pytest.approx(5000.0)


def test_energy_function_edges() -> None:
    assert energy_mj_per_inference(None, None, 10, 5) is None
    assert energy_mj_per_inference(5.0, None, 10, 0) is None
    assert energy_mj_per_inference(5.0, 1.0, 0, 5) is None
    assert energy_mj_per_inference(1.0, None, 1.0, 1000) == pytest.approx(1.0)


def test_degraded_is_carried_with_reason() -> None:
    info = {**INFO, "degraded": True, "degraded_reason": "CUDAExecutionProvider not available"}
    w = window(backend_info=info)
    assert w["degraded"] is True and "CUDA" in w["degraded_reason"]
    assert validate_window(w) == []


@pytest.mark.parametrize("mutate, problem", [
    (lambda w: w.update(schema="edgekit.telemetry/2"), "schema"),
    (lambda w: w.pop("seq"), "missing fields: seq"),
    (lambda w: w.update(extra=1), "unknown fields: extra"),
    (lambda w: w.update(seq=-1), "seq"),
    (lambda w: w.update(count=True), "count"),
    (lambda w: w.update(ts_end=w["ts_start"] - 1), "ts_end is before ts_start"),
    (lambda w: w.update(device=""), "device"),
    (lambda w: w["latency_ms"].update(p50=10.0), "p50 <= p90"),
    (lambda w: w["latency_ms"].pop("p99"), "latency_ms"),
    (lambda w: w.update(count=0), "count 0 has null latencies"),
    (lambda w: w.update(fps="fast"), "fps"),
    (lambda w: w.update(degraded=True), "degraded_reason"),
    (lambda w: w.update(throttled="no"), "throttled"),
    (lambda w: w["model"].pop("sha256"), "model.sha256"),
    (lambda w: w.update(providers="CPU"), "providers"),
    (lambda w: w.update(power_w={"mean": 1.0}), "power_w"),
    (lambda w: w.update(temp_c=float("nan")), "temp_c"),
])
def test_validate_finds_problems(mutate, problem: str) -> None:
    w = copy.deepcopy(window())
    mutate(w)
    problems = validate_window(w)
    assert any(problem in p for p in problems), problems


def test_validate_non_object() -> None:
    assert validate_window([1, 2]) == ["window: expected a JSON object, got list"]


@given(st.lists(st.integers(min_value=1, max_value=10**10), min_size=0, max_size=200),
       st.floats(min_value=0.001, max_value=1e5))
def test_built_windows_always_validate(ns: list[int], span: float) -> None:
    w = window(latencies_ns=np.array(ns, dtype=np.int64), ts_end=1_700_000_000.0 + span)
    assert validate_window(w) == []
    assert set(w["latency_ms"]) == set(LATENCY_KEYS)


def test_validate_never_raises_on_huge_json_integers() -> None:
    # JSON allows integers of any size; math.isfinite(10**400) would raise OverflowError
    w = json.loads(json.dumps(window()))
    w["fps"] = 10**400
    w["temp_c"] = 10**400
    assert validate_window(w) == []  # an int is a finite number, however large
    w["seq"] = True
    w["cpu_pct"] = float("inf")
    problems = validate_window(w)
    assert any(p.startswith("seq:") for p in problems) and any(p.startswith("cpu_pct:") for p in problems)
