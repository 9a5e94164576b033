"""converters/store.py: windows de-duplicated by (device, seq), device status, queries; SQLite and PostgreSQL.

The PostgreSQL tests use the local server (127.0.0.1:5432) when it answers, in a throwaway schema that is
dropped afterwards; they are skipped with a reason otherwise.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from converters.store import (
    COLUMNS,
    PostgresStore,
    SqliteStore,
    StoreError,
    WindowRecord,
    open_store,
)
from edge_agent.errors import InputError
from edge_agent.telemetry.schema import build_window, validate_window
from tests.mosquitto import port_accepts

PG_URL = os.environ.get("EDGEKIT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
T0 = 1_795_000_000.0


def make_window(device: str = "pi-1", seq: int = 0, *, p99_ms: float = 2.0, temp_c: float | None = 50.0,
                throttled: bool | None = False, dropped: int = 0, power_w: float | None = 3.0,
                t0: float = T0, span: float = 10.0, historical: bool = False) -> dict[str, Any]:
    """A valid edgekit.telemetry/1 window (built by the agent's own build_window)."""
    p50_ns = int(p99_ms * 1e6 / 2)
    lat = [p50_ns] * 98 + [int(p99_ms * 1e6)] * 2
    w = build_window(device=device, seq=seq, ts_start=t0 + seq * span, ts_end=t0 + (seq + 1) * span,
                     model={"name": "mlp", "version": "1.0.0", "sha256": "ab" * 32},
                     backend_info={"engine": "onnxruntime", "providers": ["CPUExecutionProvider"]},
                     latencies_ns=lat, power=None if power_w is None else {"source": "rapl", "mean_w": power_w,
                                                                           "idle_w": None},
                     temp_c=temp_c, cpu_pct=50.0, rss_mb=80.0, throttled=throttled, dropped=dropped,
                     historical=historical, cpu_mhz=1500.0, spool=(seq % 3, 4.0 if seq % 3 else None))
    assert validate_window(w) == []
    return w


def record(w: dict[str, Any], received_at: float = T0) -> WindowRecord:
    return WindowRecord(w, json.dumps(w), received_at)


def _pg_store() -> Iterator[PostgresStore]:
    if not port_accepts("127.0.0.1", 5432):
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'edgekit[host]')")
    schema = f"edgekit_test_{uuid.uuid4().hex[:12]}"
    try:
        store = PostgresStore(PG_URL, schema=schema)
    except StoreError as e:
        pytest.skip(f"PostgreSQL at {PG_URL} is not usable: {e.message}")
    try:
        yield store
    finally:
        store._db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")  # only the schema this test made
        store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "t.db")
        yield s
        s.close()
    else:
        yield from _pg_store()


def test_dedup_by_device_and_seq(store: Any) -> None:
    batch = [record(make_window("pi-1", i)) for i in range(5)] + [record(make_window("pi-2", 0))]
    assert store.add_windows(batch) == 6
    # the same windows again (a QoS 1 redelivery, a spool replay) plus one new: only the new one counts
    again = [*batch, record(make_window("pi-1", 5)), record(make_window("pi-1", 5))]
    assert store.add_windows(again) == 1
    assert store.count() == 7
    assert store.add_windows([]) == 0
    rows = list(store.query())
    assert [(r["device"], r["seq"]) for r in rows] == [("pi-1", i) for i in range(6)] + [("pi-2", 0)]
    assert rows[0]["window"] == make_window("pi-1", 0)
    assert rows[0]["historical"] is False and rows[0]["received_at"] == T0


def test_query_filters(store: Any) -> None:
    store.add_windows([record(make_window(d, i)) for d in ("a", "b") for i in range(4)])
    assert [r["seq"] for r in store.query(device="b")] == [0, 1, 2, 3]
    # since keeps windows ending at or after it: window i ends at T0 + (i + 1) * 10
    assert [(r["device"], r["seq"]) for r in store.query(device="a", since=T0 + 30)] == [("a", 2), ("a", 3)]
    assert list(store.query(device="nobody")) == []


def test_device_status_and_last_seen(store: Any) -> None:
    birth = {"state": "online", "device": "pi-1", "profile": "rpi5", "model": {"name": "mlp"}}
    store.set_status("pi-1", "online", birth, T0)
    store.add_windows([record(make_window("pi-1", 3), T0 + 5), record(make_window("pi-1", 1), T0 + 6)])
    store.set_status("pi-1", "offline", {"state": "offline", "device": "pi-1"}, T0 + 7)
    (dev,) = store.devices()
    assert dev["device"] == "pi-1" and dev["state"] == "offline" and dev["status_ts"] == T0 + 7
    assert dev["birth"] == birth  # the last birth is kept while offline
    assert dev["last_seen"] == T0 + 6 and dev["last_seq"] == 3


def test_sqlite_extracted_columns_and_wal(tmp_path: Path) -> None:
    import sqlite3

    s = SqliteStore(tmp_path / "x.db")
    s.add_windows([record(make_window("pi-1", 0, p99_ms=8.0, temp_c=61.5, throttled=True, power_w=4.25))])
    s.close()
    db = sqlite3.connect(tmp_path / "x.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cols = [c[1] for c in db.execute("PRAGMA table_info(windows)")]
    assert tuple(cols) == COLUMNS
    sql = "SELECT latency_p99_ms, temp_c, throttled, power_mean_w FROM windows"
    p99, temp, thr, power = db.execute(sql).fetchone()
    assert (p99, temp, thr, power) == (8.0, 61.5, 1, 4.25)
    db.close()


def test_open_store_picks_the_class(tmp_path: Path) -> None:
    s = open_store(tmp_path / "a.db")
    assert isinstance(s, SqliteStore)
    s.close()
    s = open_store(f"sqlite:///{tmp_path}/b.db")
    assert isinstance(s, SqliteStore) and s.path == tmp_path / "b.db"
    s.close()
    with pytest.raises(InputError, match="unknown store URL"):
        open_store("mysql://x/y")


def test_sqlite_store_error_is_wrapped(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError) as e:
        SqliteStore(bad)
    assert e.value.hint


def test_postgres_unreachable_is_a_store_error() -> None:
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    from tests.mosquitto import free_port

    with pytest.raises(StoreError, match="cannot open the PostgreSQL store") as e:
        PostgresStore(f"postgresql://nobody:secret@127.0.0.1:{free_port()}/x?connect_timeout=2")
    assert "secret" not in str(e.value)


def test_sqlite_batches_span_several_statements(tmp_path: Path) -> None:
    # a batch is written 100 rows per INSERT (devices too): 250 windows of 130 devices, with duplicates
    # inside the batch and against what is stored, come out as executemany row by row would
    s = SqliteStore(tmp_path / "big.db")
    assert s.add_windows([record(make_window(f"d{i:03d}", 0)) for i in range(0, 130, 2)]) == 65
    batch = [record(make_window(f"d{i % 130:03d}", i // 130), T0 + i) for i in range(250)]
    batch += batch[:7]  # the same windows twice in one batch
    assert s.add_windows(batch) == 250 - 65
    assert s.count() == 250
    rows = list(s.query())
    assert sorted((r["device"], r["seq"]) for r in rows) == sorted(
        {(f"d{i % 130:03d}", i // 130) for i in range(250)})
    devs = {d["device"]: d for d in s.devices()}
    assert len(devs) == 130
    assert devs["d005"]["last_seq"] == 1 and devs["d005"]["last_seen"] == T0 + 135
    assert devs["d129"]["last_seq"] == 0 and devs["d129"]["last_seen"] == T0 + 129
    s.close()


def test_sqlite_integer_beyond_64_bits_is_a_store_error_and_rolled_back(tmp_path: Path) -> None:
    # JSON (and validate_window) allow any integer; SQLite stores 64 bits. The batch fails as a
    # StoreError, the transaction is rolled back, and the store keeps working.
    s = SqliteStore(tmp_path / "o.db")
    w = make_window("pi-1", 1)
    w["fps"] = 10**30
    assert validate_window(w) == []
    with pytest.raises(StoreError, match="cannot write 2 windows"):
        s.add_windows([record(make_window("pi-1", 0)), record(w)])
    assert s.count() == 0
    assert s.add_windows([record(make_window("pi-1", 0))]) == 1
    assert s.count() == 1
    s.close()
