"""The telemetry window: one JSON object per window, schema ``edgekit.telemetry/1``.

Pure functions (no clocks, no I/O): ``build_window`` turns what the loop measured into the document
described field by field in docs/telemetry.md; ``validate_window`` lists what is wrong with a received
one (the monitor uses it).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


from edge_agent.stats import latency_summary_ms

SCHEMA = "edgekit.telemetry/1"
LATENCY_KEYS = ("p50", "p90", "p95", "p99", "max", "mean")
FIELDS = (
    "schema", "device", "seq", "ts_start", "ts_end", "historical", "model", "engine", "delegate",
    "providers", "degraded", "degraded_reason", "count", "latency_ms", "fps", "power_w",
    "energy_mj_per_inference", "temp_c", "cpu_pct", "rss_mb", "throttled", "dropped",
)
# Fields added after edgekit.telemetry/1 was first published: a window may lack them (older agents), and
# build_window adds them only when the caller passes them. Still schema /1: the change is additive.
OPTIONAL_FIELDS = ("cpu_mhz", "spool_depth", "spool_oldest_age_s")


class _Absent:
    """Marks an optional field the caller did not pass (``None`` means "passed, but not known")."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(float(x), digits)


def energy_mj_per_inference(mean_w: float | None, idle_w: float | None, duration_s: float,
                            count: int) -> float | None:
    """Energy per inference in millijoules: (mean - idle) W × duration s / count × 1000.

    ``None`` without a power reading or without inferences. With an idle baseline the figure is the
    energy the inferences added; without one it is the board's whole energy per inference.
    """
    if mean_w is None or count <= 0 or duration_s <= 0:
        return None
    watts = mean_w - (idle_w or 0.0)
    return watts * duration_s / count * 1000.0


def build_window(*, device: str, seq: int, ts_start: float, ts_end: float, model: dict[str, Any],
                 backend_info: dict[str, Any], latencies_ns: Sequence[int] | np.ndarray,
                 power: dict[str, Any] | None, temp_c: float | None, cpu_pct: float | None,
                 rss_mb: float | None, throttled: bool | None, dropped: int,
                 historical: bool = False, cpu_mhz: float | _Absent | None = ABSENT,
                 spool: tuple[int, float | None] | None = None) -> dict[str, Any]:
    """One telemetry window (see docs/telemetry.md).

    ``power`` is ``None`` (no power source) or ``{"source": str, "mean_w": float | None,
    "idle_w": float | None}``. Timestamps are UNIX seconds (UTC) as floats. ``cpu_mhz`` (optional field,
    placed after ``cpu_pct``) is included only when passed; ``None`` gives ``null``. ``spool`` (optional
    fields ``spool_depth``, ``spool_oldest_age_s``, placed after ``dropped``) is (windows waiting in the
    durable spool, age in s of the oldest or None) when the agent spools telemetry.
    """
    import numpy as np  # imported on first use: the host CLI starts faster without it

    lat = np.asarray(latencies_ns, dtype=np.int64)  # a list, numpy array or array('q') (no copy)
    count = int(lat.size)
    summary = latency_summary_ms(lat)
    duration = ts_end - ts_start
    power = power or {}
    mean_w = power.get("mean_w")
    idle_w = power.get("idle_w")
    energy = energy_mj_per_inference(mean_w, idle_w, duration, count)
    window = {
        "schema": SCHEMA,
        "device": device,
        "seq": int(seq),
        "ts_start": round(float(ts_start), 6),
        "ts_end": round(float(ts_end), 6),
        "historical": bool(historical),
        "model": {"name": model.get("name"), "version": model.get("version"), "sha256": model.get("sha256")},
        "engine": backend_info.get("engine"),
        "delegate": backend_info.get("delegate"),
        "providers": list(backend_info.get("providers") or []),
        "degraded": bool(backend_info.get("degraded", False)),
        "degraded_reason": backend_info.get("degraded_reason"),
        "count": count,
        "latency_ms": {k: _round(summary[k], 4) for k in LATENCY_KEYS},
        "fps": _round(count / duration, 3) if duration > 0 else None,
        "power_w": {"mean": _round(mean_w, 4), "idle": _round(idle_w, 4), "source": power.get("source", "none")},
        "energy_mj_per_inference": _round(energy, 6),
        "temp_c": _round(temp_c, 2),
        "cpu_pct": _round(cpu_pct, 1),
        "rss_mb": _round(rss_mb, 2),
        "throttled": throttled,
        "dropped": int(dropped),
    }
    if spool is not None:
        window["spool_depth"] = int(spool[0])
        window["spool_oldest_age_s"] = _round(spool[1], 3)
    if isinstance(cpu_mhz, _Absent):
        return window
    out: dict[str, Any] = {}
    for key, value in window.items():
        out[key] = value
        if key == "cpu_pct":
            out["cpu_mhz"] = _round(cpu_mhz, 1)
    return out


# --------------------------------------------------------------------------------------------------
# validation


_ALLOWED = frozenset(FIELDS) | frozenset(OPTIONAL_FIELDS)
_LATENCY_SET = frozenset(LATENCY_KEYS)


def _is_num(x: Any) -> bool:
    # Exact types: a bool is not a number here; an int (any size, JSON allows 10**400) is always finite.
    t = type(x)
    return t is int or (t is float and math.isfinite(x))


def _opt_num(d: dict, key: str, problems: list[str], where: str = "") -> None:
    if key in d and d[key] is not None and not _is_num(d[key]):
        problems.append(f"{where}{key}: expected a number or null, got {d[key]!r}")


_FIELDS_SET = frozenset(FIELDS)
_OPT_NUMS = ("fps", "energy_mj_per_inference", "temp_c", "cpu_pct", "rss_mb")  # fields every window has
_isfinite = math.isfinite


def _surely_valid(d: dict) -> bool:
    """True only for a window ``_problems`` would find nothing wrong with: the monitor's common case, in
    less than half the time (2.7 vs 6.6 µs). False means "not sure": the full check decides and words them.

    Exact types throughout (``type(x) is str``, not ``isinstance``): anything unusual, a subclass, a bool
    where a number goes, an integer latency (whose comparison with a float may overflow), takes the full
    check, so this can only say yes where the full check says yes (tests compare the two on random windows).
    """
    keys = d.keys()
    if d.get("schema") != SCHEMA or not (_FIELDS_SET <= keys <= _ALLOWED):
        return False
    dev = d["device"]
    if type(dev) is not str or not dev:
        return False
    for v in (d["seq"], d["count"], d["dropped"]):
        if type(v) is not int or v < 0:
            return False
    ts, te = d["ts_start"], d["ts_end"]
    t = type(ts)
    if not (t is int or (t is float and _isfinite(ts))):
        return False
    t = type(te)
    if not (t is int or (t is float and _isfinite(te))) or te < ts:
        return False
    degraded = d["degraded"]
    if type(d["historical"]) is not bool or type(degraded) is not bool:
        return False
    v = d["throttled"]
    if v is not None and type(v) is not bool:
        return False
    model = d["model"]
    if (type(model) is not dict or type(model.get("name")) is not str or type(model.get("version")) is not str
            or type(model.get("sha256")) is not str):
        return False
    if type(d["engine"]) is not str:
        return False
    v = d["delegate"]
    if v is not None and type(v) is not str:
        return False
    reason = d["degraded_reason"]
    if reason is not None and type(reason) is not str:
        return False
    if degraded and not reason:
        return False
    providers = d["providers"]
    if type(providers) is not list:
        return False
    for v in providers:
        if type(v) is not str:
            return False
    lat = d["latency_ms"]
    if type(lat) is not dict or lat.keys() != _LATENCY_SET:
        return False
    p50, p90, p95, p99, top, mean = lat["p50"], lat["p90"], lat["p95"], lat["p99"], lat["max"], lat["mean"]
    if d["count"] == 0:
        if not (p50 is None and p90 is None and p95 is None and p99 is None and top is None and mean is None):
            return False
    else:
        for v in (p50, p90, p95, p99, top, mean):
            if type(v) is not float or not _isfinite(v) or v < 0:
                return False
        if (p50 > p90 + 1e-9 or p90 > p95 + 1e-9 or p95 > p99 + 1e-9 or p99 > top + 1e-9
                or mean > top + 1e-9):
            return False
    for key in _OPT_NUMS:
        v = d[key]
        if v is not None:
            t = type(v)
            if not (t is float and _isfinite(v)) and t is not int:
                return False
    if len(keys) != len(FIELDS):  # optional fields present
        v = d.get("spool_depth")
        if v is not None and (type(v) is not int or v < 0):
            return False
        if "spool_depth" in d and v is None:
            return False
        for key in ("cpu_mhz", "spool_oldest_age_s"):
            v = d.get(key)
            if v is not None:
                t = type(v)
                if not (t is float and _isfinite(v)) and t is not int:
                    return False
    power = d["power_w"]
    if type(power) is not dict or type(power.get("source")) is not str:
        return False
    for key in ("mean", "idle"):
        v = power.get(key)
        if v is not None:
            t = type(v)
            if not (t is float and _isfinite(v)) and t is not int:
                return False
    return True


def validate_window(d: Any) -> list[str]:
    """Problems with a telemetry window (empty list: valid). Never raises."""
    if type(d) is dict and _surely_valid(d):
        return []
    return _problems(d)


def _problems(d: Any) -> list[str]:
    """The full check, listing every problem (``validate_window`` without its fast path)."""
    try:
        return _all_problems(d)
    except OverflowError:  # JSON integers are unbounded: 10**400 + 1e-9 cannot be computed
        return ["a number is beyond the range of a float"]


def _all_problems(d: Any) -> list[str]:
    if not isinstance(d, dict):
        return [f"window: expected a JSON object, got {type(d).__name__}"]
    problems: list[str] = []
    if d.get("schema") != SCHEMA:
        problems.append(f"schema: expected {SCHEMA!r}, got {d.get('schema')!r}")
    missing = [k for k in FIELDS if k not in d]
    if missing:
        problems.append(f"missing fields: {', '.join(missing)}")
    unknown = sorted(k for k in d if k not in _ALLOWED)
    if unknown:
        problems.append(f"unknown fields: {', '.join(unknown)}")
    if "device" in d and (not isinstance(d["device"], str) or not d["device"]):
        problems.append("device: expected a non-empty string")
    for key in ("seq", "count", "dropped", "spool_depth"):
        v = d.get(key)
        if key in d and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
            problems.append(f"{key}: expected an integer >= 0, got {v!r}")
    for key in ("ts_start", "ts_end"):
        if key in d and not _is_num(d[key]):
            problems.append(f"{key}: expected UNIX seconds, got {d[key]!r}")
    if _is_num(d.get("ts_start")) and _is_num(d.get("ts_end")) and d["ts_end"] < d["ts_start"]:
        problems.append("ts_end is before ts_start")
    for key in ("historical", "degraded"):
        if key in d and not isinstance(d[key], bool):
            problems.append(f"{key}: expected true/false, got {d[key]!r}")
    if "throttled" in d and d["throttled"] is not None and not isinstance(d["throttled"], bool):
        problems.append(f"throttled: expected true/false/null, got {d['throttled']!r}")
    model = d.get("model")
    if "model" in d:
        if not isinstance(model, dict):
            problems.append("model: expected an object")
        else:
            for key in ("name", "version", "sha256"):
                if not isinstance(model.get(key), str):
                    problems.append(f"model.{key}: expected a string, got {model.get(key)!r}")
    if "engine" in d and not isinstance(d["engine"], str):
        problems.append(f"engine: expected a string, got {d['engine']!r}")
    for key in ("delegate", "degraded_reason"):
        if d.get(key) is not None and not isinstance(d[key], str):
            problems.append(f"{key}: expected a string or null, got {d[key]!r}")
    if "providers" in d and (not isinstance(d["providers"], list)
                             or not all(isinstance(p, str) for p in d["providers"])):
        problems.append("providers: expected a list of strings")
    if d.get("degraded") is True and not d.get("degraded_reason"):
        problems.append("degraded_reason: a degraded window must say why")
    lat = d.get("latency_ms")
    if "latency_ms" in d:
        if not isinstance(lat, dict) or lat.keys() != _LATENCY_SET:
            problems.append(f"latency_ms: expected an object with {', '.join(LATENCY_KEYS)}")
        else:
            count = d.get("count")
            values = [lat[k] for k in LATENCY_KEYS]
            if count == 0 and any(v is not None for v in values):
                problems.append("latency_ms: a window with count 0 has null latencies")
            elif isinstance(count, int) and count > 0:
                if not all(_is_num(v) and v >= 0 for v in values):
                    problems.append("latency_ms: expected numbers >= 0 when count > 0")
                else:
                    order = [lat[k] for k in ("p50", "p90", "p95", "p99", "max")]
                    if any(a > b + 1e-9 for a, b in itertools.pairwise(order)):
                        problems.append("latency_ms: expected p50 <= p90 <= p95 <= p99 <= max")
                    if lat["mean"] > lat["max"] + 1e-9:
                        problems.append("latency_ms: mean exceeds max")
    for key in ("fps", "energy_mj_per_inference", "temp_c", "cpu_pct", "rss_mb", "cpu_mhz",
                "spool_oldest_age_s"):
        _opt_num(d, key, problems)
    power = d.get("power_w")
    if "power_w" in d:
        if not isinstance(power, dict) or not isinstance(power.get("source"), str):
            problems.append("power_w: expected an object with a string 'source'")
        else:
            _opt_num(power, "mean", problems, "power_w.")
            _opt_num(power, "idle", problems, "power_w.")
    return problems
