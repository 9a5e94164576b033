"""edge_agent.telemetry.schema: build_window fields and validate_window (pure functions)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
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


# ------------------------------------------------------------------------------------------------ fast path
# validate_window answers "valid" from a quick exact-type check (_surely_valid) and otherwise runs the full
# check (_problems, the original validator). The fast path may only ever say yes where the full check
# finds nothing: on any window, valid or broken, both must give the same answer (or raise the same error).

from edge_agent.telemetry.schema import OPTIONAL_FIELDS, _problems, _surely_valid  # noqa: E402

_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-5, max_value=5),
    st.integers(min_value=-10**30, max_value=10**30), st.just(10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.just(-0.0), st.text(max_size=3),
    st.sampled_from(["", "x", SCHEMA, "pi-7", "none"]))
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6)
_TOP_KEYS = st.sampled_from([*FIELDS, *OPTIONAL_FIELDS, "extra", ""])
_LAT_KEYS = st.sampled_from([*LATENCY_KEYS, "p75"])
_MODEL_KEYS = st.sampled_from(["name", "version", "sha256", "extra"])
_POWER_KEYS = st.sampled_from(["mean", "idle", "source", "extra"])


@st.composite
def _mutated_window(draw: st.DrawFn) -> dict:
    kw: dict = {}
    if draw(st.booleans()):
        kw["cpu_mhz"] = draw(st.one_of(st.none(), st.floats(0, 5000)))
    if draw(st.booleans()):
        kw["spool"] = (draw(st.integers(0, 10)), draw(st.one_of(st.none(), st.floats(0, 100))))
    if draw(st.booleans()):
        kw["power"] = {"source": "ina3221", "mean_w": draw(st.floats(0, 20)), "idle_w": draw(st.floats(0, 5))}
    ns = draw(st.lists(st.integers(1, 10**9), max_size=20))
    w = json.loads(json.dumps(window(latencies_ns=ns, **kw)))  # JSON types, as the monitor sees them
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(["top", "del", "lat", "model", "power", "order", "int_latency"]))
        if where == "top":
            w[draw(_TOP_KEYS)] = draw(_JSON)
        elif where == "del" and w:
            w.pop(draw(st.sampled_from(sorted(w))))
        elif where in ("lat", "model", "power"):
            key = {"lat": "latency_ms", "model": "model", "power": "power_w"}[where]
            sub = w.get(key)
            if isinstance(sub, dict):
                k = draw({"lat": _LAT_KEYS, "model": _MODEL_KEYS, "power": _POWER_KEYS}[where])
                if draw(st.booleans()):
                    sub[k] = draw(_JSON)
                else:
                    sub.pop(k, None)
        elif where == "order" and isinstance(w.get("latency_ms"), dict):
            lat = w["latency_ms"]
            for k in LATENCY_KEYS:
                lat[k] = draw(st.floats(0, 10, allow_nan=False))
        elif where == "int_latency" and isinstance(w.get("latency_ms"), dict):
            w["latency_ms"][draw(_LAT_KEYS)] = draw(st.sampled_from([0, 3, 10**400]))
    return w


def _outcome(f, w: dict) -> object:
    try:
        return f(w)
    except Exception as e:  # compare errors as well as answers
        return type(e).__name__


@settings(max_examples=1000)
@given(_mutated_window())
def test_fast_path_answers_as_the_full_check(w: dict) -> None:
    full = _outcome(_problems, copy.deepcopy(w))
    assert _outcome(validate_window, w) == full
    if _surely_valid(w):
        assert full == []


@given(st.lists(st.integers(min_value=1, max_value=10**10), min_size=0, max_size=50),
       st.booleans(), st.booleans())
def test_built_windows_take_the_fast_path(ns: list[int], with_mhz: bool, with_spool: bool) -> None:
    kw: dict = {"cpu_mhz": 1800.0} if with_mhz else {}
    if with_spool:
        kw["spool"] = (3, 12.5)
    w = json.loads(json.dumps(window(latencies_ns=ns, **kw)))
    assert _surely_valid(w)  # the monitor's common case never runs the full check


def test_fast_path_declines_what_it_does_not_know() -> None:
    w = json.loads(json.dumps(window()))
    assert _surely_valid(w)
    for mutate in (lambda d: d.update(seq=True), lambda d: d["latency_ms"].update(max=4),
                   lambda d: d.update(extra=1), lambda d: d.pop("fps"), lambda d: d.update(spool_depth=None),
                   lambda d: d.update(temp_c=float("inf")), lambda d: d["model"].update(name=None)):
        d = copy.deepcopy(w)
        mutate(d)
        assert not _surely_valid(d)
    # an integer latency is valid, but left to the full check (p90 + 1e-9 overflows for huge integers)
    d = copy.deepcopy(w)
    d["latency_ms"]["max"] = 4
    assert validate_window(d) == []


@pytest.mark.parametrize("where", ["latency_ms.max", "latency_ms.mean", "fps", "ts_end", "power_w.mean"])
def test_an_integer_beyond_the_float_range_never_crashes_the_check(where: str) -> None:
    w = window()
    first, _, second = where.partition(".")
    if second:
        w[first][second] = 10**400
    else:
        w[first] = 10**400
    problems = validate_window(w)  # JSON integers are unbounded; the check must still return
    assert isinstance(problems, list)
    if where == "latency_ms.max":  # compared with mean + 1e-9: beyond a float's range, reported
        assert problems == ["a number is beyond the range of a float"]
