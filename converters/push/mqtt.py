"""Push over MQTT (``mqtt://broker[:port]/device/ID`` or ``/group/G``): QoS 1 chunks, then the result event.

The bundle is cut by ``edge_agent.transfer.split_bundle`` and published (QoS 1, not retained) on
``<prefix>/<ID>/deploy`` or ``<prefix>/group/<G>/deploy``, at most ``max_inflight`` unacknowledged at a
time; the push returns once the broker acknowledged every chunk (a PUBACK means the broker has it: the
devices' persistent sessions get it queued while they are offline). With ``wait_s`` the transport
subscribes, before publishing, to ``<prefix>/<ID>/events`` (a group: ``<prefix>/+/events``) and waits for
``activated`` / ``rolled_back`` / ``deploy_rejected`` events whose ``bundle_sha256`` is the bundle's; for a
group, one result per answering device until ``wait_s`` passed or ``expect`` devices answered.
Every network step has a timeout: connect, CONNACK, SUBACK, acknowledgements, result.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from converters.push import RESULT_STATES, Progress, PushResult, PushState, Target, check_bundle, check_wait
from edge_agent.errors import InputError, PushError
from edge_agent.telemetry.mqtt import _REFUSAL_HINTS, MqttSettings, check_topic_part
from edge_agent.transfer import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    chunk_count,
    chunk_length,
    file_sha256,
    split_bundle,
)

_EVENT_KINDS = ("activated", "rolled_back", "deploy_rejected")
_SEVERITY: dict[str, int] = {"activated": 0, "rolled_back": 1, "rejected": 2}  # a group's worst answer wins


class _Session:
    """One paho client for one push; callbacks record into fields guarded by one condition."""

    def __init__(self, owner: MqttTransport, bundle_sha256: str) -> None:
        self.mqtt = mqtt
        self.owner = owner
        self.sha = bundle_sha256
        self.cond = threading.Condition()
        self.connack: Any = None
        self.connected = False
        self.lost: str | None = None  # why the connection ended during the push
        self.pending: dict[int, int] = {}  # mid -> bundle bytes of that chunk, not yet acknowledged
        self.early: dict[int, Any] = {}  # mid -> reason code, acknowledged before publish() returned
        self.acked_bytes = 0
        self.refused: str | None = None  # a PUBACK failure
        self.suback: list[Any] | None = None
        self.answers: dict[str, dict[str, Any]] = {}  # device -> its result event
        s = owner.settings
        proto = mqtt.MQTTv5 if s.protocol == 5 else mqtt.MQTTv311
        # no automatic reconnect: a connection lost during a push is an error, and paho's reconnect
        # back-off would only delay it
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=owner.client_id, protocol=proto,
                             reconnect_on_failure=False)
        client.connect_timeout = owner.connect_timeout
        client.max_inflight_messages_set(owner.max_inflight)
        s.apply(client)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self.client = client

    # callbacks (paho's network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self.cond:
            self.connack = reason_code
            self.connected = not reason_code.is_failure
            self.cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self.cond:
            if self.connected or self.connack is None:
                self.lost = str(reason_code)
            self.connected = False
            self.cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self.cond:
            if mid in self.pending:
                self._acked(mid, reason_code)
            else:
                self.early[mid] = reason_code
            self.cond.notify_all()

    def _acked(self, mid: int, reason_code: Any) -> None:
        self.acked_bytes += self.pending.pop(mid)
        if reason_code.is_failure and self.refused is None:
            self.refused = f"{reason_code} (PUBACK {int(reason_code.value)})"

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self.cond:
            self.suback = list(reason_codes)
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            event = json.loads(msg.payload)
        except (ValueError, UnicodeDecodeError):
            return  # not an event of ours; other tools may share the topic
        if (not isinstance(event, dict) or event.get("bundle_sha256") != self.sha
                or event.get("kind") not in _EVENT_KINDS):
            return
        device = msg.topic.split("/")[-2]
        with self.cond:
            self.answers.setdefault(device, event)
            self.cond.notify_all()

    # steps (the caller's thread)
    def _wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def connect(self) -> None:
        o = self.owner
        where = f"MQTT broker {o.host}:{o.port}"
        try:
            self.client.connect(o.host, o.port, keepalive=30)
        except (OSError, ValueError) as e:
            raise PushError(f"cannot reach {where}: {e}",
                            hint="check the broker's host and port, that it runs, and with TLS the CA "
                            "(--mqtt-tls-ca) and client certificate") from e
        self.client.loop_start()
        if not self._wait(lambda: self.connack is not None or self.lost is not None, o.connect_timeout):
            raise PushError(f"{where} accepted the TCP connection but sent no CONNACK within "
                            f"{o.connect_timeout:g} s", hint="is it an MQTT broker (TLS port without TLS?)")
        if self.connack is None:
            raise PushError(f"{where} closed the connection before accepting it ({self.lost})",
                            hint="with TLS check the CA, client certificate and key")
        if self.connack.is_failure:
            name = str(self.connack)
            raise PushError(f"{where} refused the connection: {name} (CONNACK {int(self.connack.value)})",
                            hint=_REFUSAL_HINTS.get(name, "check the user name, password, certificate and ACLs"))

    def subscribe(self, topic: str) -> None:
        o = self.owner
        self.client.subscribe(topic, qos=1)
        if not self._wait(lambda: self.suback is not None or not self.connected, o.connect_timeout):
            raise PushError(f"MQTT broker {o.host}:{o.port} did not confirm the subscription to {topic} "
                            f"within {o.connect_timeout:g} s")
        self._check_connected("subscribing to the device's events")
        failed = [str(rc) for rc in self.suback or [] if rc.is_failure]
        if failed:
            raise PushError(f"MQTT broker {o.host}:{o.port} refused the subscription to {topic}: {failed[0]}",
                            hint="the broker's ACL must let this user read the events topics, or push "
                            "without waiting for the result")

    def _check_connected(self, doing: str, topic: str | None = None) -> None:
        o = self.owner
        if self.refused is not None and topic is not None:  # Mosquitto also closes the connection then
            raise PushError(f"MQTT broker {o.host}:{o.port} refused a chunk on {topic}: {self.refused}",
                            hint=f"the broker's ACL must let this user publish to {topic}")
        if not self.connected:
            raise PushError(f"lost the connection to MQTT broker {o.host}:{o.port} while {doing} "
                            f"({self.lost})", hint="push again: devices keep the chunks they have and the "
                            "transfer resumes; if it happens again, check the broker's log (an ACL that denies "
                            "the deploy topic makes Mosquitto close the connection)")

    def publish(self, topic: str, bundle: Path, size: int, progress: Progress | None) -> None:
        o = self.owner
        reported = -1
        last_ack, last_acked = time.monotonic(), 0

        def room() -> bool:
            return len(self.pending) < o.max_inflight or not self.connected or self.refused is not None

        def report() -> None:
            nonlocal reported, last_ack, last_acked
            with self.cond:
                acked = self.acked_bytes
                if self.refused is not None:
                    self._check_connected(doing="sending", topic=topic)
            if acked != last_acked:
                last_ack, last_acked = time.monotonic(), acked
            if progress is not None and acked != reported:
                progress(acked, size)
                reported = acked

        def wait_until(predicate: Callable[[], bool], doing: str) -> None:
            while not self._wait(predicate, 0.2):
                report()
                if time.monotonic() - last_ack > o.ack_timeout:
                    raise PushError(f"MQTT broker {o.host}:{o.port} acknowledged nothing for {o.ack_timeout:g} s "
                                    f"while {doing}", hint="check the broker and the network, then push again")
            report()
            self._check_connected(doing, topic)

        chunks = split_bundle(bundle, o.chunk_size, sha256=self.sha)
        for index, payload in enumerate(chunks):
            wait_until(room, f"sending chunk {index}")
            info = self.client.publish(topic, payload, qos=1)
            if info.rc == self.mqtt.MQTT_ERR_NO_CONN:
                with self.cond:
                    self.connected = False
                    self.lost = self.lost or "the connection is closed"
            if info.rc != self.mqtt.MQTT_ERR_SUCCESS:
                self._check_connected(f"sending chunk {index}", topic)
                raise PushError(f"cannot publish chunk {index} to {topic}: {self.mqtt.error_string(info.rc)}")
            with self.cond:
                self.pending[info.mid] = chunk_length(size, o.chunk_size, index)
                if info.mid in self.early:
                    self._acked(info.mid, self.early.pop(info.mid))
        wait_until(lambda: not self.pending or not self.connected or self.refused is not None,
                   "waiting for the last acknowledgements")

    def collect(self, wait_s: float, expect: int) -> dict[str, dict[str, Any]]:
        self._wait(lambda: len(self.answers) >= expect or not self.connected, wait_s)
        with self.cond:
            answers = dict(self.answers)
        if len(answers) < expect:
            self._check_connected("waiting for the devices' results")
        return answers

    def close(self) -> None:
        try:
            if self.connected:
                self.client.disconnect()  # sent by the network loop before it stops
        finally:
            self.client.loop_stop()
            sock = self.client.socket()  # still open when the broker never answered the CONNECT
            if sock is not None:
                sock.close()


class MqttTransport:
    """Publish a bundle's chunks to one device or a group and wait for their result events."""

    name = "mqtt"

    def __init__(self, target: Target, *, prefix: str = "edgekit", settings: MqttSettings | None = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_inflight: int = 20, expect: int | None = None,
                 connect_timeout: float = 10.0, ack_timeout: float = 30.0, client_id: str | None = None) -> None:
        if target.kind != "mqtt" or not target.host or (target.device is None) == (target.group is None):
            raise InputError(f"{target} is not an mqtt://broker/device/ID or mqtt://broker/group/G target")
        check_topic_part(prefix, "topic prefix")
        if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise InputError(f"MQTT chunk size {chunk_size!r} must be between 1 and {MAX_CHUNK_SIZE} bytes")
        if max_inflight < 1:
            raise InputError(f"max_inflight {max_inflight} must be at least 1")
        if expect is not None and (expect < 1 or target.device is not None):
            raise InputError(f"expect={expect}: give a number of devices (at least 1), for group targets only")
        self.target = target
        self.settings = settings or MqttSettings()
        if self.settings.protocol not in (4, 5):
            raise InputError(f"MQTT protocol {self.settings.protocol} is not supported; use 5 or 4 (3.1.1)")
        self.host = target.host
        self.port = target.port or (8883 if self.settings.tls is not None else 1883)
        self.prefix = prefix
        self.chunk_size = chunk_size
        self.max_inflight = max_inflight
        self.expect = expect
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.client_id = client_id or f"edgekit-push-{secrets.token_hex(6)}"

    @property
    def deploy_topic(self) -> str:
        if self.target.device is not None:
            return f"{self.prefix}/{self.target.device}/deploy"
        return f"{self.prefix}/group/{self.target.group}/deploy"

    @property
    def events_topic(self) -> str:
        return f"{self.prefix}/{self.target.device or '+'}/events"

    def push(self, bundle: Path, *, progress: Progress | None = None,
             wait_s: float | None = None) -> PushResult:
        """Publish every chunk and wait for the broker's acknowledgements; with ``wait_s``, the result events."""
        bundle = Path(bundle)
        size = check_bundle(bundle)
        wait = check_wait(wait_s)
        start = time.monotonic()
        sha = file_sha256(bundle)
        session = _Session(self, sha)
        try:
            session.connect()
            if wait is not None:
                session.subscribe(self.events_topic)
            session.publish(self.deploy_topic, bundle, size, progress)
            pushed = time.monotonic()
            answers = {}
            if wait is not None:
                expect = 1 if self.target.device is not None else (self.expect or 1_000_000)
                answers = session.collect(wait, expect)
        finally:
            session.close()
        base: dict[str, Any] = {"target": str(self.target), "transport": self.name, "bytes": size,
                                "seconds": time.monotonic() - start}
        count = chunk_count(size, self.chunk_size)
        sent = (f"{count} chunks ({size} bytes) acknowledged by {self.host}:{self.port} on {self.deploy_topic} "
                f"in {pushed - start:.1f} s")
        if wait is None:
            return PushResult(**base, state="pushed", detail={"bundle_sha256": sha, "chunks": count},
                              message=sent)
        if self.target.device is not None:
            if not answers:
                return PushResult(**base, state="timeout", detail={"bundle_sha256": sha},
                                  message=f"{sent}; no result from {self.target.device} within {wait:g} s")
            event = next(iter(answers.values()))
            state = RESULT_STATES[event["kind"]]
            why = event.get("message") or event.get("reason")
            return PushResult(**base, state=state, detail=event,
                              message=f"{state} on {self.target.device}" + (f": {why}" if why else ""))
        return self._group_result(base, sha, sent, answers, wait)

    def _group_result(self, base: dict[str, Any], sha: str, sent: str, answers: dict[str, dict[str, Any]],
                      wait: float) -> PushResult:
        detail = {"bundle_sha256": sha, "group": self.target.group, "expected": self.expect, "devices": answers}
        states = {device: RESULT_STATES[e["kind"]] for device, e in answers.items()}
        tally = ", ".join(f"{n} {s}" for s in _SEVERITY if (n := sum(v == s for v in states.values())))
        if not answers or (self.expect is not None and len(answers) < self.expect):
            of = f" of {self.expect}" if self.expect is not None else ""
            return PushResult(**base, state="timeout", detail=detail,
                              message=f"{sent}; {len(answers)}{of} devices answered within {wait:g} s"
                              + (f" ({tally})" if tally else ""))
        state: PushState = max(states.values(), key=lambda s: _SEVERITY[s])
        return PushResult(**base, state=state, detail=detail,
                          message=f"group {self.target.group}: {len(answers)} devices answered ({tally})")
