"""The durable telemetry spool: order, acks, seq across reopen, bounds, corruption, seq-file migration."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from edge_agent.errors import InputError
from edge_agent.telemetry.spool import Spool, is_corruption, peek_next_seq


def _w(ts: float, pad: int = 0) -> dict:
    return {"ts_end": ts, "historical": False, "pad": "x" * pad}


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_append_pending_ack_and_reopen(tmp_path: Path) -> None:
    clock = Clock()
    s = Spool(tmp_path / "spool.db", max_bytes=10**6, max_age_s=3600, clock=clock)
    assert s.next_seq == 0 and s.depth() == 0 and s.oldest_age_s() is None
    seqs = [s.append(_w(clock.t - 5 + i)) for i in range(5)]
    assert seqs == [0, 1, 2, 3, 4]
    assert s.depth() == 5 and s.oldest_age_s() == pytest.approx(5.0)
    assert [r.seq for r in s.pending(3)] == [0, 1, 2]
    assert [r.seq for r in s.pending(10, after=2)] == [3, 4]
    assert s.ack([0, 2]) == 2 and s.ack([2]) == 0  # acking twice is harmless
    assert [r.seq for r in s.pending(10)] == [1, 3, 4] and s.depth() == 3
    assert s.oldest_age_s() == pytest.approx(4.0)
    s.close()
    s = Spool(tmp_path / "spool.db", max_bytes=10**6, max_age_s=3600, clock=clock)
    assert s.next_seq == 5 and s.depth() == 3  # seq and contents survive a reopen
    assert s.append(_w(clock.t)) == 5
    assert s.pending(1)[0].payload.startswith(b'{"ts_end"')
    s.ack(r.seq for r in s.pending(10))
    assert s.depth() == 0 and s.bytes == 0
    s.close()
    assert peek_next_seq(tmp_path / "spool.db") == 6 and peek_next_seq(tmp_path / "nope.db") is None


def test_min_next_seq_only_raises(tmp_path: Path) -> None:
    s = Spool(tmp_path / "spool.db", max_bytes=10**6, max_age_s=3600, min_next_seq=41)
    assert s.append(_w(1.0)) == 41
    s.close()
    s = Spool(tmp_path / "spool.db", max_bytes=10**6, max_age_s=3600, min_next_seq=7)
    assert s.next_seq == 42
    s.close()


def test_byte_cap_drops_oldest_and_counts(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    s = Spool(tmp_path / "spool.db", max_bytes=1000, max_age_s=3600, clock=clock)
    with caplog.at_level(logging.WARNING):
        for _ in range(10):
            s.append(_w(clock.t, pad=200))
    fit = 1000 // len(s.pending(1)[0].payload)
    assert s.depth() == fit and s.bytes <= 1000
    assert s.dropped == 10 - fit
    assert [r.seq for r in s.pending(10)] == list(range(10 - fit, 10))
    assert "telemetry spool full" in caplog.text
    s.close()
    s = Spool(tmp_path / "spool.db", max_bytes=1000, max_age_s=3600, clock=clock)
    assert s.dropped == 10 - fit  # the counter is persistent
    s.close()


def test_age_cap_drops_old_windows(tmp_path: Path) -> None:
    clock = Clock()
    s = Spool(tmp_path / "spool.db", max_bytes=10**6, max_age_s=60, clock=clock)
    s.append(_w(clock.t - 120))  # already too old, but the window just appended is always kept
    s.append(_w(clock.t - 30))
    s.append(_w(clock.t))
    assert [r.seq for r in s.pending(10)] == [1, 2] and s.dropped == 1
    clock.t += 45
    s.append(_w(clock.t))
    assert [r.seq for r in s.pending(10)] == [2, 3] and s.dropped == 2
    s.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_moved_aside(tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "spool.db"
    s = Spool(path, max_bytes=10**6, max_age_s=3600)
    for i in range(200):
        s.append(_w(float(i), pad=300))
    s.close()
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\xde\xad\xbe\xef" * 1024 + data[4096:])  # the header page is garbled
    else:
        path.write_bytes(data[: len(data) // 3])  # a power cut on a bad card
    with caplog.at_level(logging.ERROR):
        s = Spool(path, max_bytes=10**6, max_age_s=3600, min_next_seq=200)
    assert "is corrupt" in caplog.text
    assert [e["kind"] for e in s.events] == ["spool_corrupt"]
    moved = Path(s.events[0]["moved_to"])
    assert moved.exists() and moved.name.startswith("spool.db.corrupt-")
    assert s.depth() == 0 and s.append(_w(1.0)) == 200  # fresh, and seq does not go back
    s.close()


def test_corruption_detected_by_error_code() -> None:
    e = sqlite3.DatabaseError("file is not a database")
    e.sqlite_errorcode = 26  # type: ignore[attr-defined]
    assert is_corruption(e)
    full = sqlite3.OperationalError("database or disk is full")
    full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert not is_corruption(full)


def test_bad_bounds_and_unwritable_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        Spool(tmp_path / "s.db", max_bytes=0, max_age_s=1)
    with pytest.raises(InputError, match="cannot open the telemetry spool"):
        Spool(tmp_path / "missing-dir" / "s.db", max_bytes=10, max_age_s=1)


def test_seq_file_is_migrated_into_the_spool(tmp_path: Path) -> None:
    from edge_agent.service import _open_spool, save_seq

    save_seq(tmp_path, 17)
    s = _open_spool(tmp_path, 10**6, 3600)
    assert s.next_seq == 17 and not (tmp_path / "seq").exists()
    s.close()


def test_append_speed(tmp_path: Path) -> None:
    """One window append is one small transaction: far below a window's length even on slow cards."""
    import time

    s = Spool(tmp_path / "spool.db", max_bytes=10**8, max_age_s=3600)
    t0 = time.perf_counter()
    for i in range(500):
        s.append(_w(float(i), pad=500))
    per = (time.perf_counter() - t0) / 500
    s.close()
    assert per < 0.005, f"{per * 1e3:.2f} ms per append"


def test_spool_fields_are_optional_and_validated() -> None:
    from edge_agent.telemetry.schema import OPTIONAL_FIELDS, build_window, validate_window

    kw = dict(device="d", seq=0, ts_start=1.0, ts_end=2.0,
              model={"name": "m", "version": "1", "sha256": "ab" * 32},
              backend_info={"engine": "onnxruntime", "providers": []}, latencies_ns=[1000], power=None,
              temp_c=None, cpu_pct=1.0, rss_mb=1.0, throttled=None, dropped=0)
    assert {"spool_depth", "spool_oldest_age_s"} <= set(OPTIONAL_FIELDS)
    assert "spool_depth" not in build_window(**kw)
    w = build_window(**kw, spool=(3, 12.3456))
    assert w["spool_depth"] == 3 and w["spool_oldest_age_s"] == 12.346 and validate_window(w) == []
    assert validate_window({**w, "spool_depth": -1}) and validate_window({**w, "spool_oldest_age_s": "x"})
    assert validate_window(build_window(**kw, spool=(0, None))) == []
