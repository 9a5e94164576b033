"""MQTT delivery of telemetry (paho-mqtt 2.x, callback API version 2).

Topics under ``<prefix>/<device>/``: ``status`` (retained, QoS 1: the birth ``online`` on every connect,
the Last Will ``offline`` when the connection is lost, and ``offline`` again on a clean shutdown),
``telemetry`` (QoS 1 windows) and ``events`` (QoS 1). See docs/telemetry.md.

The publisher never blocks or raises into the inference loop: it connects in paho's network thread
(``connect_async`` + ``loop_start``), reconnects with exponential back-off (1 s to 60 s), and paho queues
QoS 1 messages while the broker is away, in memory and bounded (``max_queued`` windows; beyond it a window
is dropped and counted in ``dropped``). MQTT is delivery, not storage: with a state folder the agent puts
the durable spool (``spool.SpoolingSink``) in front of it, which uses ``publish_tracked`` + ``on_ack``.
TLS (``TlsOptions``: CA, client certificate and key) and user/password come in ``MqttSettings``. A broker
that refuses the connection (CONNACK failure) or a publish (MQTT 5 PUBACK failure, e.g. an ACL) is logged
as an ERROR naming the broker and what to check, and shows in ``state`` / ``last_error`` / ``rejected``.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import InputError, TelemetryError, missing_extra

log = logging.getLogger(__name__)

_TOPIC_FORBIDDEN = ("/", "+", "#", "\x00")
SESSION_EXPIRY_S = 7 * 24 * 3600  # how long the broker keeps an offline agent's session (queued commands, bundles)


def check_topic_part(value: str, what: str) -> str:
    """A device id or prefix must be one non-empty MQTT topic level without wildcards."""
    if not value or any(c in value for c in _TOPIC_FORBIDDEN):
        raise InputError(f"{what} {value!r} cannot be used in an MQTT topic",
                         hint=f"use a non-empty {what} without '/', '+' or '#'")
    return value


def topics(prefix: str, device: str) -> dict[str, str]:
    base = f"{prefix}/{device}"
    return {k: f"{base}/{k}" for k in ("status", "telemetry", "events", "cmd", "deploy")}


def group_deploy_topic(prefix: str, group: str) -> str:
    return f"{prefix}/group/{check_topic_part(group, 'group name')}/deploy"


@dataclass(frozen=True)
class TlsOptions:
    """TLS to the broker: the CA that signed its certificate, and optionally our client certificate + key."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def apply(self, client: Any) -> None:
        for what, path in (("CA", self.ca_file), ("client certificate", self.cert_file),
                           ("client key", self.key_file)):
            if path is not None and not Path(path).is_file():
                raise InputError(f"MQTT TLS {what} file {path} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise InputError("an MQTT client certificate needs its key and the other way round",
                             hint="pass both --mqtt-cert and --mqtt-key")
        try:
            client.tls_set(ca_certs=str(self.ca_file),
                           certfile=None if self.cert_file is None else str(self.cert_file),
                           keyfile=None if self.key_file is None else str(self.key_file),
                           cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise InputError(f"cannot use the MQTT TLS files (CA {self.ca_file}, certificate {self.cert_file}, "
                             f"key {self.key_file}): {e}",
                             hint="the CA must be PEM, the key must match the certificate and be unencrypted"
                             ) from e


@dataclass(frozen=True)
class MqttSettings:
    """How to talk to the broker beyond host:port (CLI: --mqtt-protocol, --mqtt-user,
    --mqtt-password-file, --mqtt-tls-ca, --mqtt-cert, --mqtt-key)."""

    protocol: int = 5  # 5 = MQTT 5, 4 = MQTT 3.1.1
    username: str | None = None
    password: str | None = None
    tls: TlsOptions | None = None

    def kwargs(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "username": self.username, "password": self.password, "tls": self.tls}

    def apply(self, client: Any) -> None:
        """Set the user name/password and TLS of these settings on a paho client."""
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls is not None:
            self.tls.apply(client)


# CONNACK reason codes that mean "the broker refuses us" (MQTT 5 reason codes / MQTT 3.1.1 return codes)
_REFUSAL_HINTS = {
    "Bad user name or password": "check --mqtt-user and --mqtt-password-file against the broker's password file",
    "Not authorized": "the broker does not accept this client: check --mqtt-user and --mqtt-password-file "
                      "(Mosquitto 2.0 answers a wrong password this way), the client certificate, and the "
                      "broker's allow_anonymous / ACL",
}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


class MqttPublisher:
    """A ``TelemetrySink`` publishing to one broker (see module docstring)."""

    def __init__(self, host: str, port: int, device_id: str, *, prefix: str = "edgekit",
                 birth: dict[str, Any], keepalive: int = 30, protocol: int = 5,
                 username: str | None = None, password: str | None = None, qos: int = 1,
                 max_queued: int = 1000, tls: TlsOptions | None = None, max_inflight: int = 20,
                 birth_extra: Callable[[], dict[str, Any]] | None = None,
                 on_ack: Callable[[int, bool], None] | None = None,
                 on_connected: Callable[[], None] | None = None,
                 subscriptions: dict[str, Callable[[str, bytes], None]] | None = None,
                 session_expiry_s: int = SESSION_EXPIRY_S) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as e:
            raise missing_extra("paho-mqtt", "all", "MQTT telemetry") from e
        check_topic_part(device_id, "device id")
        check_topic_part(prefix, "topic prefix")
        if protocol not in (4, 5):
            raise InputError(f"MQTT protocol {protocol} is not supported; use 5 (MQTT 5) or 4 (3.1.1)")
        self.host, self.port, self.device_id = host, port, device_id
        self.topics = topics(prefix, device_id)
        self._qos = qos
        self._birth = dict(birth)
        self._connected = threading.Event()
        self._closing = False
        self._failures = 0
        self._dropped = 0
        self._acked = threading.Condition()
        self._pending: set[int] = set()  # message ids published and not acknowledged yet
        self._early: set[int] = set()  # ids acknowledged before _publish recorded them
        self._mqtt = mqtt
        self._birth_extra = birth_extra
        self._on_ack = on_ack
        self._on_connected = on_connected
        self.protocol = protocol
        self.state = "connecting"  # connecting | connected | unreachable | refused | disconnected | closed
        self.last_error: str | None = None
        self.rejected = 0  # publishes the broker answered with a failure reason code (MQTT 5, e.g. ACL)
        self.connected_since: float | None = None  # time.time() of the current connection's CONNACK
        # topic filter -> handler(topic, payload), called in paho's network thread; renewed on every connect
        self._subscriptions = dict(subscriptions or {})
        self.subscribed = threading.Event()
        proto = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
        # With subscriptions (commands, bundle delivery) the session is persistent, so the broker keeps
        # QoS 1 messages sent while the device is offline, also across agent restarts.
        persistent = bool(self._subscriptions)
        if protocol == 5:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=proto)
        else:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=proto,
                                 clean_session=not persistent)
        client.will_set(self.topics["status"], _dumps(self._status("offline")), qos=1, retain=True)
        client.reconnect_delay_set(1, 60)
        client.max_queued_messages_set(max_queued)
        client.max_inflight_messages_set(max_inflight)
        if username is not None:
            client.username_pw_set(username, password)
        if tls is not None:
            tls.apply(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        self._client = client
        connect_kwargs: dict[str, Any] = {}
        if protocol == 5 and persistent:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry_s
            connect_kwargs = {"clean_start": False, "properties": props}
        try:
            client.connect_async(host, port, keepalive, **connect_kwargs)
        except ValueError as e:  # paho validates host/port/keepalive here
            raise InputError(f"bad MQTT broker address {host}:{port}: {e}") from e
        client.loop_start()

    # -------------------------------------------------------------------------------- properties

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def dropped(self) -> int:
        """Windows dropped because paho's in-memory queue was full while the broker was away."""
        return self._dropped

    def wait_connected(self, timeout: float) -> bool:
        """Block up to ``timeout`` s for a connection (for tools and tests; the agent never waits)."""
        return self._connected.wait(timeout)

    def update_birth(self, birth: dict[str, Any]) -> None:
        """New birth fields (a new model was activated); re-published at once when connected."""
        self._birth = dict(birth)
        if self._connected.is_set() and not self._closing:
            self._publish(self.topics["status"], _dumps(self._status("online")), retain=True)

    # -------------------------------------------------------------------------------- callbacks

    def _status(self, state: str) -> dict[str, Any]:
        if state == "online":
            extra = self._birth_extra() if self._birth_extra is not None else {}
            return {**self._birth, **extra, "state": "online", "device": self.device_id, "ts": time.time()}
        return {"state": "offline", "device": self.device_id}

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._failures += 1
            name = str(reason_code)
            hint = _REFUSAL_HINTS.get(name, "check the user name, password, certificate and ACLs")
            self.state, self.last_error = "refused", f"{name} (CONNACK {int(reason_code.value)})"
            level = logging.ERROR if self._failures <= 3 or self._failures % 20 == 0 else logging.DEBUG
            log.log(level, "MQTT broker %s:%s refused the connection of device %r: %s (attempt %d): %s; the "
                    "agent keeps running offline, spools telemetry and retries with back-off", self.host,
                    self.port, self.device_id, self.last_error, self._failures, hint)
            return
        if self._failures:
            log.info("MQTT connected to %s:%s after %d failed attempts", self.host, self.port, self._failures)
        else:
            log.info("MQTT connected to %s:%s", self.host, self.port)
        self._failures = 0
        self.state, self.last_error = "connected", None
        self.connected_since = time.time()
        self._connected.set()
        if self._subscriptions:
            self.subscribed.clear()
            client.subscribe([(t, 1) for t in self._subscriptions])
        if not self._closing:
            self._publish(self.topics["status"], _dumps(self._status("online")), retain=True)
            if self._on_connected is not None:
                self._on_connected()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        refused = [(t, str(rc)) for t, rc in zip(self._subscriptions, reason_codes, strict=False)
                   if rc.is_failure]
        for topic, rc in refused:
            log.error("MQTT broker %s:%s refused our subscription to %s (%s): commands or bundles sent there will "
                      "not reach this device; check the broker's ACL (edgekit deploy docs)", self.host, self.port,
                      topic, rc)
        self.subscribed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        for pattern, handler in self._subscriptions.items():
            if self._mqtt.topic_matches_sub(pattern, msg.topic):
                try:
                    handler(msg.topic, msg.payload)
                except Exception:  # one bad message must never stop the network thread
                    log.exception("handling a message on %s failed (skipped)", msg.topic)
                return
        log.debug("message on %s matches no subscription (skipped)", msg.topic)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        self.connected_since = None
        if self.state == "connected":
            self.state = "disconnected"
        elif not was and not self._closing and self.state != "refused":
            # closed before any CONNACK: typically a TLS broker that rejected our certificate (or none)
            self._failures += 1
            self.state = "unreachable"
            self.last_error = f"connection closed before it was accepted ({reason_code})"
            level = logging.WARNING if self._failures == 1 or self._failures % 20 == 0 else logging.DEBUG
            log.log(level, "cannot reach MQTT broker %s:%s: the connection was closed before it was accepted "
                    "(%s; attempt %d): with TLS check --mqtt-tls-ca, --mqtt-cert and --mqtt-key; the agent keeps "
                    "running offline and retries with back-off", self.host, self.port, reason_code, self._failures)
        if was and not self._closing:
            log.warning("MQTT connection to %s:%s lost (%s); telemetry is queued until it is back",
                        self.host, self.port, reason_code)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._failures += 1
        if self.state != "refused":
            self.state, self.last_error = "unreachable", f"cannot connect to {self.host}:{self.port}"
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "cannot reach MQTT broker %s:%s (attempt %d); the agent keeps running offline and "
                "retries with back-off up to 60 s", self.host, self.port, self._failures)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._acked:
            if mid in self._pending:
                self._pending.discard(mid)
                self._acked.notify_all()
            else:  # acknowledged before _publish recorded it
                self._early.add(mid)
        ok = not reason_code.is_failure
        if not ok:
            self.rejected += 1
            level = logging.ERROR if self.rejected <= 3 or self.rejected % 100 == 0 else logging.DEBUG
            log.log(level, "MQTT broker %s:%s refused message %d of device %r: %s (PUBACK %d; %d refused so far): "
                    "check the broker's ACL for the %s/ topics; spooled windows stay in the spool", self.host,
                    self.port, mid, self.device_id, reason_code, int(reason_code.value), self.rejected,
                    self.topics["telemetry"].rsplit("/", 1)[0])
        if self._on_ack is not None:
            self._on_ack(mid, ok)

    # -------------------------------------------------------------------------------- publishing

    def _publish(self, topic: str, payload: str, *, retain: bool = False) -> bool:
        """Queue one QoS 1 message; False when paho's queue is full. Safe from any thread.

        paho's MQTTMessageInfo keeps rc = NO_CONN for a message queued while offline even after it is
        delivered later, so acknowledgements are tracked here by message id (``on_publish``).
        """
        info = self._client.publish(topic, payload, qos=self._qos if not retain else 1, retain=retain)
        if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE:
            return False
        with self._acked:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)
        return True

    def publish_tracked(self, topic_key: str, payload: str | bytes) -> int | None:
        """Queue one QoS 1 message on ``<prefix>/<device>/<topic_key>``; its message id (acknowledgements go
        to ``on_ack(mid, ok)``), or None when paho's queue is full."""
        info = self._client.publish(self.topics[topic_key], payload, qos=1)
        if info.rc == self._mqtt.MQTT_ERR_QUEUE_SIZE:
            return None
        with self._acked:
            if info.mid in self._early:
                self._early.discard(info.mid)
            else:
                self._pending.add(info.mid)
        return int(info.mid)

    @property
    def unacknowledged(self) -> int:
        """Messages queued or in flight that the broker has not acknowledged yet."""
        with self._acked:
            return len(self._pending)

    def publish_window(self, window: dict[str, Any]) -> None:
        """Queue a window on ``<prefix>/<device>/telemetry``; never blocks on the network."""
        try:
            payload = _dumps(window)
        except (TypeError, ValueError) as e:
            raise TelemetryError(f"window seq {window.get('seq')} is not JSON-serialisable: {e}") from e
        if not self._publish(self.topics["telemetry"], payload):
            self._dropped += 1
            log.warning("MQTT queue full while the broker is away: dropped window seq %s", window.get("seq"))

    def publish_event(self, kind: str, **fields: Any) -> None:
        """Queue an event (QoS 1) on ``<prefix>/<device>/events``."""
        event = {"kind": kind, "device": self.device_id, "ts": time.time(), **fields}
        if not self._publish(self.topics["events"], _dumps(event)):
            log.warning("MQTT queue full: dropped event %s", kind)

    def close(self, timeout: float = 5.0) -> None:
        """Flush queued messages, publish the retained ``offline`` status, disconnect.

        Waits at most ``timeout`` seconds in total for the broker's acknowledgements. Messages still
        unacknowledged then are lost (and logged): durability is the spool's job.
        """
        deadline = time.monotonic() + timeout
        self._closing = True
        try:
            if self._connected.is_set():
                self._publish(self.topics["status"], _dumps(self._status("offline")), retain=True)
                with self._acked:
                    while self._pending and self._connected.is_set():
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._acked.wait(min(remaining, 0.1))
            lost = self.unacknowledged
            if lost:
                log.warning("MQTT broker %s:%s: %d message(s) not acknowledged at shutdown (not delivered)",
                            self.host, self.port, lost)
        finally:
            self._client.disconnect()
            self._client.loop_stop()
            self._connected.clear()
            self.state = "closed"
