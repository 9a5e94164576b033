"""MQTT delivery of telemetry (paho-mqtt 2.x, callback API version 2).

Topics under ``<prefix>/<device>/``: ``status`` (retained, QoS 1: the birth ``online`` on every connect,
the Last Will ``offline`` when the connection is lost, and ``offline`` again on a clean shutdown),
``telemetry`` (QoS 1 windows) and ``events`` (QoS 1). See docs/telemetry.md.

The publisher never blocks or raises into the inference loop: it connects in paho's network thread
(``connect_async`` + ``loop_start``), reconnects with exponential back-off (1 s to 60 s), and paho queues
QoS 1 messages while the broker is away, in memory and bounded (``max_queued`` windows; beyond it a window
is dropped and counted in ``dropped``). MQTT is delivery, not storage: a durable spool slots in front of
it later through the same ``TelemetrySink`` protocol.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from edge_agent.errors import InputError, TelemetryError, missing_extra

log = logging.getLogger(__name__)

_TOPIC_FORBIDDEN = ("/", "+", "#", "\x00")


def check_topic_part(value: str, what: str) -> str:
    """A device id or prefix must be one non-empty MQTT topic level without wildcards."""
    if not value or any(c in value for c in _TOPIC_FORBIDDEN):
        raise InputError(f"{what} {value!r} cannot be used in an MQTT topic",
                         hint=f"use a non-empty {what} without '/', '+' or '#'")
    return value


def topics(prefix: str, device: str) -> dict[str, str]:
    base = f"{prefix}/{device}"
    return {k: f"{base}/{k}" for k in ("status", "telemetry", "events", "cmd")}


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


class MqttPublisher:
    """A ``TelemetrySink`` publishing to one broker (see module docstring)."""

    def __init__(self, host: str, port: int, device_id: str, *, prefix: str = "edgekit",
                 birth: dict[str, Any], keepalive: int = 30, protocol: int = 5,
                 username: str | None = None, password: str | None = None, qos: int = 1,
                 max_queued: int = 1000) -> None:
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
        proto = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=proto)
        client.will_set(self.topics["status"], _dumps(self._status("offline")), qos=1, retain=True)
        client.reconnect_delay_set(1, 60)
        client.max_queued_messages_set(max_queued)
        if username is not None:
            client.username_pw_set(username, password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        self._client = client
        try:
            client.connect_async(host, port, keepalive)
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

    # -------------------------------------------------------------------------------- callbacks

    def _status(self, state: str) -> dict[str, Any]:
        if state == "online":
            return {**self._birth, "state": "online", "device": self.device_id, "ts": time.time()}
        return {"state": "offline", "device": self.device_id}

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._failures += 1
            log.error("MQTT broker %s:%s refused the connection: %s (check the user name, password and "
                      "ACLs of device %r); retrying with back-off", self.host, self.port, reason_code,
                      self.device_id)
            return
        if self._failures:
            log.info("MQTT connected to %s:%s after %d failed attempts", self.host, self.port, self._failures)
        else:
            log.info("MQTT connected to %s:%s", self.host, self.port)
        self._failures = 0
        self._connected.set()
        if not self._closing:
            self._publish(self.topics["status"], _dumps(self._status("online")), retain=True)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and not self._closing:
            log.warning("MQTT connection to %s:%s lost (%s); telemetry is queued until it is back",
                        self.host, self.port, reason_code)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._failures += 1
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
        if reason_code.is_failure:
            log.warning("MQTT broker %s:%s did not accept message %d: %s", self.host, self.port, mid,
                        reason_code)

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
