"""send_command and EventWaiter against a real Mosquitto (tests/mosquitto.py) and a test "device"."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from converters.commands import send_command
from converters.events import BrokerError, EventWaiter
from edge_agent.commands import NonceStore, rejection_event, verify_command
from edge_agent.errors import CommandError, InputError, KeyFileError
from edge_agent.signing import load_public_key
from tests.fixtures_mqtt import broker  # noqa: F401
from tests.mosquitto import Mosquitto, free_port

pytestmark = pytest.mark.mqtt

DEVICE = "pi-017"


class FakeDevice:
    """Subscribes to its cmd topic, verifies each command and answers with a `command` event."""

    def __init__(self, b: Mosquitto, public_key: Any, state: Path, *, device: str = DEVICE,
                 answer: bool = True) -> None:
        import paho.mqtt.client as mqtt

        self.device, self.public_key, self.answer = device, public_key, answer
        self.nonces = NonceStore(state / "nonces.json")
        self.received: list[Any] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fake-{device}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"edgekit/{device}/cmd", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(b.host, b.port, 30)
        self.client.loop_start()
        assert self._subscribed.wait(10), "fake device could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        try:
            cmd = verify_command(msg.payload, self.public_key, self.device, nonces=self.nonces)
            self.received.append(cmd)
            fields = {"nonce": cmd.nonce, "action": cmd.action, "result": "done", "reason": None,
                      "detail": {"args": cmd.args}}
        except CommandError as e:
            self.received.append(e)
            fields = rejection_event(e)
        if self.answer:
            event = {"kind": "command", "device": self.device, "ts": time.time(), **fields}
            client.publish(f"edgekit/{self.device}/events", json.dumps(event), qos=1)

    def publish_event(self, event: dict[str, Any]) -> None:
        self.client.publish(f"edgekit/{self.device}/events", json.dumps(event), qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(broker: Mosquitto, keypair: tuple[Path, Path], tmp_path: Path) -> Any:  # noqa: F811
    d = FakeDevice(broker, load_public_key(keypair[1]), tmp_path / "state")
    try:
        yield d
    finally:
        d.close()


def test_send_command_returns_the_devices_answer(broker: Mosquitto, device: FakeDevice,  # noqa: F811
                                                 keypair: tuple[Path, Path]) -> None:
    event = send_command(broker.host, broker.port, DEVICE, "bench", {"duration": 2}, key_path=keypair[0],
                         wait_s=10)
    assert event["kind"] == "command" and event["result"] == "done" and event["action"] == "bench"
    assert event["detail"] == {"args": {"duration": 2.0}}
    [cmd] = device.received
    assert cmd.nonce == event["nonce"]
    # a second command is a new nonce, also answered
    second = send_command(broker.host, broker.port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=10)
    assert second["result"] == "done" and second["nonce"] != event["nonce"]


def test_answers_for_other_commands_are_not_taken(broker: Mosquitto, device: FakeDevice,  # noqa: F811
                                                  keypair: tuple[Path, Path]) -> None:
    device.publish_event({"kind": "command", "device": DEVICE, "ts": 0, "nonce": "0" * 32, "action": "reload",
                          "result": "done"})
    event = send_command(broker.host, broker.port, DEVICE, "rollback", {}, key_path=keypair[0], wait_s=10)
    assert event["action"] == "rollback" and event["nonce"] != "0" * 32


def test_a_device_that_pins_another_key_rejects(broker: Mosquitto, keypair: tuple[Path, Path],  # noqa: F811
                                                tmp_path: Path) -> None:
    from converters.keys import init_keys

    _, other_pub = init_keys(tmp_path / "other-keys")
    d = FakeDevice(broker, load_public_key(other_pub), tmp_path / "state")
    try:
        event = send_command(broker.host, broker.port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=10)
    finally:
        d.close()
    assert event["result"] == "rejected" and event["reason"] == "bad_signature"
    assert event["action"] == "reload"


def test_timeout_when_nobody_listens(broker: Mosquitto, keypair: tuple[Path, Path]) -> None:  # noqa: F811
    t0 = time.monotonic()
    result = send_command(broker.host, broker.port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=0.3)
    assert time.monotonic() - t0 < 5
    assert result["result"] == "timeout" and result["device"] == DEVICE and len(result["nonce"]) == 32
    assert result["no_subscribers"] is True  # MQTT 5: the broker said nobody is subscribed
    assert "nobody is subscribed" in result["message"]


def test_timeout_when_the_device_does_not_answer(broker: Mosquitto, keypair: tuple[Path, Path],  # noqa: F811
                                                 tmp_path: Path) -> None:
    d = FakeDevice(broker, load_public_key(keypair[1]), tmp_path / "state", answer=False)
    try:
        result = send_command(broker.host, broker.port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=0.5)
    finally:
        d.close()
    assert result["result"] == "timeout" and result["no_subscribers"] is False
    assert "stays valid" in result["message"]
    assert [c.nonce for c in d.received] == [result["nonce"]]  # it arrived, nobody answered


def test_unreachable_broker(keypair: tuple[Path, Path]) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(BrokerError, match=f"cannot reach the MQTT broker 127.0.0.1:{port}") as info:
        send_command("127.0.0.1", port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=1)
    assert "broker runs" in (info.value.hint or "")


def test_broker_refuses_the_connection(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    b = Mosquitto(tmp_path / "closed", anonymous=False).start()
    try:
        with pytest.raises(BrokerError, match="refused the connection: Not authorized") as info:
            send_command(b.host, b.port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=1)
    finally:
        b.stop()
    assert "--mqtt-user" in (info.value.hint or "")


def test_broker_refuses_the_publish(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    acl = tmp_path / "acl"
    acl.write_text("topic read edgekit/#\n")  # anonymous clients may read, not write
    b = Mosquitto(tmp_path / "acl-broker", extra_config=f"acl_file {acl}").start()
    try:
        with pytest.raises(BrokerError, match="refused the message on edgekit/pi-017/cmd") as info:
            send_command(b.host, b.port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=1)
    finally:
        b.stop()
    assert "ACL" in (info.value.hint or "")


def test_bad_input_is_refused_before_any_network(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    port = free_port()
    with pytest.raises(InputError, match="device id"):
        send_command("127.0.0.1", port, "a/b", "reload", {}, key_path=keypair[0])
    with pytest.raises(InputError, match="unknown action"):
        send_command("127.0.0.1", port, DEVICE, "format_disk", {}, key_path=keypair[0])
    with pytest.raises(InputError, match=r"0\.5\.\.600"):
        send_command("127.0.0.1", port, DEVICE, "bench", {"duration": 1000}, key_path=keypair[0])
    with pytest.raises(KeyFileError):
        send_command("127.0.0.1", port, DEVICE, "reload", {}, key_path=tmp_path / "missing.key")
    with pytest.raises(InputError, match="wait time"):
        send_command("127.0.0.1", port, DEVICE, "reload", {}, key_path=keypair[0], wait_s=-1)


def test_event_waiter_keeps_early_events_and_skips_garbage(broker: Mosquitto, device: FakeDevice) -> None:  # noqa: F811
    with EventWaiter(broker.host, broker.port, ["edgekit/+/events"]) as w:
        w.publish("edgekit/pi-017/events", b"not json")
        device.publish_event({"kind": "activated", "device": DEVICE, "n": 1})
        device.publish_event({"kind": "activated", "device": DEVICE, "n": 2})
        got = w.wait(lambda topic, ev: ev.get("n") == 2, timeout=5)
        assert got == ("edgekit/pi-017/events", {"kind": "activated", "device": DEVICE, "n": 2})
        # an event received before the call counts
        assert w.wait(lambda topic, ev: ev.get("n") == 1, timeout=0)[1]["n"] == 1
        assert w.wait(lambda topic, ev: ev.get("n") == 3, timeout=0.2) is None
        assert w.ignored == 1
        assert [e["n"] for _, e in w.events()] == [1, 2]


def test_event_waiter_drops_oldest_beyond_its_cap(broker: Mosquitto, device: FakeDevice) -> None:  # noqa: F811
    with EventWaiter(broker.host, broker.port, ["edgekit/pi-017/events"], max_events=3) as w:
        for n in range(5):
            device.publish_event({"kind": "x", "n": n})
        assert w.wait(lambda topic, ev: ev["n"] == 4, timeout=5) is not None
        assert [e["n"] for _, e in w.events()] == [2, 3, 4] and w.dropped == 2
        assert w.wait(lambda topic, ev: ev["n"] == 0, timeout=0) is None
