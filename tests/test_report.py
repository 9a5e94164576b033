"""converters/report.py and `edgekit report`: CSV columns (every telemetry field), PNG plots, --since."""

from __future__ import annotations

import argparse
import csv
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from converters.monitor_cli import register
from converters.report import CSV_COLUMNS, parse_since, report
from converters.store import SqliteStore
from edge_agent.errors import InputError
from edge_agent.telemetry.schema import FIELDS, LATENCY_KEYS, OPTIONAL_FIELDS
from tests.test_store import T0, make_window, record


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.db"
    s = SqliteStore(path)
    s.add_windows([record(make_window(d, i, p99_ms=2.0 + i, temp_c=50.0 + i, power_w=3.0 + i / 10,
                                      historical=(i == 0)))
                   for d in ("pi-1", "pi-2") for i in range(6)])
    s.close()
    return path


def _run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="edgekit")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.func(args))


def test_csv_columns_cover_every_field() -> None:
    flat = set(CSV_COLUMNS)
    for f in (*FIELDS, *OPTIONAL_FIELDS):
        if f == "latency_ms":
            assert {f"latency_{k}_ms" for k in LATENCY_KEYS} <= flat
        elif f == "power_w":
            assert {"power_mean_w", "power_idle_w", "power_source"} <= flat
        elif f == "model":
            assert {"model_name", "model_version", "model_sha256"} <= flat
        else:
            assert f in flat, f
    assert CSV_COLUMNS[:5] == ("device", "seq", "historical", "ts_start", "ts_end")


def test_report_csv_and_png(store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_csv, out_png = tmp_path / "w.csv", tmp_path / "w.png"
    rc = _run(["report", "--store", str(store_path), "--csv", str(out_csv), "--plot", str(out_png), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["windows"] == 12 and [d["device"] for d in summary["devices"]] == ["pi-1", "pi-2"]
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 12
    first = rows[0]
    assert (first["device"], first["seq"], first["historical"]) == ("pi-1", "0", "True")
    assert float(first["latency_p99_ms"]) == 2.0 and float(first["latency_p50_ms"]) == 1.0
    assert float(rows[5]["temp_c"]) == 55.0 and float(rows[5]["power_mean_w"]) == 3.5
    assert first["power_source"] == "rapl" and first["providers"] == "CPUExecutionProvider"
    assert first["cpu_mhz"] == "1500.0" and first["model_name"] == "mlp" and first["dropped"] == "0"
    assert (rows[2]["spool_depth"], rows[2]["spool_oldest_age_s"]) == ("2", "4.0")

    import matplotlib.image as mpimg

    img = mpimg.imread(out_png)
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 1000  # 2 devices x 3 plots
    assert not list(tmp_path.glob("*.tmp*"))


def test_report_filters_and_table(store_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    s = SqliteStore(store_path)
    result = report(s, device="pi-2", since=T0 + 40)  # windows 3, 4, 5 end at T0 + 40, 50, 60
    s.close()
    assert result["windows"] == 3 and result["devices"][0]["device"] == "pi-2"
    monkeypatch.setenv("COLUMNS", "160")
    assert _run(["report", "--store", str(store_path), "--device", "pi-1"]) == 0
    out = capsys.readouterr().out
    assert "pi-1" in out and "pi-2" not in out and "6 windows" in out


def test_report_errors(tmp_path: Path, store_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        _run(["report", "--store", str(tmp_path / "missing.db")])
    with pytest.raises(InputError, match="no windows to plot"):
        _run(["report", "--store", str(store_path), "--device", "nobody", "--plot", str(tmp_path / "x.png")])
    with pytest.raises(InputError, match="not a time"):
        _run(["report", "--store", str(store_path), "--since", "yesterday-ish"])


def test_parse_since() -> None:
    now = 1_800_000_000.0
    assert parse_since("2h", now) == now - 7200
    assert parse_since("30m", now) == now - 1800
    assert parse_since("1.5d", now) == now - 1.5 * 86400
    assert parse_since("1795000000", now) == 1795000000.0
    assert parse_since("2026-11-20T08:00:00", now) == datetime(2026, 11, 20, 8, tzinfo=timezone.utc).timestamp()
    utc7 = datetime(2026, 11, 20, 7, tzinfo=timezone.utc).timestamp()
    assert parse_since("2026-11-20T08:00:00+01:00", now) == utc7
