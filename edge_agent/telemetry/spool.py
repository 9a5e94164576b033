"""The durable telemetry spool: every window is written here before it is published.

One SQLite file (``<state-dir>/spool.db``) in WAL mode. A window is a row ``(seq, ts, payload, bytes)``
appended in one transaction together with the next sequence number (table ``meta``), so a window that was
given a seq is on disk, and a seq is never reused, even after SIGKILL. A row is deleted only when the
broker acknowledged it (``ack``). ``pending`` returns rows oldest first for the forwarder.

Durability: ``synchronous=NORMAL``. In WAL mode a committed transaction survives a crash of the process
(SIGKILL, an exception): it is in the WAL file, which the OS has. A power cut may lose the last
transactions that were not yet checkpointed to the medium (at most the windows of the last few seconds),
but SQLite guarantees the file is not corrupted by it. ``FULL`` would add an fsync per window: cheap at
one window per 10 s, but it does not protect against what we actually see on bad SD cards (the card
itself losing or garbling pages), which is handled instead: a file SQLite reports as corrupt
(``SQLITE_CORRUPT`` / ``SQLITE_NOTADB``, on open, in the integrity check, or later) is moved aside to
``spool.db.corrupt-<UTC timestamp>`` and a fresh spool is started; the event is kept in ``events`` for the
agent to publish. Telemetry never stops inference.

Bounds: ``max_bytes`` (sum of payload sizes) and ``max_age_s`` (by a window's ``ts``, its end time). They are
enforced on every append by deleting the oldest rows; each one is counted in ``dropped`` (persisted in
``meta``, so the counter is cumulative over the spool's life, not per process).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import InputError

log = logging.getLogger(__name__)

SPOOL_FILE = "spool.db"
_CORRUPT_CODES = {11, 26}  # SQLITE_CORRUPT, SQLITE_NOTADB (primary codes)
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS spool (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, payload BLOB NOT NULL, "
    "bytes INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)",
)


def is_corruption(e: sqlite3.DatabaseError) -> bool:
    """True when SQLite says the file is damaged or not a database (not a full disk or a lock)."""
    code = getattr(e, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPT_CODES
    return type(e) is sqlite3.DatabaseError  # no error code attached: corruption raises the bare class


@dataclass(frozen=True)
class Row:
    seq: int
    ts: float
    payload: bytes


class Spool:
    """A bounded, crash-safe FIFO of telemetry windows in SQLite (see the module docstring).

    Thread-safe: one connection behind a lock (the inference loop appends, the forwarder reads and acks).
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int, max_age_s: float,
                 min_next_seq: int = 0, clock: Callable[[], float] = time.time) -> None:
        if max_bytes <= 0 or max_age_s <= 0:
            raise InputError(f"the spool bounds must be positive (max_bytes={max_bytes}, max_age_s={max_age_s})")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self.events: list[dict[str, Any]] = []  # to publish (spool_corrupt); the owner drains it
        self.write_errors = 0  # windows lost because SQLite could not write (disk full, I/O error)
        self._min_next_seq = min_next_seq
        self.closed = False
        self._db = self._open_checked()

    # ------------------------------------------------------------------------------------- open / recover

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=5.0)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            (check,) = db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check}")
            with db:
                db.execute("BEGIN IMMEDIATE")
                for stmt in _SCHEMA:
                    db.execute(stmt)
                db.execute("INSERT OR IGNORE INTO meta VALUES ('next_seq', ?), ('dropped', 0)",
                           (self._min_next_seq,))
                db.execute("UPDATE meta SET value = MAX(value, ?) WHERE key = 'next_seq'", (self._min_next_seq,))
        except BaseException:
            db.close()
            raise
        return db

    def _open_checked(self) -> sqlite3.Connection:
        try:
            db = self._connect()
        except sqlite3.DatabaseError as e:
            if not (is_corruption(e) or str(e).startswith("quick_check")):
                raise InputError(f"cannot open the telemetry spool {self.path}: {e}",
                                 hint="check the --state-dir permissions and free space") from e
            self._move_aside(e)
            db = self._connect()
        self._load_meta(db)
        return db

    def _move_aside(self, error: BaseException) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._clock()))
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        os.replace(self.path, target)
        for suffix in ("-wal", "-shm"):  # the WAL of a corrupt file must not be applied to the fresh one
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, target.with_name(target.name + suffix))
        log.error("telemetry spool %s is corrupt (%s): moved aside to %s and started a fresh one; the windows "
                  "it held are not delivered", self.path, error, target.name)
        self.events.append({"kind": "spool_corrupt", "path": str(self.path), "moved_to": str(target),
                            "error": str(error)})

    def _recover(self, error: sqlite3.DatabaseError) -> None:
        """Called with the lock held after a corruption error in use: move aside, reopen fresh."""
        next_seq = self._next_seq
        dropped = self._dropped
        self._db.close()
        self._move_aside(error)
        self._min_next_seq = next_seq  # seq never goes back, even onto a fresh file
        self._db = self._connect()
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'dropped'", (dropped,))
        self._load_meta(self._db)

    def _load_meta(self, db: sqlite3.Connection) -> None:
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        self._next_seq = int(meta["next_seq"])
        self._dropped = int(meta["dropped"])
        count, total, oldest = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(ts) FROM spool").fetchone()
        self._depth, self._bytes, self._oldest_ts = int(count), int(total), oldest

    # ------------------------------------------------------------------------------------- figures

    @property
    def next_seq(self) -> int:
        """The seq the next appended window gets."""
        return self._next_seq

    @property
    def dropped(self) -> int:
        """Windows deleted unsent by the bounds (or lost to a write error), over the spool's life."""
        return self._dropped + self.write_errors

    def depth(self) -> int:
        return self._depth

    @property
    def bytes(self) -> int:
        return self._bytes

    def oldest_age_s(self) -> float | None:
        """Age of the oldest spooled window (by its end time), or None when the spool is empty."""
        return None if self._oldest_ts is None else max(0.0, self._clock() - self._oldest_ts)

    # ------------------------------------------------------------------------------------- operations

    def append(self, window: dict[str, Any]) -> int:
        """Give ``window`` the next seq (set in the dict), store it, enforce the bounds; return the seq.

        Never raises for SQLite trouble: corruption moves the file aside and retries once on a fresh one;
        other write errors (disk full) are logged and the window is counted in ``dropped``.
        """
        with self._lock:
            for attempt in (0, 1):
                seq = self._next_seq
                window["seq"] = seq
                payload = json.dumps(window, separators=(",", ":"), allow_nan=False).encode()
                ts = float(window.get("ts_end", self._clock()))
                try:
                    self._append_locked(seq, ts, payload)
                    return seq
                except sqlite3.DatabaseError as e:
                    if is_corruption(e) and attempt == 0:
                        self._recover(e)
                        continue
                    self.write_errors += 1
                    self._next_seq = seq + 1  # never reuse a seq that may have been printed
                    log.error("telemetry spool %s: cannot store window seq %d (%s); it is lost", self.path,
                              seq, e)
                    return seq
        raise AssertionError("unreachable")

    def _append_locked(self, seq: int, ts: float, payload: bytes) -> None:
        db = self._db
        now = self._clock()
        dropped_now = 0
        with db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO spool VALUES (?, ?, ?, ?)", (seq, ts, payload, len(payload)))
            db.execute("UPDATE meta SET value = ? WHERE key = 'next_seq'", (seq + 1,))
            total = self._bytes + len(payload)
            cutoff = now - self.max_age_s
            # windows are appended in time order, so the old ones are at the head (seq order): look at
            # the head only, and only when the cached oldest time says there is something to drop
            while self._oldest_ts is not None and self._oldest_ts < cutoff:
                row = db.execute("SELECT seq, ts FROM spool ORDER BY seq LIMIT 1").fetchone()
                if row is None or row[0] == seq or row[1] >= cutoff:
                    break
                (b,) = db.execute("DELETE FROM spool WHERE seq = ? RETURNING bytes", (row[0],)).fetchone()
                total -= b
                dropped_now += 1
            while total > self.max_bytes:
                row = db.execute("DELETE FROM spool WHERE seq = (SELECT MIN(seq) FROM spool) RETURNING seq, bytes"
                                 ).fetchone()
                if row is None:
                    break
                total -= row[1]
                dropped_now += 1
                if row[0] == seq:  # a single window larger than the whole cap
                    break
            if dropped_now:
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped_now,))
        self._next_seq = seq + 1
        if dropped_now:
            before, self._dropped = self._dropped, self._dropped + dropped_now
            first_or_hundredth = before == 0 or before // 100 != self._dropped // 100
            log.log(logging.WARNING if first_or_hundredth else logging.DEBUG,
                    "telemetry spool full (%d bytes max, %g h max age): dropped the %d oldest window(s); "
                    "%d dropped in all", self.max_bytes, self.max_age_s / 3600, dropped_now, self._dropped)
        self._bytes = total
        self._depth += 1 - dropped_now
        if dropped_now or self._oldest_ts is None:
            self._refresh_oldest_locked()

    def _refresh_oldest_locked(self) -> None:
        row = self._db.execute("SELECT ts FROM spool ORDER BY seq LIMIT 1").fetchone()  # seq order = ts order
        self._oldest_ts = None if row is None else float(row[0])

    def pending(self, limit: int, after: int = -1) -> list[Row]:
        """Up to ``limit`` spooled windows with seq > ``after``, oldest first."""
        with self._lock:
            try:
                rows = self._db.execute("SELECT seq, ts, payload FROM spool WHERE seq > ? ORDER BY seq LIMIT ?",
                                        (after, limit)).fetchall()
            except sqlite3.DatabaseError as e:
                if not is_corruption(e):
                    log.error("telemetry spool %s: cannot read (%s)", self.path, e)
                    return []
                self._recover(e)
                return []
        return [Row(int(s), float(t), bytes(p)) for s, t, p in rows]

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete acknowledged windows (one transaction); return how many were still there."""
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            try:
                freed = []
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    for i in range(0, len(seqs), 500):  # stay below SQLite's bound-parameter limit
                        part = seqs[i:i + 500]
                        marks = ",".join("?" * len(part))
                        freed += self._db.execute(f"DELETE FROM spool WHERE seq IN ({marks}) RETURNING bytes",
                                                  part).fetchall()
            except sqlite3.DatabaseError as e:
                if is_corruption(e):
                    self._recover(e)
                else:
                    log.error("telemetry spool %s: cannot delete acknowledged windows (%s); they will be sent "
                              "again", self.path, e)
                return 0
            self._depth -= len(freed)
            self._bytes -= sum(b for (b,) in freed)
            self._refresh_oldest_locked()
        return len(freed)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.DatabaseError as e:
                log.warning("telemetry spool %s: checkpoint at close failed (%s)", self.path, e)
            self._db.close()


def peek_next_seq(path: str | os.PathLike[str]) -> int | None:
    """The next seq recorded in an existing spool file (read-only), or None when there is none / it is
    unreadable (then a warning says so). Offline runs use it so seq stays monotonic across modes."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as e:
        log.warning("cannot read the next seq from the telemetry spool %s (%s); using the seq file", path, e)
        return None
    return None if row is None else int(row[0])


# --------------------------------------------------------------------------------------------------
# the sink: spool first, then forward over MQTT


class SpoolingSink:
    """A ``TelemetrySink`` that writes every window to the spool, then forwards it over MQTT.

    ``publish_window`` only appends to the spool (one small SQLite transaction, which also gives the
    window its seq) and wakes the forwarder thread; it never waits for the network. The forwarder
    publishes spooled windows oldest first, QoS 1, with at most ``max_inflight`` unacknowledged, and deletes
    a window when its PUBACK arrives with a success code. A PUBACK with a failure code (MQTT 5, e.g. 0x87
    "Not authorized" from an ACL) leaves the window in the spool; it is sent again after the next
    reconnect. Windows handed to paho and not acknowledged when the connection drops are re-sent by paho
    itself (same message, DUP flag) after reconnecting, so they are never published twice by us.

    ``historical``: a window is published with ``historical: true`` when it ended (``ts_end``) before the
    MQTT connection that carries it was established: windows that waited out an outage, and windows left
    in the spool by an earlier run of the agent. A window that paho re-sends after a reconnect keeps the
    flag it was first published with.
    """

    def __init__(self, spool: Spool, mqtt_args: dict[str, Any], *, max_inflight: int = 100) -> None:
        from edge_agent.telemetry.mqtt import MqttPublisher

        self.spool = spool
        self.max_inflight = max_inflight
        self._cv = threading.Condition()
        self._inflight: dict[int, int] = {}  # mid -> seq
        self._early: dict[int, bool] = {}  # acks that arrived before the mid was recorded
        self._acked: list[int] = []  # seqs acknowledged, not yet deleted from the spool
        self._reconnected = True
        self._cursor = -1  # highest seq handed to paho on this connection
        self._stop = False
        self.published = 0  # windows handed to paho (first sends; paho's own re-sends are not counted)
        self.historical_sent = 0
        self.publisher = MqttPublisher(**mqtt_args, max_inflight=max_inflight, birth_extra=self._spool_figures,
                                       on_ack=self._on_ack, on_connected=self._on_connected)
        self._drain_events()
        self._thread = threading.Thread(target=self._forward, name="telemetry-forwarder", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------------------------- TelemetrySink

    @property
    def dropped(self) -> int:
        return self.spool.dropped

    @property
    def next_seq(self) -> int:
        return self.spool.next_seq

    def publish_window(self, window: dict[str, Any]) -> None:
        self.spool.append(window)
        self._drain_events()
        with self._cv:
            self._cv.notify_all()

    def publish_event(self, kind: str, **fields: Any) -> None:
        self.publisher.publish_event(kind, **fields)

    def status(self) -> dict[str, Any]:
        """What the agent reports about its telemetry (log lines, bench/run output)."""
        age = self.spool.oldest_age_s()
        return {"mqtt_state": self.publisher.state, "mqtt_error": self.publisher.last_error,
                "spool_depth": self.spool.depth(), "spool_oldest_age_s": None if age is None else round(age, 3),
                "spool_dropped": self.spool.dropped, "mqtt_rejected": self.publisher.rejected}

    def close(self, timeout: float = 5.0) -> None:
        """Forward what the spool holds for at most ``timeout`` s (when connected), then disconnect.

        What is not acknowledged by then stays in the spool for the next run.
        """
        deadline = time.monotonic() + timeout
        try:
            while self.publisher.connected and time.monotonic() < deadline:
                with self._cv:  # done: nothing in flight and every spooled window was sent on this connection
                    if not self._inflight and not self._reconnected and self._cursor >= self.spool.next_seq - 1:
                        break
                    self._cv.wait(0.05)
        finally:
            with self._cv:
                self._stop = True
                self._cv.notify_all()
            self._thread.join(timeout=5.0)
            self.publisher.close(timeout=max(0.1, deadline - time.monotonic()))
            with self._cv:
                acked, self._acked = self._acked, []
            self.spool.ack(acked)
            left = self.spool.depth()
            if left:
                log.info("telemetry spool keeps %d window(s) for the next run", left)
            self.spool.close()

    # ------------------------------------------------------------------------------------- internals

    def _spool_figures(self) -> dict[str, Any]:
        age = self.spool.oldest_age_s()
        return {"spool_depth": self.spool.depth(), "spool_oldest_age_s": None if age is None else round(age, 3)}

    def _drain_events(self) -> None:
        while self.spool.events:
            event = self.spool.events.pop(0)
            self.publisher.publish_event(event.pop("kind"), **event)

    def _on_connected(self) -> None:  # paho's thread
        with self._cv:
            self._reconnected = True
            self._cv.notify_all()

    def _on_ack(self, mid: int, ok: bool) -> None:  # paho's thread, with paho's message lock held
        with self._cv:
            seq = self._inflight.pop(mid, None)
            if seq is None:
                self._early[mid] = ok
                return
            if ok:
                self._acked.append(seq)
            self._cv.notify_all()

    def _forward(self) -> None:
        try:
            while True:
                with self._cv:
                    if self._stop:
                        return
                    if not self._acked and not self._want_rows():
                        self._cv.wait(0.5)
                    acked, self._acked = self._acked, []
                    if self._reconnected and self.publisher.connected:
                        self._reconnected = False
                        self._cursor = -1  # start over from the oldest spooled window
                    room = self.max_inflight - len(self._inflight)
                    inflight_seqs = set(self._inflight.values())
                    cursor = self._cursor
                if acked:
                    self.spool.ack(acked)
                since = self.publisher.connected_since
                if room <= 0 or since is None or not self.publisher.connected:
                    continue
                newest = self.spool.next_seq - 1  # every seq up to it is committed (or was lost)
                found = self.spool.pending(room + len(inflight_seqs), after=cursor)
                rows = [r for r in found if r.seq not in inflight_seqs][:room]
                if not rows:  # nothing new up to `newest` (gaps: acked, dropped, or lost to a write error)
                    with self._cv:
                        self._cursor = max(self._cursor, newest if not found else found[-1].seq)
                for row in rows:
                    if not self._send(row, since):
                        break
        except Exception:  # the forwarder must not die silently: log it; windows stay in the spool
            log.exception("telemetry forwarder failed; windows stay in the spool until the agent restarts")

    def _want_rows(self) -> bool:
        """Called with the lock held: is there possibly something to publish right now?"""
        return (self.publisher.connected and len(self._inflight) < self.max_inflight
                and (self._reconnected or self.spool.next_seq - 1 > self._cursor))

    def _send(self, row: Row, connected_since: float) -> bool:
        payload: bytes = row.payload
        historical = row.ts < connected_since
        if historical:
            doc = json.loads(payload)
            doc["historical"] = True
            payload = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
        mid = self.publisher.publish_tracked("telemetry", payload)
        if mid is None:  # paho's queue is full (cannot happen with max_queued > max_inflight)
            return False
        with self._cv:
            self._cursor = max(self._cursor, row.seq)
            early = self._early.pop(mid, None)
            if early is None:
                self._inflight[mid] = row.seq
            elif early:
                self._acked.append(row.seq)
        self.published += 1
        self.historical_sent += historical
        return True
