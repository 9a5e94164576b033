"""The fleet monitor's ingester: MQTT telemetry in, a store and a fleet state out.

paho-mqtt 2.x (callback API version 2), MQTT 5, a **persistent session** (``clean_start=False`` and a
session expiry, client id ``edgekit-monitor-<host>`` unless given): while the monitor is away the broker
keeps its subscriptions and queues QoS 1 messages for it (broker settings: docs/fleet.md).

Subscriptions (QoS 1): ``<prefix>/+/telemetry``, ``<prefix>/+/events`` and ``<prefix>/+/status``. With a
share group G the first two become ``$share/G/<prefix>/+/…`` so several monitors split one fleet's windows;
status stays a plain subscription so every monitor sees the whole fleet's state.

Taking a message (paho's network thread): size cap, JSON decode, ``validate_window``, topic vs payload
device, the in-memory fleet state, then the window goes to a writer thread, which stores batches (≤
``batch_size`` windows, or when the oldest is ``flush_interval`` s old, one transaction each; woken once per
batch, not per window). In a burst (a backlog after a reconnect, a busy fleet) paho's thread takes messages
64 at a time rather than one by one, which keeps the decoder's code and data in the CPU caches; a burst's
tail is taken by the writer 10 ms after the last message, and ``flush()`` takes whatever waits. A bad
message is counted (``malformed``, ``oversized``, ``wrong_schema``, ``device_mismatch``) and skipped;
anything unexpected is counted in ``errors`` (or ``store_errors``) and logged with its traceback. Nothing a
device sends can stop it. (Decoding in the writer thread instead, paho's thread only queueing the raw
message, was measured slower: both threads need the GIL, and the network thread then waits for it.)

``compute_alerts`` is a pure function over the fleet state (see its docstring).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from converters.store import Store, StoreError, WindowRecord
from edge_agent.errors import EdgekitError, InputError, ProfileError, TelemetryError, missing_extra
from edge_agent.telemetry.mqtt import check_topic_part
from edge_agent.telemetry.schema import validate_window

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_WINDOW_S = 10.0
OFFLINE_WINDOWS = 3  # no window for this many window lengths: offline
TEMP_MARGIN_C = 5.0  # alert this far below the profile's throttle temperature
DEFAULT_THROTTLE_C = 80.0  # when the device's profile is unknown (the profiles' own default)
# A message less than _BURST_GAP_S after the previous one waits until _BURST_TAKE are there, then paho's
# thread takes them together (≈ 10 % less CPU per window than one at a time: bench/monitor_ingest.py);
# the writer takes a burst's tail _TAIL_S after its last message. A message after a pause is taken at once.
_BURST_GAP_S = 0.001
_BURST_TAKE = 64
_TAIL_S = 0.01
COUNTER_NAMES = ("received", "stored", "duplicates", "malformed", "oversized", "wrong_schema",
                 "device_mismatch", "filtered", "status", "events", "errors", "store_errors")


def default_client_id() -> str:
    return f"edgekit-monitor-{socket.gethostname()}"


@dataclass
class Counters:
    """What the monitor saw. The message counters are written under the monitor's take lock (by paho's
    thread, or the writer for a burst's tail), the store counters (``stored``, ``duplicates``,
    ``store_errors``) by the writer thread only."""

    received: int = 0  # every message on a subscribed topic
    stored: int = 0  # windows newly written to the store
    duplicates: int = 0  # windows the store already had (same device and seq)
    malformed: int = 0  # not JSON, not UTF-8, or a topic that is not <prefix>/<device>/<kind>
    oversized: int = 0  # over the size cap
    wrong_schema: int = 0  # JSON, but validate_window (or the status format) found problems
    device_mismatch: int = 0  # the device in the topic is not the device in the payload
    filtered: int = 0  # a device that --devices does not select
    status: int = 0
    events: int = 0
    errors: int = 0  # unexpected exceptions in on_message (logged with their traceback)
    store_errors: int = 0  # batches the store failed to write (logged)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class DeviceState:
    """The monitor's view of one device. Profile-derived thresholds are resolved when the birth arrives."""

    device: str
    state: str | None = None  # "online" / "offline" from the retained status; None: never seen
    birth: dict[str, Any] | None = None
    status_at: float | None = None  # local receipt time of the last status
    last_window: dict[str, Any] | None = None
    last_window_at: float | None = None  # local receipt time of the newest window
    windows: int = 0
    dropped_increase: int = 0  # how much `dropped` grew with the newest window
    profile: str | None = None
    slo_p99_ms: float | None = None  # from the profile (telemetry.slo_p99_ms when > 0)
    throttle_c: float | None = None  # from the profile (thermal.throttle_c)
    profile_window_s: float | None = None
    last_event: dict[str, Any] | None = None

    def window_s(self) -> float:
        w = self.last_window
        if w is not None:
            span = float(w["ts_end"]) - float(w["ts_start"])
            if span > 0:
                return max(span, self.profile_window_s or 0.0)
        return self.profile_window_s or DEFAULT_WINDOW_S


@dataclass(frozen=True)
class Alert:
    device: str
    kind: str  # offline | slo | temperature | throttled | dropped
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def compute_alerts(fleet: Mapping[str, DeviceState], now: float, *, slo_ms: float | None = None,
                   throttle_c: float | None = None) -> list[Alert]:
    """The alerts of a fleet at time ``now`` (UNIX s). Pure: no clock, no I/O.

    - ``offline``: the retained status says offline, or no window came for 3 window lengths (the newest
      window's span, at least the profile's ``window_s``; 10 s when neither is known);
    - ``slo``: the newest window's p99 is above ``slo_ms`` (given), else the profile's ``slo_p99_ms``;
    - ``temperature``: ``temp_c`` ≥ throttle temperature − 5 °C (``throttle_c`` given, else the profile's,
      else 80 °C);
    - ``throttled``: the newest window says ``throttled: true``;
    - ``dropped``: ``dropped`` grew with the newest window (the agent lost windows).
    """
    out: list[Alert] = []
    for name in sorted(fleet):
        d = fleet[name]
        if d.state == "offline":
            out.append(Alert(name, "offline", f"{name} is offline (status)"))
        elif d.last_window_at is not None and now - d.last_window_at > OFFLINE_WINDOWS * d.window_s():
            out.append(Alert(name, "offline", f"{name}: no window for {now - d.last_window_at:.0f} s "
                                              f"(window {d.window_s():g} s)"))
        w = d.last_window
        if w is None:
            continue
        slo = slo_ms if slo_ms is not None else d.slo_p99_ms
        p99 = (w.get("latency_ms") or {}).get("p99")
        if slo and p99 is not None and p99 > slo:
            out.append(Alert(name, "slo", f"{name}: p99 {p99:g} ms above the SLO {slo:g} ms"))
        limit = throttle_c if throttle_c is not None else (d.throttle_c or DEFAULT_THROTTLE_C)
        temp = w.get("temp_c")
        if temp is not None and temp >= limit - TEMP_MARGIN_C:
            out.append(Alert(name, "temperature", f"{name}: {temp:g} °C, throttling starts at {limit:g} °C"))
        if w.get("throttled") is True:
            out.append(Alert(name, "throttled", f"{name} is throttling"))
        if d.dropped_increase > 0:
            out.append(Alert(name, "dropped", f"{name} dropped {d.dropped_increase} more window(s) "
                                              f"(total {w.get('dropped')})"))
    return out


def device_row(d: DeviceState, now: float) -> dict[str, Any]:
    """One device as a flat dict (the --json output and the table's row)."""
    w = d.last_window or {}
    birth = d.birth or {}
    model = w.get("model") or birth.get("model") or {}
    lat = w.get("latency_ms") or {}
    power = w.get("power_w") or {}
    return {
        "device": d.device,
        "state": d.state or ("online" if d.last_window_at is not None else "unknown"),
        "profile": d.profile,
        "model": model.get("name"),
        "model_version": model.get("version"),
        "engine": w.get("engine") or birth.get("engine"),
        "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"),
        "fps": w.get("fps"),
        "power_w": power.get("mean"),
        "energy_mj_per_inference": w.get("energy_mj_per_inference"),
        "temp_c": w.get("temp_c"),
        "throttled": w.get("throttled"),
        "dropped": w.get("dropped"),
        "seq": w.get("seq"),
        "windows": d.windows,
        "last_seen": d.last_window_at,
        "last_seen_ago_s": None if d.last_window_at is None else round(now - d.last_window_at, 1),
        "spool_depth": w.get("spool_depth"),  # optional field: null from agents without a spool
        "spool_oldest_age_s": w.get("spool_oldest_age_s"),
    }


@dataclass(frozen=True)
class TlsOptions:
    ca: str | None = None  # CA file; None with enabled: the system CAs
    cert: str | None = None
    key: str | None = None
    insecure: bool = False  # do not check the broker's host name (tests, IP-only brokers)


@dataclass
class _Status:
    """A status change on its way to the store (windows travel as ``WindowRecord``)."""

    device: str
    state: str
    payload: dict[str, Any]
    ts: float


def _loads(payload: bytes) -> tuple[Any, str | None]:
    """``json.loads(payload)`` and the payload's text when it is plain UTF-8 (else None).

    A payload starting with ``{`` and a non-NUL byte is UTF-8 to ``json.detect_encoding``; when it also
    decodes strictly, parsing that text is what ``json.loads(payload)`` does, and the text is the one the
    store keeps: one decode instead of two. Anything else goes to ``json.loads(payload)`` unchanged.
    """
    if payload[:1] == b"{" and payload[1:2] != b"\x00":
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            return json.loads(payload), None
        return json.loads(text), text
    return json.loads(payload), None


class Monitor:
    """Subscribe, validate, keep the fleet state and feed the store (see module docstring)."""

    def __init__(self, host: str, port: int, *, store: Store | None = None, prefix: str = "edgekit",
                 client_id: str | None = None, share_group: str | None = None,
                 devices: str | None = None, persistent: bool = True, session_expiry: int = 7 * 86400,
                 tls: TlsOptions | None = None, username: str | None = None, password: str | None = None,
                 max_bytes: int = MAX_MESSAGE_BYTES, batch_size: int = 500, flush_interval: float = 0.1,
                 profiles_dir: str | Path | None = None, keepalive: int = 30) -> None:
        try:
            import paho.mqtt.client as mqtt
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
        except ImportError as e:
            raise missing_extra("paho-mqtt", "host", "edgekit monitor") from e
        check_topic_part(prefix, "topic prefix")
        if share_group is not None:
            check_topic_part(share_group, "share group")
        if not 1 <= batch_size <= 10_000:
            raise InputError(f"batch size {batch_size} is out of range", hint="use 1 to 10000 (default 500)")
        self.host, self.port, self.prefix = host, port, prefix
        self.store = store
        self.share_group = share_group
        self.devices_pattern = devices
        self.max_bytes = max_bytes
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.profiles_dir = profiles_dir
        self.client_id = client_id or default_client_id()
        self.counters = Counters()
        self._fleet: dict[str, DeviceState] = {}
        # Taking a message (counters, decoding, validation) holds _take_lock; the fleet state and the
        # hand-off to the writer are under _lock, taken once per window. Order: _take_lock, then _lock.
        self._take_lock = threading.Lock()
        self._waiting: list[tuple[str | None, bytes, float]] = []  # (topic, payload, received at): a burst
        self._last_arrival = -math.inf  # monotonic arrival of the previous message
        self._tail_check: float | None = None  # (under _lock) when the writer looks at waiting messages
        self._lock = threading.Lock()
        self._profile_cache: dict[str, Any] = {}
        self._pending: list[WindowRecord | _Status] = []  # received, not yet taken by the writer
        self._pending_since = 0.0  # monotonic time the oldest pending item arrived
        self._enqueued = 0
        self._done = 0
        self._flushing = 0  # flush() calls waiting: the writer writes at once instead of filling a batch
        self._writer_stop = False
        self._work = threading.Condition(self._lock)  # the writer waits here
        self._done_cond = threading.Condition(self._lock)  # flush() waits here
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        self._closing = False
        self._writer: threading.Thread | None = None
        self._connect_error: str | None = None

        share = f"$share/{share_group}/" if share_group else ""
        self.subscriptions = [
            (f"{share}{prefix}/+/telemetry", 1),
            (f"{share}{prefix}/+/events", 1),
            (f"{prefix}/+/status", 1),
        ]
        self._mqtt = mqtt
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        client.max_inflight_messages_set(100)
        client.reconnect_delay_set(1, 30)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            try:
                client.tls_set(ca_certs=tls.ca, certfile=tls.cert, keyfile=tls.key)
            except (OSError, ValueError) as e:
                raise InputError(f"cannot set up TLS: {e}",
                                 hint="check --tls-ca, --tls-cert and --tls-key name readable PEM files") from e
            if tls.insecure:
                client.tls_insecure_set(True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        self._connect_props = None
        self._clean_start = not persistent
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(session_expiry)
            self._connect_props = props
        self._keepalive = keepalive

    # -------------------------------------------------------------------------------- life cycle

    def start(self, timeout: float = 10.0, *, wait: bool = True) -> Monitor:
        """Start the writer thread and connect. With ``wait`` (tools, ``--once``), a broker that cannot
        be reached or refuses within ``timeout`` is a TelemetryError; without it, paho keeps retrying."""
        self._writer = threading.Thread(target=self._write_loop, name="edgekit-monitor-writer", daemon=True)
        self._writer.start()
        try:
            self._client.connect_async(self.host, self.port, self._keepalive, clean_start=self._clean_start,
                                       properties=self._connect_props)
        except ValueError as e:
            raise InputError(f"bad MQTT broker address {self.host}:{self.port}: {e}",
                             hint="e.g. --broker broker.local:1883") from e
        self._client.loop_start()
        if wait and not self.wait_subscribed(timeout):
            reason = self._connect_error or "no answer"
            self.stop()
            raise TelemetryError(f"cannot subscribe at the MQTT broker {self.host}:{self.port} within "
                                 f"{timeout:g} s ({reason})",
                                 hint="check --broker, that the broker runs, and the TLS/user options")
        return self

    def wait_subscribed(self, timeout: float) -> bool:
        return self._subscribed.wait(timeout)

    def flush(self, timeout: float = 10.0) -> bool:
        """Take every message received so far and wait until its window is written (or ``timeout``). The
        writer writes what it holds at once rather than waiting for a full batch or ``flush_interval``."""
        deadline = time.monotonic() + timeout
        self._take_waiting()
        with self._lock:
            self._flushing += 1
            self._work.notify()
            try:
                while self._done < self._enqueued:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._done_cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    def stop(self, flush_timeout: float = 10.0) -> None:
        """Disconnect (the persistent session stays on the broker), write what is queued, stop."""
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()
        if self._writer is not None and self._writer.is_alive():
            self.flush(flush_timeout)
            with self._lock:
                self._writer_stop = True
                self._work.notify()
            self._writer.join(flush_timeout)

    # -------------------------------------------------------------------------------- state

    def fleet(self) -> dict[str, DeviceState]:
        """A snapshot (shallow copies) of the fleet state."""
        with self._lock:
            return {k: DeviceState(**vars(v)) for k, v in self._fleet.items()}

    def rows(self, now: float | None = None) -> list[dict[str, Any]]:
        now = time.time() if now is None else now
        return [device_row(d, now) for _, d in sorted(self.fleet().items())]

    def alerts(self, now: float | None = None, *, slo_ms: float | None = None,
               throttle_c: float | None = None) -> list[Alert]:
        return compute_alerts(self.fleet(), time.time() if now is None else now, slo_ms=slo_ms,
                              throttle_c=throttle_c)

    # -------------------------------------------------------------------------------- paho callbacks

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._connect_error = f"refused: {reason_code}"
            log.error("MQTT broker %s:%s refused the monitor (%s): check the user name, password and ACLs",
                      self.host, self.port, reason_code)
            return
        self._connected.set()
        resumed = bool(getattr(flags, "session_present", False))
        log.info("monitor connected to %s:%s as %r (%s session)", self.host, self.port, self.client_id,
                 "resumed" if resumed else "new")
        result, mid = client.subscribe(self.subscriptions)
        if result != self._mqtt.MQTT_ERR_SUCCESS:
            log.error("cannot subscribe to %s: %s", self.subscriptions, result)
            return
        self._pending_subs.add(mid)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        failed = [(t, rc) for (t, _), rc in zip(self.subscriptions, reason_codes, strict=False) if rc.is_failure]
        if failed:
            self._connect_error = f"subscription refused: {failed}"
            log.error("the broker refused subscriptions %s (shared subscriptions need MQTT 5 and a broker that "
                      "supports them; check ACLs)", failed)
            return
        self._subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self._connected.clear()
        if not self._closing:
            log.warning("monitor lost the MQTT broker %s:%s (%s); reconnecting, the persistent session keeps "
                        "QoS 1 messages meanwhile", self.host, self.port, reason_code)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        now, arrival = time.time(), time.monotonic()
        try:
            topic = msg.topic
        except UnicodeDecodeError:  # MQTT topics are UTF-8; a broker should never pass on such a message
            topic = None
        with self._take_lock:
            waiting = self._waiting
            waiting.append((topic, msg.payload, now))  # not msg: paho's message objects die young
            burst = arrival - self._last_arrival < _BURST_GAP_S
            self._last_arrival = arrival
            if burst and len(waiting) < _BURST_TAKE:
                if len(waiting) == 1:
                    self._remind_writer(arrival + _TAIL_S)
                return
            self._waiting = []
            for item in waiting:
                self._take_message(*item)

    def _remind_writer(self, at: float) -> None:
        """The writer looks at the waiting messages at ``at`` (monotonic). Caller holds _take_lock."""
        with self._lock:
            if self._tail_check is None:
                self._tail_check = at
                self._work.notify()

    def _take_waiting(self) -> None:
        """Take the messages waiting in a burst, in this thread (the writer for a tail, flush())."""
        with self._take_lock:
            waiting, self._waiting = self._waiting, []
            for item in waiting:
                self._take_message(*item)

    def _take_tail(self) -> None:
        """The writer's look at a burst: while messages keep coming paho's thread takes them itself, so
        the writer only takes what waits once none came for _TAIL_S (and never contends for _take_lock
        during the burst)."""
        due = self._last_arrival + _TAIL_S  # written by paho's thread; a float read is atomic
        if time.monotonic() < due:
            with self._lock:
                if self._tail_check is None:
                    self._tail_check = due
            return
        self._take_waiting()

    def _take_message(self, topic: str | None, payload: bytes, now: float) -> None:
        """``_take`` for a message from paho (caller holds _take_lock): nothing a device sends escapes it."""
        try:
            if topic is None:
                self.counters.received += 1
                self.counters.malformed += 1
                return
            self._take(topic, payload, now)
        except EdgekitError as e:
            self.counters.errors += 1
            log.warning("message on %s skipped: %s", topic, e)
        except Exception:  # a monitor must not die on one message; counted and logged with the traceback
            self.counters.errors += 1
            log.exception("unexpected error handling a message on %s (skipped, monitor continues)", topic)

    # -------------------------------------------------------------------------------- message handling

    def handle(self, topic: str, payload: bytes, now: float | None = None) -> str:
        """Classify and take one message in the calling thread; returns what happened (a counter name, or
        ``window``). The fleet state is updated when it returns; the writer thread stores the window."""
        with self._take_lock:
            return self._take(topic, payload, time.time() if now is None else now)

    def _take(self, topic: str, payload: bytes, now: float) -> str:
        """Count, decode, validate, update the fleet state, hand the window to the writer."""
        c = self.counters
        c.received += 1
        parts = topic.split("/")
        if len(parts) != 3 or parts[0] != self.prefix or parts[2] not in ("telemetry", "status", "events"):
            c.malformed += 1
            return "malformed"
        _, device, kind = parts
        if self.devices_pattern and not fnmatch.fnmatchcase(device, self.devices_pattern):
            c.filtered += 1
            return "filtered"
        if len(payload) > self.max_bytes:
            c.oversized += 1
            log.debug("oversized message (%d bytes) on %s skipped", len(payload), topic)
            return "oversized"
        if kind == "status" and not payload:  # a cleared retained status: forget the device's state
            with self._lock:
                self._fleet.pop(device, None)
            c.status += 1
            return "status"
        try:
            doc, text = _loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            c.malformed += 1
            log.debug("malformed message on %s skipped", topic)
            return "malformed"
        if kind == "telemetry":
            return self._take_window(device, doc, payload if text is None else text, now)
        if kind == "status":
            return self._take_status(device, doc, now)
        if not isinstance(doc, dict):
            c.wrong_schema += 1
            return "wrong_schema"
        c.events += 1
        with self._lock:
            self._state(device).last_event = doc
        return "events"

    def _state(self, device: str) -> DeviceState:
        st = self._fleet.get(device)
        if st is None:
            st = self._fleet[device] = DeviceState(device)
        return st

    def _take_window(self, device: str, doc: Any, payload: bytes | str, now: float) -> str:
        c = self.counters
        problems = validate_window(doc)
        if problems:
            c.wrong_schema += 1
            log.debug("window on %s/%s/telemetry skipped: %s", self.prefix, device, "; ".join(problems))
            return "wrong_schema"
        if doc["device"] != device:
            c.device_mismatch += 1
            log.debug("window for %r arrived on the topic of %r: skipped", doc["device"], device)
            return "device_mismatch"
        record = None
        if self.store is not None:
            record = WindowRecord(doc, payload if type(payload) is str else payload.decode(), now)
        with self._lock:
            st = self._state(device)
            last = st.last_window
            if last is None or doc["seq"] > last["seq"]:
                prev_dropped = last["dropped"] if last is not None and not doc["historical"] else None
                st.dropped_increase = max(doc["dropped"] - prev_dropped, 0) if prev_dropped is not None else 0
                st.last_window = doc
            st.last_window_at = now
            st.windows += 1
            if record is not None:
                self._enqueue(record)
        return "window"

    def _take_status(self, device: str, doc: Any, now: float) -> str:
        c = self.counters
        if not isinstance(doc, dict) or doc.get("state") not in ("online", "offline"):
            c.wrong_schema += 1
            return "wrong_schema"
        if doc.get("device", device) != device:
            c.device_mismatch += 1
            return "device_mismatch"
        c.status += 1
        profile_name = (doc.get("device_profile") or doc.get("profile")) if doc["state"] == "online" else None
        prof = self._profile(profile_name) if isinstance(profile_name, str) else None
        with self._lock:
            st = self._state(device)
            st.state = doc["state"]
            st.status_at = now
            if doc["state"] == "online":
                st.birth = doc
                st.profile = profile_name if isinstance(profile_name, str) else None
                if prof is not None:
                    st.slo_p99_ms = prof.telemetry.slo_p99_ms or None
                    st.throttle_c = prof.thermal.throttle_c
                    st.profile_window_s = prof.telemetry.window_s
            if self.store is not None:
                self._enqueue(_Status(device, doc["state"], doc, now))
        return "status"

    def _profile(self, name: str) -> Any:
        """The device profile by name (cached; None when unknown: alerts then use defaults)."""
        if name not in self._profile_cache:
            from edge_agent.profiles import load_profile

            try:
                self._profile_cache[name] = load_profile(name, self.profiles_dir)
            except ProfileError as e:
                log.warning("profile %r of a device is not known here (%s); its alerts use default thresholds",
                            name, e.message)
                self._profile_cache[name] = None
        return self._profile_cache[name]

    # -------------------------------------------------------------------------------- writer thread

    def _enqueue(self, item: WindowRecord | _Status) -> None:
        """Hand an item to the writer; the caller holds ``self._lock``. The writer is woken for the first
        item of a batch and for a full batch only, not once per window."""
        pending = self._pending
        pending.append(item)
        self._enqueued += 1
        n = len(pending)
        if n == 1:
            self._pending_since = time.monotonic()
            self._work.notify()
        elif n == self.batch_size:
            self._work.notify()

    def _take_pending(self) -> list[WindowRecord | _Status] | None:
        """Block until there is something to write: a full batch, the oldest item ``flush_interval`` old,
        a flush() waiting, or stop (None: stop and nothing left). Takes a burst's tail when it is due."""
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    if self._tail_check is not None and now >= self._tail_check:
                        self._tail_check = None
                        break  # take the tail outside _lock (lock order)
                    pending = self._pending
                    timeout: float | None = None
                    if pending:
                        due = self._pending_since + self.flush_interval
                        if (len(pending) >= self.batch_size or self._flushing or self._writer_stop
                                or now >= due):
                            self._pending = []
                            return pending
                        timeout = due - now
                    elif self._writer_stop:
                        return None
                    if self._tail_check is not None:
                        left = self._tail_check - now
                        timeout = left if timeout is None else min(timeout, left)
                    self._work.wait(timeout)
            self._take_tail()

    def _mark_done(self, n: int) -> None:
        if n:
            with self._lock:
                self._done += n
                self._done_cond.notify_all()

    def _write_batch(self, batch: list[WindowRecord]) -> None:
        if not batch or self.store is None:
            return
        try:
            new = self.store.add_windows(batch)
        except StoreError as e:
            self.counters.store_errors += 1
            log.error("%d windows not stored: %s", len(batch), e)
        except Exception:  # the writer must not die: counted and logged with the traceback
            self.counters.store_errors += 1
            log.exception("unexpected error storing %d windows (skipped, monitor continues)", len(batch))
        else:
            self.counters.stored += new
            self.counters.duplicates += len(batch) - new
        finally:
            self._mark_done(len(batch))

    def _write_status(self, item: _Status) -> None:
        try:
            if self.store is not None:
                self.store.set_status(item.device, item.state, item.payload, item.ts)
        except StoreError as e:
            self.counters.store_errors += 1
            log.error("status of %s not stored: %s", item.device, e)
        except Exception:  # the writer must not die: counted and logged with the traceback
            self.counters.store_errors += 1
            log.exception("unexpected error storing the status of %s (skipped, monitor continues)", item.device)
        finally:
            self._mark_done(1)

    def _write_items(self, items: list[WindowRecord | _Status]) -> None:
        """Windows in batches of ≤ ``batch_size``; a status change ends the batch before it (order kept)."""
        batch: list[WindowRecord] = []
        for item in items:
            if type(item) is WindowRecord:
                batch.append(item)
                if len(batch) >= self.batch_size:
                    self._write_batch(batch)
                    batch = []
            else:
                self._write_batch(batch)
                batch = []
                self._write_status(item)  # type: ignore[arg-type]
        self._write_batch(batch)

    def _write_loop(self) -> None:
        while True:
            items = self._take_pending()
            if items is None:
                return
            self._write_items(items)


class AlertLog:
    """Turns successive alert lists into state changes: what began and what ended (for --headless)."""

    def __init__(self) -> None:
        self.active: dict[tuple[str, str], Alert] = {}

    def update(self, alerts: Iterable[Alert]) -> tuple[list[Alert], list[Alert]]:
        now = {(a.device, a.kind): a for a in alerts}
        began = [a for k, a in now.items() if k not in self.active]
        ended = [a for k, a in self.active.items() if k not in now]
        self.active = now
        return began, ended


def run_headless(monitor: Monitor, *, stop: threading.Event, emit: Callable[[dict[str, Any]], None],
                 stats_every: float = 60.0, slo_ms: float | None = None, throttle_c: float | None = None,
                 tick: float = 0.5) -> AlertLog:
    """Until ``stop``: emit alert state changes (``{"event": "alert"|"clear", "device", "kind",
    "message"}``, one per change) and the counters every ``stats_every`` s (``{"event": "counters", …}``)."""
    alerts = AlertLog()
    next_stats = time.monotonic() + stats_every
    while True:
        began, ended = alerts.update(monitor.alerts(slo_ms=slo_ms, throttle_c=throttle_c))
        for a in began:
            emit({"event": "alert", **a.to_dict()})
        for a in ended:
            emit({"event": "clear", **a.to_dict()})
        if time.monotonic() >= next_stats:
            emit({"event": "counters", **monitor.counters.to_dict()})
            next_stats += stats_every
        if stop.wait(tick):
            return alerts
