"""A private Mosquitto broker for tests, and a subscriber that collects what it receives.

``Mosquitto`` picks a free port on 127.0.0.1, writes its own config file (so a test may kill it and
restart it on the same port, or add options), starts ``mosquitto -c CONF`` as a child process and waits
until the port accepts connections. It only ever stops the process it started itself. Tests are skipped
with a reason when mosquitto is not installed.
"""

from __future__ import annotations

import json
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Mosquitto:
    """One broker process owned by a test."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int | None = None, *, persistence: bool = False,
                 anonymous: bool = True, extra_config: str = "") -> None:
        if not Path(MOSQUITTO).is_file():
            pytest.skip(f"mosquitto is not installed ({MOSQUITTO} not found; apt-get install mosquitto)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.workdir / "mosquitto.conf"
        self.log = self.workdir / "mosquitto.log"
        self.persistence = persistence
        self.anonymous = anonymous
        self.extra_config = extra_config
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"allow_anonymous {str(self.anonymous).lower()}\n"
            f"persistence {str(self.persistence).lower()}\n"
            f"persistence_location {self.workdir}/\n"
            "max_queued_messages 0\n"  # the default (1000) silently drops QoS 1 for slow subscribers
            f"log_dest file {self.log}\n"
            "log_type all\n"
            f"{self.extra_config}\n"
        )
        if os.geteuid() == 0:  # as root mosquitto drops to user "mosquitto", who cannot write our tmp dir
            with open(self.conf, "a") as f:
                f.write(f"user {pwd.getpwuid(os.getuid()).pw_name}\n")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Mosquitto:
        if self.running:
            raise RuntimeError("this broker is already running")
        self._write_config()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log.read_text(errors="replace") if self.log.exists() else ""
                self.proc = None
                raise RuntimeError(f"mosquitto exited at start on port {self.port}: {err}\n{log}")
            if port_accepts(self.host, self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not accept connections on port {self.port} within {timeout} s")

    def _end(self, sig: int, timeout: float) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (clean shutdown), then SIGKILL if it does not exit."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without closing anything."""
        self._end(signal.SIGKILL, 5.0)

    def restart(self) -> Mosquitto:
        """Stop (SIGTERM) and start again on the same port; with ``persistence`` sessions and retained
        messages survive, without it they are gone."""
        self.stop()
        return self.start()


class Collector:
    """A paho 2.x subscriber that queues every message it receives as (topic, payload, retain)."""

    def __init__(self, host: str, port: int, topic: str, client_id: str = "test-collector", *,
                 persistent: bool = False) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_disconnect = lambda c, u, f, rc, p: self._subscribed.clear()
        # Back on a restarted broker quickly (the agent's own back-off starts at 1 s), so the test
        # subscriber is subscribed again before windows flow: a broker that had not yet saved this
        # session when it was SIGKILLed would otherwise acknowledge and drop them.
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=1)
        self.qos_seen: dict[str, set[int]] = {}  # topic -> QoS levels of the deliveries
        self.client.on_message = self._on_message
        props = None
        if persistent:  # the broker keeps the subscription and queues QoS 1 messages while we are away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect(host, port, 30, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise RuntimeError(f"could not subscribe to {topic} on {host}:{port}")

    def wait_subscribed(self, timeout: float = 30.0) -> bool:
        """True once subscribed (again, after a broker restart) within ``timeout`` seconds."""
        return self._subscribed.wait(timeout)

    def _on_message(self, client: Any, userdata: Any, m: Any) -> None:
        self.qos_seen.setdefault(m.topic, set()).add(m.qos)
        self.messages.put((m.topic, m.payload, bool(m.retain)))

    def get(self, timeout: float = 10.0) -> tuple[str, bytes, bool]:
        return self.messages.get(timeout=timeout)

    def wait_for(self, predicate: Any, timeout: float = 15.0) -> tuple[str, Any, bool]:
        """The first message (topic, decoded JSON, retain) for which predicate(topic, payload) holds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no matching MQTT message arrived")
            try:
                topic, raw, retain = self.messages.get(timeout=remaining)
            except queue.Empty:
                raise TimeoutError("no matching MQTT message arrived") from None
            payload = json.loads(raw) if raw else None
            if predicate(topic, payload):
                return topic, payload, retain

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def retained(host: str, port: int, topic: str, timeout: float = 5.0) -> Any:
    """The retained message of ``topic`` now (decoded JSON), or None when there is none."""
    import paho.mqtt.client as mqtt

    got: queue.Queue[bytes] = queue.Queue()
    subscribed = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"retained-probe-{os.getpid()}",
                         protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.on_message = lambda c, u, m: got.put(m.payload) if m.retain else None
    client.connect(host, port, 30)
    client.loop_start()
    try:
        if not subscribed.wait(timeout):
            raise RuntimeError(f"could not subscribe to {topic}")
        try:
            # a retained message is sent right after SUBACK; a short wait tells "none" apart
            return json.loads(got.get(timeout=1.0))
        except queue.Empty:
            return None
    finally:
        client.disconnect()
        client.loop_stop()
