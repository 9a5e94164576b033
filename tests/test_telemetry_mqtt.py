"""MqttPublisher against a real Mosquitto: birth/LWT, QoS 1 windows, queueing across a broker restart."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from edge_agent.errors import InputError
from edge_agent.telemetry.mqtt import MqttPublisher, check_topic_part, topics
from tests.fixtures_mqtt import broker  # noqa: F401
from tests.mosquitto import Collector, Mosquitto, free_port, retained

pytestmark = pytest.mark.mqtt
BIRTH = {"agent_version": "0.1.0", "model": {"name": "m", "version": "1.0.0", "sha256": "0" * 64},
         "profile": "x86-64", "engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "degraded": False}


def _until(cond, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)


def test_topics_and_topic_parts() -> None:
    assert topics("edgekit", "pi-1") == {"status": "edgekit/pi-1/status", "telemetry": "edgekit/pi-1/telemetry",
                                         "events": "edgekit/pi-1/events", "cmd": "edgekit/pi-1/cmd",
                                             "deploy": "edgekit/pi-1/deploy"}
    for bad in ("", "a/b", "x+", "#"):
        with pytest.raises(InputError):
            check_topic_part(bad, "device id")


def test_birth_window_event_and_clean_close(broker: Mosquitto) -> None:  # noqa: F811
    sub = Collector(broker.host, broker.port, "edgekit/pi-1/#")
    pub = MqttPublisher(broker.host, broker.port, "pi-1", birth=BIRTH)
    try:
        assert pub.wait_connected(10) and pub.connected
        _topic, birth, _ = sub.wait_for(lambda t, m: t.endswith("/status"))
        assert birth["state"] == "online" and birth["device"] == "pi-1" and birth["model"] == BIRTH["model"]
        pub.publish_window({"seq": 0, "x": 1})
        pub.publish_event("deployed", bundle="m-1.0.0")
        assert sub.wait_for(lambda t, m: t.endswith("/telemetry"))[1] == {"seq": 0, "x": 1}
        _, event, _ = sub.wait_for(lambda t, m: t.endswith("/events"))
        assert event["kind"] == "deployed" and event["bundle"] == "m-1.0.0" and event["device"] == "pi-1"
    finally:
        pub.close(timeout=5)
    assert not pub.connected and pub.unacknowledged == 0
    assert sub.wait_for(lambda t, m: t.endswith("/status"))[1] == {"state": "offline", "device": "pi-1"}
    sub.close()
    assert retained(broker.host, broker.port, "edgekit/pi-1/status") == {"state": "offline", "device": "pi-1"}


def test_custom_prefix(broker: Mosquitto) -> None:  # noqa: F811
    sub = Collector(broker.host, broker.port, "plant7/#")
    pub = MqttPublisher(broker.host, broker.port, "cam-3", prefix="plant7", birth=BIRTH)
    try:
        pub.publish_window({"seq": 5})
        assert sub.wait_for(lambda t, m: t == "plant7/cam-3/telemetry")[1] == {"seq": 5}
    finally:
        pub.close()
        sub.close()


def test_windows_queued_across_a_broker_restart_are_delivered(tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "broker", persistence=True).start()
    try:
        sub = Collector(b.host, b.port, "edgekit/pi-2/telemetry", client_id="monitor", persistent=True)
        pub = MqttPublisher(b.host, b.port, "pi-2", birth=BIRTH)
        try:
            assert pub.wait_connected(10)
            pub.publish_window({"seq": 0})
            assert sub.wait_for(lambda t, m: True)[1] == {"seq": 0}
            b.stop()
            _until(lambda: not pub.connected)
            pub.publish_window({"seq": 1})  # the broker is away: paho queues them (QoS 1)
            pub.publish_window({"seq": 2})
            assert pub.unacknowledged == 2
            b.start()  # same port; the monitor's session (and subscription) was persisted
            got = [sub.wait_for(lambda t, m: True)[1]["seq"] for _ in range(2)]
            assert got == [1, 2]
            _until(lambda: pub.unacknowledged == 0)
            assert pub.dropped == 0
        finally:
            pub.close()
            sub.close()
    finally:
        b.stop()


def test_queue_bound_counts_dropped_windows(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    pub = MqttPublisher("127.0.0.1", port, "pi-3", birth=BIRTH, max_queued=2)
    try:
        with caplog.at_level(logging.WARNING, logger="edge_agent.telemetry.mqtt"):
            for seq in range(5):
                pub.publish_window({"seq": seq})  # never blocks, never raises
        assert pub.dropped == 3 and pub.unacknowledged == 2
        assert "dropped window seq 4" in caplog.text
        assert not pub.connected
    finally:
        with caplog.at_level(logging.WARNING, logger="edge_agent.telemetry.mqtt"):
            pub.close(timeout=1)
    assert "2 message(s) not acknowledged" in caplog.text


def test_unreachable_broker_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="edge_agent.telemetry.mqtt"):
        pub = MqttPublisher("127.0.0.1", port, "pi-4", birth=BIRTH)
        _until(lambda: "cannot reach MQTT broker" in caplog.text)
        pub.close(timeout=1)
    assert f"127.0.0.1:{port}" in caplog.text


def test_refused_credentials_are_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    b = Mosquitto(tmp_path / "broker", anonymous=False).start()  # no password file: everyone is refused
    try:
        with caplog.at_level(logging.ERROR, logger="edge_agent.telemetry.mqtt"):
            pub = MqttPublisher(b.host, b.port, "pi-5", birth=BIRTH, username="u", password="p")
            _until(lambda: "refused the connection" in caplog.text)
            assert not pub.connected
            pub.close(timeout=1)
        assert "Not authorized" in caplog.text or "Bad user name or password" in caplog.text
    finally:
        b.stop()
