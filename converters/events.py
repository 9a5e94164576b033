"""Wait for device events on the host (paho-mqtt 2.x, callback API version 2, MQTT 5 by default).

``EventWaiter`` connects to the broker, subscribes QoS 1 to one or more event topics (``<prefix>/<device>/
events``, wildcards allowed) and keeps every JSON object it receives, in order; ``wait(predicate, timeout)``
returns the first event, received before or during the call, for which ``predicate(topic, event)`` holds.
``publish`` sends a QoS 1 message over the same connection and waits for the broker's acknowledgement, so a
caller subscribes first, then publishes a request, then waits for its answer without a race.

The session is clean (nothing is queued for us while we are away): it is a tool for one request, not a
monitor. A broker that cannot be reached, refuses the connection, a subscription or a publish is a
``BrokerError`` naming the broker and what to check.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from edge_agent.errors import EdgekitError, InputError, missing_extra
from edge_agent.telemetry.mqtt import MqttSettings

log = logging.getLogger(__name__)

MAX_EVENT_BYTES = 64 * 1024
NO_MATCHING_SUBSCRIBERS = 0x10  # MQTT 5 PUBACK reason code: delivered to nobody (not a failure)
_HINT_REACH = ("check the broker address and port, that the broker runs, and for TLS the --mqtt-tls-ca / "
               "--mqtt-cert / --mqtt-key files")
_HINT_REFUSED = {
    "Bad user name or password": "check --mqtt-user and --mqtt-password-file against the broker's password file",
    "Not authorized": "the broker does not accept this client: check --mqtt-user and --mqtt-password-file "
                      "(Mosquitto 2.0 answers a wrong password this way), the client certificate, and the "
                      "broker's allow_anonymous / ACL",
}

Predicate = Callable[[str, dict[str, Any]], bool]


class BrokerError(EdgekitError):
    """The MQTT broker cannot be reached, or refused the connection, a subscription or a publish."""


@dataclass(frozen=True)
class Published:
    """The broker's acknowledgement of one QoS 1 publish."""

    topic: str
    mid: int
    reason: str
    no_subscribers: bool  # MQTT 5 brokers say so when nobody is subscribed (e.g. the device is offline)


class EventWaiter:
    """Subscribe to event topics and wait for the first event matching a predicate (see module doc).

    Use as a context manager (``start`` on enter, ``close`` on exit).
    """

    def __init__(self, host: str, port: int, topics: Sequence[str], *, settings: MqttSettings | None = None,
                 client_id: str | None = None, connect_timeout: float = 10.0, keepalive: int = 30,
                 max_events: int = 10000) -> None:
        try:
            import paho.mqtt.client as mqtt
        except ImportError as e:
            raise missing_extra("paho-mqtt", "all", "waiting for device events") from e
        if not topics:
            raise InputError("no event topic to subscribe to", hint="pass at least one topic")
        settings = settings or MqttSettings()
        if settings.protocol not in (4, 5):
            raise InputError(f"MQTT protocol {settings.protocol} is not supported; use 5 (MQTT 5) or 4 (3.1.1)")
        self.host, self.port = host, int(port)
        self.topics = list(topics)
        self.connect_timeout = connect_timeout
        self.max_events = max_events
        self.dropped = 0  # events dropped beyond max_events (oldest first)
        self.ignored = 0  # messages that were not a JSON object of at most MAX_EVENT_BYTES
        self._keepalive = keepalive
        self._mqtt = mqtt
        self._cond = threading.Condition()
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._acks: dict[int, Any] = {}
        self._subscribe_mid: int | None = None
        self._settled = threading.Event()  # subscribed, or a definite failure
        self._subscribed = False
        self._failure: tuple[str, str] | None = None  # (message, hint)
        self._closing = False
        self._started = False
        proto = mqtt.MQTTv5 if settings.protocol == 5 else mqtt.MQTTv311
        self.client_id = client_id or f"edgekit-host-{uuid.uuid4().hex[:12]}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto)
        client.connect_timeout = connect_timeout
        settings.apply(client)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client

    # -------------------------------------------------------------------------------- life cycle

    def start(self) -> EventWaiter:
        """Connect and subscribe; returns once every topic is subscribed, else a ``BrokerError``."""
        if self._started:
            return self
        self._started = True
        where = f"{self.host}:{self.port}"
        try:
            self._client.connect(self.host, self.port, self._keepalive)
        except ValueError as e:  # paho validates host and port
            raise InputError(f"bad MQTT broker address {where}: {e}", hint="e.g. broker.local:1883") from e
        except OSError as e:  # refused, unreachable, unknown host, timeout, TLS handshake
            raise BrokerError(f"cannot reach the MQTT broker {where}: {e.strerror or e}", hint=_HINT_REACH) from e
        self._client.loop_start()
        if not self._settled.wait(self.connect_timeout):
            self.close()
            raise BrokerError(f"the MQTT broker {where} did not accept the connection and subscriptions within "
                              f"{self.connect_timeout:g} s", hint=_HINT_REACH)
        if self._failure is not None:
            message, hint = self._failure
            self.close()
            raise BrokerError(message, hint=hint)
        return self

    def close(self) -> None:
        """Disconnect and stop paho's network thread (received events stay readable)."""
        self._closing = True
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> EventWaiter:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------------------------------- use

    def publish(self, topic: str, payload: bytes | str, *, timeout: float = 10.0) -> Published:
        """Publish QoS 1 (not retained) and wait for the broker's acknowledgement; ``BrokerError`` when it
        refuses the message or does not answer within ``timeout`` s."""
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (self._mqtt.MQTT_ERR_SUCCESS, self._mqtt.MQTT_ERR_NO_CONN):
            raise BrokerError(f"cannot publish on {topic}: {self._mqtt.error_string(info.rc)}",
                              hint="check the connection to the broker")
        deadline = time.monotonic() + timeout
        with self._cond:
            while info.mid not in self._acks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"the MQTT broker {self.host}:{self.port} did not acknowledge the message "
                                      f"on {topic} within {timeout:g} s", hint=_HINT_REACH)
                self._cond.wait(left)
            rc = self._acks.pop(info.mid)
        if rc.is_failure:
            raise BrokerError(f"the MQTT broker {self.host}:{self.port} refused the message on {topic}: {rc} "
                              f"(PUBACK {int(rc.value)})",
                              hint=f"check the broker's ACL: this user must be allowed to publish to {topic}")
        return Published(topic=topic, mid=int(info.mid), reason=str(rc),
                         no_subscribers=int(rc.value) == NO_MATCHING_SUBSCRIBERS)

    def wait(self, predicate: Predicate, timeout: float) -> tuple[str, dict[str, Any]] | None:
        """The first event (topic, event) received so far or within ``timeout`` s that ``predicate``
        accepts; None when none did."""
        deadline = time.monotonic() + max(0.0, timeout)
        position = 0  # events received so far that were checked (dropped ones count as checked)
        with self._cond:
            while True:
                i = max(position - self.dropped, 0)
                while i < len(self._events):
                    topic, event = self._events[i]
                    i += 1
                    if predicate(topic, event):
                        return topic, event
                position = self.dropped + i
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def events(self) -> list[tuple[str, dict[str, Any]]]:
        """Every event received so far (topic, event), oldest first."""
        with self._cond:
            return list(self._events)

    # -------------------------------------------------------------------------------- paho callbacks

    def _fail(self, message: str, hint: str) -> None:
        if self._failure is None:
            self._failure = (message, hint)
        self._settled.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            name = str(reason_code)
            self._fail(f"the MQTT broker {self.host}:{self.port} refused the connection: {name} "
                       f"(CONNACK {int(reason_code.value)})",
                       _HINT_REFUSED.get(name, "check the user name, password, client certificate and ACLs"))
            return
        result, mid = client.subscribe([(t, 1) for t in self.topics])
        if result != self._mqtt.MQTT_ERR_SUCCESS:
            self._fail(f"cannot subscribe to {', '.join(self.topics)}: {self._mqtt.error_string(result)}",
                       _HINT_REACH)
            return
        self._subscribe_mid = mid

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._subscribe_mid:
            return
        refused = [f"{t} ({rc})" for t, rc in zip(self.topics, reason_codes, strict=False) if rc.is_failure]
        if refused:
            self._fail(f"the MQTT broker {self.host}:{self.port} refused the subscription(s) {', '.join(refused)}",
                       "check the broker's ACL: this user must be allowed to read the devices' events topics")
            return
        self._subscribed = True
        self._settled.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if self._closing:
            return
        if not self._subscribed:
            # closed before it was accepted: typically a TLS broker that rejected our certificate
            self._fail(f"the MQTT broker {self.host}:{self.port} closed the connection before accepting it "
                       f"({reason_code})", _HINT_REACH)
        else:
            log.warning("lost the MQTT broker %s:%s (%s); reconnecting, events published meanwhile are missed",
                        self.host, self.port, reason_code)

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = reason_code
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        payload = msg.payload
        event: Any = None
        if len(payload) <= MAX_EVENT_BYTES:
            try:
                event = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                event = None
        if not isinstance(event, dict):
            self.ignored += 1
            log.warning("ignored a message on %s that is not a JSON event object (%d bytes)", msg.topic,
                        len(payload))
            return
        with self._cond:
            self._events.append((msg.topic, event))
            if len(self._events) > self.max_events:
                del self._events[0]
                self.dropped += 1
            self._cond.notify_all()
