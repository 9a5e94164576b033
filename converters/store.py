"""Where the monitor records telemetry: one row per window, de-duplicated by (device, seq).

``SqliteStore(path)`` (the default; WAL, one transaction per batch) and ``PostgresStore(url)`` (for fleets
that outgrow one laptop; psycopg 3, extra ``host``) share one schema:

``windows``  device, seq (PRIMARY KEY together), ts_start, ts_end, historical, received_at, the window as
             JSON (``payload``) and extracted columns for queries and plots (latency percentiles, fps,
             power, energy, temperature, CPU, memory, throttled, dropped, model).
``devices``  one row per device: last status (online/offline), the birth payload, when the status came,
             and the last window received (``last_seen``, ``last_seq``).

A window that is already stored (same device and seq: a QoS 1 redelivery, a replay from the spool) is
ignored (``INSERT OR IGNORE`` / ``ON CONFLICT DO NOTHING``); ``add_windows`` returns how many were new.
``open_store`` picks the class from the URL: ``postgresql://…`` / ``postgres://…``, else ``sqlite:///PATH``
or a plain path.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edge_agent.errors import EdgekitError, InputError, missing_extra


class StoreError(EdgekitError):
    """The telemetry store cannot be opened, written or read."""


@dataclass(frozen=True)
class WindowRecord:
    """One received window on its way into a store: the decoded window, its JSON text, when it came."""

    window: dict[str, Any]
    payload: str
    received_at: float


# Extracted columns: (column, SQL type for SQLite, SQL type for PostgreSQL, getter over the window).
def _lat(key: str) -> Any:
    return lambda w: (w.get("latency_ms") or {}).get(key)


def _power(key: str) -> Any:
    return lambda w: (w.get("power_w") or {}).get(key)


def _model(key: str) -> Any:
    return lambda w: (w.get("model") or {}).get(key)


EXTRACTED: tuple[tuple[str, str, str, Any], ...] = (
    ("count", "INTEGER", "BIGINT", lambda w: w.get("count")),
    ("latency_p50_ms", "REAL", "DOUBLE PRECISION", _lat("p50")),
    ("latency_p90_ms", "REAL", "DOUBLE PRECISION", _lat("p90")),
    ("latency_p95_ms", "REAL", "DOUBLE PRECISION", _lat("p95")),
    ("latency_p99_ms", "REAL", "DOUBLE PRECISION", _lat("p99")),
    ("latency_max_ms", "REAL", "DOUBLE PRECISION", _lat("max")),
    ("latency_mean_ms", "REAL", "DOUBLE PRECISION", _lat("mean")),
    ("fps", "REAL", "DOUBLE PRECISION", lambda w: w.get("fps")),
    ("power_mean_w", "REAL", "DOUBLE PRECISION", _power("mean")),
    ("energy_mj_per_inference", "REAL", "DOUBLE PRECISION", lambda w: w.get("energy_mj_per_inference")),
    ("temp_c", "REAL", "DOUBLE PRECISION", lambda w: w.get("temp_c")),
    ("cpu_pct", "REAL", "DOUBLE PRECISION", lambda w: w.get("cpu_pct")),
    ("rss_mb", "REAL", "DOUBLE PRECISION", lambda w: w.get("rss_mb")),
    ("throttled", "INTEGER", "BOOLEAN", lambda w: w.get("throttled")),
    ("dropped", "INTEGER", "BIGINT", lambda w: w.get("dropped")),
    ("spool_depth", "INTEGER", "BIGINT", lambda w: w.get("spool_depth")),
    ("model_name", "TEXT", "TEXT", _model("name")),
    ("model_version", "TEXT", "TEXT", _model("version")),
)
_BASE = ("device", "seq", "ts_start", "ts_end", "historical", "received_at", "payload")
COLUMNS = _BASE + tuple(c[0] for c in EXTRACTED)


def _row(rec: WindowRecord) -> tuple[Any, ...]:
    w = rec.window
    return (w["device"], w["seq"], w["ts_start"], w["ts_end"], bool(w.get("historical")), rec.received_at,
            rec.payload, *(get(w) for _, _, _, get in EXTRACTED))


def _last_per_device(records: Sequence[WindowRecord]) -> dict[str, tuple[float, int]]:
    last: dict[str, tuple[float, int]] = {}
    for rec in records:
        dev, seq = rec.window["device"], rec.window["seq"]
        prev = last.get(dev)
        last[dev] = (rec.received_at, seq) if prev is None else (max(prev[0], rec.received_at), max(prev[1], seq))
    return last


def _result(device: str, seq: int, ts_start: float, ts_end: float, historical: Any, received_at: float,
            payload: Any) -> dict[str, Any]:
    window = payload if isinstance(payload, dict) else json.loads(payload)
    return {"device": device, "seq": int(seq), "ts_start": ts_start, "ts_end": ts_end,
            "historical": bool(historical), "received_at": received_at, "window": window}


class Store(Protocol):
    """What the monitor and the report need from a telemetry store."""

    url: str

    def add_windows(self, records: Sequence[WindowRecord]) -> int:
        """Store a batch in one transaction; windows already stored are skipped. Returns how many were new."""
        ...

    def set_status(self, device: str, state: str, payload: dict[str, Any], ts: float) -> None:
        """Record a device's last status message (``online`` with the birth payload, or ``offline``)."""
        ...

    def query(self, device: str | None = None, since: float | None = None) -> Iterator[dict[str, Any]]:
        """Windows ordered by device then time: dicts with device, seq, ts_start, ts_end, historical,
        received_at and window (the decoded JSON). ``since`` (UNIX s) keeps windows ending at or after it."""
        ...

    def devices(self) -> list[dict[str, Any]]:
        """One dict per device: device, state, birth, status_ts, last_seen, last_seq."""
        ...

    def count(self) -> int:
        """Number of stored windows."""
        ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# SQLite



def query_sql(device: str | None, since: float | None, placeholder: str) -> tuple[str, list[Any]]:
    """The windows query for either store (pure): SQLite uses ``?`` placeholders, psycopg ``%s``."""
    sql = "SELECT device, seq, ts_start, ts_end, historical, received_at, payload FROM windows"
    where: list[str] = []
    params: list[Any] = []
    if device is not None:
        where.append(f"device = {placeholder}")
        params.append(device)
    if since is not None:
        where.append(f"ts_end >= {placeholder}")
        params.append(since)
    if where:
        sql += " WHERE " + " AND ".join(where)
    return sql + " ORDER BY device, ts_start, seq", params

class SqliteStore:
    """The default store: one SQLite file in WAL mode. Safe to share between threads (one lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # statements for every chunk size (1-100 rows of windows, 1-100 devices) stay prepared
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                       cached_statements=256)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            cols = ", ".join(f"{name} {sqlite}" for name, sqlite, _, _ in EXTRACTED)
            self._db.executescript(
                "BEGIN;"
                "CREATE TABLE IF NOT EXISTS windows (device TEXT NOT NULL, seq INTEGER NOT NULL, "
                "ts_start REAL NOT NULL, ts_end REAL NOT NULL, historical INTEGER NOT NULL, "
                f"received_at REAL NOT NULL, payload TEXT NOT NULL, {cols}, PRIMARY KEY (device, seq));"
                "CREATE INDEX IF NOT EXISTS windows_ts_end ON windows (ts_end);"
                "CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, state TEXT, birth TEXT, "
                "status_ts REAL, last_seen REAL, last_seq INTEGER);"
                "COMMIT;"
            )
        except (sqlite3.Error, OSError) as e:
            raise StoreError(f"cannot open the SQLite store {self.path}: {e}",
                             hint="check the path is a writable folder and the file is an edgekit store") from e
        self._insert_windows = f"INSERT OR IGNORE INTO windows ({', '.join(COLUMNS)})"
        self._max_vars = self._db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self._sql: dict[tuple[str, int], str] = {}  # statement text by (head, rows)

    def add_windows(self, records: Sequence[WindowRecord]) -> int:
        if not records:
            return 0
        rows = [_row(r) for r in records]
        last = [(dev, seen, seq) for dev, (seen, seq) in _last_per_device(records).items()]
        with self._lock:
            try:
                before = self._db.total_changes
                self._db.execute("BEGIN")
                self._insert_rows(self._insert_windows, "", len(COLUMNS), rows)
                inserted = self._db.total_changes - before
                self._insert_rows("INSERT INTO devices (device, last_seen, last_seq)",
                                  " ON CONFLICT (device) DO UPDATE SET "
                                  "last_seen = max(coalesce(last_seen, 0), excluded.last_seen), "
                                  "last_seq = max(coalesce(last_seq, -1), excluded.last_seq)", 3, last)
                self._db.execute("COMMIT")
            except (sqlite3.Error, OverflowError) as e:  # OverflowError: an integer beyond SQLite's 64 bits
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise StoreError(f"cannot write {len(rows)} windows to {self.path}: {e}",
                                 hint="check free disk space and that no other program locks the file") from e
        return inserted

    def _insert_rows(self, head: str, tail: str, width: int, rows: list[tuple[Any, ...]]) -> None:
        """``head VALUES (?, …), (?, …)… tail`` over ``rows``: up to 100 rows per statement (within SQLite's
        variable limit) rather than ``executemany``'s one step per row. sqlite3 releases the GIL around each
        step and taking it back can stall the monitor's network thread: a batch of 500 windows from 50
        devices is now 6 steps, not 550. Rows of one statement go in in order, as with ``executemany``."""
        per = max(1, min(100, self._max_vars // width))
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            key = (head, len(chunk))
            sql = self._sql.get(key)
            if sql is None:
                marks = f"({', '.join('?' * width)})"
                sql = self._sql[key] = f"{head} VALUES {', '.join([marks] * len(chunk))}{tail}"
            self._db.execute(sql, [v for row in chunk for v in row])

    def set_status(self, device: str, state: str, payload: dict[str, Any], ts: float) -> None:
        birth = json.dumps(payload) if state == "online" else None
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO devices (device, state, birth, status_ts) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (device) DO UPDATE SET state = excluded.state, "
                    "birth = coalesce(excluded.birth, birth), status_ts = excluded.status_ts",
                    (device, state, birth, ts))
            except sqlite3.Error as e:
                raise StoreError(f"cannot record the status of {device!r} in {self.path}: {e}") from e

    def query(self, device: str | None = None, since: float | None = None) -> Iterator[dict[str, Any]]:
        sql, params = query_sql(device, since, "?")
        # a separate read connection: a long report does not hold the writer's lock
        try:
            db = sqlite3.connect(self.path)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read {self.path}: {e}") from e
        try:
            for row in db.execute(sql, params):
                yield _result(*row)
        except sqlite3.Error as e:
            raise StoreError(f"cannot read windows from {self.path}: {e}",
                             hint="is this file an edgekit store (edgekit monitor --store FILE)?") from e
        finally:
            db.close()

    def devices(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                rows = self._db.execute("SELECT device, state, birth, status_ts, last_seen, last_seq FROM devices "
                                        "ORDER BY device").fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"cannot read devices from {self.path}: {e}") from e
        return [{"device": d, "state": s, "birth": json.loads(b) if b else None, "status_ts": st,
                 "last_seen": ls, "last_seq": lq} for d, s, b, st, ls, lq in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM windows").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


# --------------------------------------------------------------------------------------------------
# PostgreSQL

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class PostgresStore:
    """The same schema in PostgreSQL (psycopg 3). ``schema`` (default: the connection's search path, i.e.
    usually ``public``) is created when missing; a test passes a throwaway one."""

    def __init__(self, url: str, *, schema: str | None = None) -> None:
        try:
            import psycopg
        except ImportError as e:
            raise missing_extra("psycopg[binary]", "host", "a PostgreSQL telemetry store") from e
        if schema is not None and not _IDENT.match(schema):
            raise InputError(f"PostgreSQL schema name {schema!r} is not a plain identifier",
                             hint="use letters, digits and '_' (at most 63)")
        self.url = url
        self.schema = schema
        self._psycopg = psycopg
        self._lock = threading.Lock()
        cols = ", ".join(f"{name} {pg}" for name, _, pg, _ in EXTRACTED)
        try:
            self._db = psycopg.connect(url, autocommit=True)
            with self._db.transaction():
                if schema is not None:
                    self._db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
                    self._db.execute(f"SET search_path TO {schema}")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS windows (device TEXT NOT NULL, seq BIGINT NOT NULL, "
                    "ts_start DOUBLE PRECISION NOT NULL, ts_end DOUBLE PRECISION NOT NULL, "
                    "historical BOOLEAN NOT NULL, received_at DOUBLE PRECISION NOT NULL, payload JSONB NOT NULL, "
                    f"{cols}, PRIMARY KEY (device, seq))")
                self._db.execute("CREATE INDEX IF NOT EXISTS windows_ts_end ON windows (ts_end)")
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS devices (device TEXT PRIMARY KEY, state TEXT, birth JSONB, "
                    "status_ts DOUBLE PRECISION, last_seen DOUBLE PRECISION, last_seq BIGINT)")
        except psycopg.Error as e:
            raise StoreError(f"cannot open the PostgreSQL store {_redact(url)}: {e}",
                             hint="check the URL (postgresql://user@host:5432/db), that the server runs and "
                                  "that the user may create tables") from e
        marks = ", ".join(["%s"] * len(COLUMNS))
        self._insert = f"INSERT INTO windows ({', '.join(COLUMNS)}) VALUES ({marks}) ON CONFLICT DO NOTHING"

    def add_windows(self, records: Sequence[WindowRecord]) -> int:
        if not records:
            return 0
        rows = [_row(r) for r in records]
        last = _last_per_device(records)
        with self._lock:
            try:
                with self._db.transaction(), self._db.cursor() as cur:
                    cur.executemany(self._insert, rows)
                    inserted = cur.rowcount
                    cur.executemany(
                        "INSERT INTO devices (device, last_seen, last_seq) VALUES (%s, %s, %s) "
                        "ON CONFLICT (device) DO UPDATE SET "
                        "last_seen = greatest(devices.last_seen, excluded.last_seen), "
                        "last_seq = greatest(devices.last_seq, excluded.last_seq)",
                        [(dev, seen, seq) for dev, (seen, seq) in last.items()])
            except self._psycopg.Error as e:
                raise StoreError(f"cannot write {len(rows)} windows to {_redact(self.url)}: {e}") from e
        return max(int(inserted), 0)

    def set_status(self, device: str, state: str, payload: dict[str, Any], ts: float) -> None:
        birth = json.dumps(payload) if state == "online" else None
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO devices (device, state, birth, status_ts) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (device) DO UPDATE SET state = excluded.state, "
                    "birth = coalesce(excluded.birth, devices.birth), status_ts = excluded.status_ts",
                    (device, state, birth, ts))
            except self._psycopg.Error as e:
                raise StoreError(f"cannot record the status of {device!r} in {_redact(self.url)}: {e}") from e

    def query(self, device: str | None = None, since: float | None = None) -> Iterator[dict[str, Any]]:
        sql, params = query_sql(device, since, "%s")
        with self._lock:  # fetched in one go: psycopg connections are not shared across threads mid-query
            try:
                rows = self._db.execute(sql, params).fetchall()
            except self._psycopg.Error as e:
                raise StoreError(f"cannot read windows from {_redact(self.url)}: {e}") from e
        for row in rows:
            yield _result(*row)

    def devices(self) -> list[dict[str, Any]]:
        with self._lock:
            try:
                rows = self._db.execute("SELECT device, state, birth, status_ts, last_seen, last_seq FROM devices "
                                        "ORDER BY device").fetchall()
            except self._psycopg.Error as e:
                raise StoreError(f"cannot read devices from {_redact(self.url)}: {e}") from e
        return [{"device": d, "state": s, "birth": b, "status_ts": st, "last_seen": ls,
                 "last_seq": None if lq is None else int(lq)} for d, s, b, st, ls, lq in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM windows").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _redact(url: str) -> str:
    """A URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_store(url_or_path: str | Path) -> SqliteStore | PostgresStore:
    """``postgresql://…`` or ``postgres://…`` → PostgresStore; ``sqlite:///PATH`` or a path → SqliteStore."""
    text = str(url_or_path)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    if text.startswith("sqlite:///"):
        return SqliteStore(text[len("sqlite:///"):] or ".")
    if "://" in text:
        raise InputError(f"unknown store URL {text!r}",
                         hint="use a file path (SQLite), sqlite:///PATH or postgresql://user@host/db")
    return SqliteStore(text)
