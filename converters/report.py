"""`edgekit report`: what the monitor recorded, as CSV and PNG plots.

CSV: one row per window, ordered by device then time: ``device, seq, historical, ts_start, ts_end,
received_at`` and every telemetry field flattened (``latency_ms.p50`` → ``latency_p50_ms``,
``power_w.mean`` → ``power_mean_w``, ``model.name`` → ``model_name``, ``providers`` joined with ``;``).
PNG (matplotlib, Agg, no display needed): one row of plots per device: latency p50/p99, power and
temperature over time.
"""

from __future__ import annotations

import csv
import math
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from converters.store import Store
from edge_agent.errors import InputError, missing_extra
from edge_agent.telemetry.schema import FIELDS, LATENCY_KEYS, OPTIONAL_FIELDS

# (CSV column, getter over the window). Covers every field of edgekit.telemetry/1 (tests check it).
_W = dict[str, Any]


def _get(*path: str) -> Any:
    def get(w: _W) -> Any:
        v: Any = w
        for key in path:
            v = v.get(key) if isinstance(v, dict) else None
        return v
    return get


CSV_FIELDS: tuple[tuple[str, Any], ...] = (
    ("schema", _get("schema")),
    ("model_name", _get("model", "name")),
    ("model_version", _get("model", "version")),
    ("model_sha256", _get("model", "sha256")),
    ("engine", _get("engine")),
    ("delegate", _get("delegate")),
    ("providers", lambda w: ";".join(w.get("providers") or [])),
    ("degraded", _get("degraded")),
    ("degraded_reason", _get("degraded_reason")),
    ("count", _get("count")),
    *((f"latency_{k}_ms", _get("latency_ms", k)) for k in LATENCY_KEYS),
    ("fps", _get("fps")),
    ("power_mean_w", _get("power_w", "mean")),
    ("power_idle_w", _get("power_w", "idle")),
    ("power_source", _get("power_w", "source")),
    ("energy_mj_per_inference", _get("energy_mj_per_inference")),
    ("temp_c", _get("temp_c")),
    ("cpu_pct", _get("cpu_pct")),
    ("cpu_mhz", _get("cpu_mhz")),
    ("rss_mb", _get("rss_mb")),
    ("throttled", _get("throttled")),
    ("dropped", _get("dropped")),
    ("spool_depth", _get("spool_depth")),
    ("spool_oldest_age_s", _get("spool_oldest_age_s")),
)
_NESTED = {"latency_ms", "power_w", "model", "device", "seq", "historical", "ts_start", "ts_end"}
# optional fields added to the schema later are exported too (as they are), after the known ones
CSV_FIELDS = CSV_FIELDS + tuple((f, _get(f)) for f in (*FIELDS, *OPTIONAL_FIELDS)
                                if f not in _NESTED and f not in {c for c, _ in CSV_FIELDS})
CSV_COLUMNS = ("device", "seq", "historical", "ts_start", "ts_end", "received_at", *(c for c, _ in CSV_FIELDS))

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """``--since``: relative (``90s``, ``15m``, ``2h``, ``7d``, ``1w``: that long before now), ISO 8601
    (``2026-11-20T08:00``; without an offset it is UTC), or UNIX seconds. Returns UNIX seconds."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise InputError(f"--since {text!r} is not a time",
                         hint="use a duration back from now (30m, 2h, 7d), ISO 8601 (2026-11-20T08:00, UTC "
                              "unless it has an offset) or UNIX seconds") from e
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def csv_row(row: dict[str, Any]) -> list[Any]:
    w = row["window"]
    return [row["device"], row["seq"], row["historical"], row["ts_start"], row["ts_end"], row["received_at"],
            *(get(w) for _, get in CSV_FIELDS)]


def write_csv(rows: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write the rows (from ``Store.query``) atomically; returns how many were written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(CSV_COLUMNS)
            for row in rows:
                out.writerow(["" if v is None else v for v in csv_row(row)])
                n += 1
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the CSV file {path}: {e}",
                         hint="check the folder exists and is writable") from e
    return n


def plot(rows: Iterable[dict[str, Any]], path: str | Path, *, title: str = "edgekit fleet") -> list[str]:
    """One row of subplots per device (latency p50/p99, power, temperature over time). Returns the devices."""
    try:
        from matplotlib.dates import DateFormatter
        from matplotlib.figure import Figure
    except ImportError as e:
        raise missing_extra("matplotlib", "host", "edgekit report --plot") from e
    series: dict[str, dict[str, list[Any]]] = {}
    for row in rows:
        w = row["window"]
        s = series.setdefault(row["device"], {"t": [], "p50": [], "p99": [], "power": [], "temp": []})
        s["t"].append(datetime.fromtimestamp(row["ts_end"], tz=timezone.utc))
        lat = w.get("latency_ms") or {}
        s["p50"].append(_nan(lat.get("p50")))
        s["p99"].append(_nan(lat.get("p99")))
        s["power"].append(_nan((w.get("power_w") or {}).get("mean")))
        s["temp"].append(_nan(w.get("temp_c")))
    if not series:
        raise InputError("no windows to plot", hint="check --store, --device and --since")
    devices = sorted(series)
    fig = Figure(figsize=(13, 2.8 * len(devices) + 0.6), layout="constrained")
    axes = fig.subplots(len(devices), 3, squeeze=False)
    fmt = DateFormatter("%m-%d %H:%M")
    for i, dev in enumerate(devices):
        s = series[dev]
        a_lat, a_pow, a_tmp = axes[i]
        a_lat.plot(s["t"], s["p50"], label="p50", marker=".", linewidth=1)
        a_lat.plot(s["t"], s["p99"], label="p99", marker=".", linewidth=1)
        a_lat.set_ylabel("latency (ms)")
        a_lat.legend(loc="upper left", fontsize="small")
        a_pow.plot(s["t"], s["power"], color="tab:green", marker=".", linewidth=1)
        a_pow.set_ylabel("power (W)")
        a_tmp.plot(s["t"], s["temp"], color="tab:red", marker=".", linewidth=1)
        a_tmp.set_ylabel("temperature (°C)")
        a_lat.set_title(f"{dev}: latency", fontsize="medium")
        a_pow.set_title(f"{dev}: power", fontsize="medium")
        a_tmp.set_title(f"{dev}: temperature", fontsize="medium")
        for ax in (a_lat, a_pow, a_tmp):
            ax.xaxis.set_major_formatter(fmt)
            ax.tick_params(axis="x", labelsize="small", labelrotation=20)
            ax.grid(True, alpha=0.3)
    fig.suptitle(f"{title} (times UTC)")
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    try:
        fig.savefig(tmp, format="png", dpi=100)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the plot {path}: {e}",
                         hint="check the folder exists and is writable") from e
    return devices


def _nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per device: windows, first and last window end, inferences, median p99, max temperature."""
    acc: dict[str, dict[str, Any]] = {}
    for row in rows:
        w = row["window"]
        a = acc.setdefault(row["device"], {"device": row["device"], "windows": 0, "first": row["ts_end"],
                                           "last": row["ts_end"], "inferences": 0, "p99": [], "temp": []})
        a["windows"] += 1
        a["first"] = min(a["first"], row["ts_end"])
        a["last"] = max(a["last"], row["ts_end"])
        a["inferences"] += w.get("count") or 0
        p99 = (w.get("latency_ms") or {}).get("p99")
        if p99 is not None:
            a["p99"].append(p99)
        if w.get("temp_c") is not None:
            a["temp"].append(w["temp_c"])
    out = []
    for dev in sorted(acc):
        a = acc[dev]
        p99s = sorted(a.pop("p99"))
        temps = a.pop("temp")
        a["p99_median_ms"] = p99s[len(p99s) // 2] if p99s else None
        a["temp_max_c"] = max(temps) if temps else None
        out.append(a)
    return out


def report(store: Store, *, device: str | None = None, since: float | None = None,
           csv_path: str | Path | None = None, plot_path: str | Path | None = None) -> dict[str, Any]:
    """Run the report: CSV and/or PNG, and a per-device summary (returned, JSON-safe)."""
    rows = list(store.query(device=device, since=since))
    result: dict[str, Any] = {"store": getattr(store, "url", None), "device": device, "since": since,
                              "windows": len(rows), "devices": summarize(rows), "csv": None, "plot": None}
    if csv_path is not None:
        write_csv(iter(rows), csv_path)
        result["csv"] = str(csv_path)
    if plot_path is not None:
        plot(_iter(rows), plot_path)
        result["plot"] = str(plot_path)
    return result


def _iter(rows: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from rows
