"""Bundles and commands over a real Mosquitto: a device that is offline during the push activates the bundle
when it comes back; one group push reaches two agents; signed commands are obeyed and bad ones refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.deploy_helpers import ROOT, AgentProc, golden_bundle, wait_for
from tests.fixtures_mqtt import broker  # noqa: F401
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.mqtt
EDGEKIT = [sys.executable, "-m", "converters.cli"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("mqtt-bundles")
    private, _ = keypair
    return {"v1": golden_bundle(d / "mlp-1.0.0.edgebundle", private, version="1.0.0", seed=1),
            "v2": golden_bundle(d / "mlp-2.0.0.edgebundle", private, version="2.0.0", seed=2)}


def agent(b: Mosquitto, state: Path, device: str, pub: Path, *extra: str) -> AgentProc:
    return AgentProc("--state-dir", str(state), "--mqtt", b.address, "--device-id", device, "--pubkey", str(pub),
                     "--window", "0.3", "--health-inferences", "10", *extra)


def edgekit(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGEKIT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def push(b: Mosquitto, bundle: Path, target: str, *extra: str) -> dict[str, Any]:
    out = edgekit("push", str(bundle), "--to", f"mqtt://{b.address}/{target}", "--json", *extra)
    assert out.returncode in (0, 1), out.stderr
    results = json.loads(out.stdout)
    assert len(results) == 1
    return results[0]


def subscribed(proc: AgentProc) -> None:
    wait_for(lambda: "MQTT connected" in proc.log, 30, "the agent's MQTT connection")
    time.sleep(0.3)  # the SUBSCRIBE follows the CONNACK


def test_offline_device_gets_the_bundle_when_it_reconnects(
        broker: Mosquitto, tmp_path: Path,  # noqa: F811
        bundles: dict[str, Path], keypair: tuple[Path, Path]) -> None:
    _, pub = keypair
    state = tmp_path / "state"
    first = agent(broker, state, "pi-offline", pub)
    subscribed(first)  # the broker now holds the device's persistent session and its subscriptions
    assert first.stop() == 0
    res = push(broker, bundles["v1"], "device/pi-offline", "--wait", "0")
    assert res["state"] == "pushed", res
    back = agent(broker, state, "pi-offline", pub)
    try:
        back.wait_version("1.0.0")
    finally:
        assert back.stop() == 0, back.log[-3000:]
    assert "activated" in back.log
    assert list((state / "incoming").glob("*.part")) == []


def test_group_push_reaches_two_agents_and_waits_for_both(
        broker: Mosquitto, tmp_path: Path,  # noqa: F811
        bundles: dict[str, Path], keypair: tuple[Path, Path]) -> None:
    _, pub = keypair
    agents = [agent(broker, tmp_path / name, name, pub, "--group", "lab") for name in ("pi-a", "pi-b")]
    try:
        for a in agents:
            subscribed(a)
        res = push(broker, bundles["v1"], "group/lab", "--expect", "2", "--wait", "60")
        assert res["state"] == "activated", res
        assert sorted(res["detail"]["devices"]) == ["pi-a", "pi-b"]
        assert {e["kind"] for e in res["detail"]["devices"].values()} == {"activated"}
        for a in agents:
            a.wait_version("1.0.0")
    finally:
        for a in agents:
            assert a.stop() == 0, a.log[-3000:]


def cmd(b: Mosquitto, private: Path, device: str, *args: str) -> dict[str, Any]:
    out = edgekit("cmd", device, *args, "--broker", b.address, "--key", str(private), "--json", "--wait", "60")
    assert out.returncode in (0, 1), out.stderr
    return json.loads(out.stdout)


def test_signed_commands_are_obeyed_and_bad_ones_refused(
        broker: Mosquitto, tmp_path: Path,  # noqa: F811
        bundles: dict[str, Path], keypair: tuple[Path, Path]) -> None:
    from converters.events import EventWaiter
    from converters.keys import init_keys
    from edge_agent.commands import build_command
    from edge_agent.signing import load_private_key

    private, pub = keypair
    dev = "pi-cmd"
    a = agent(broker, tmp_path / "state", dev, pub)
    try:
        subscribed(a)
        for b in ("v1", "v2"):
            assert push(broker, bundles[b], f"device/{dev}", "--wait", "60")["state"] == "activated"
        a.wait_version("2.0.0")

        ans = cmd(broker, private, dev, "rollback")
        assert ans["result"] == "done", ans
        assert ans["detail"]["model"]["version"] == "1.0.0"
        n = len(a.windows)
        wait_for(lambda: len(a.windows) > n + 1, 30, "windows after the rollback")
        assert a.windows[-1]["model"]["version"] == "1.0.0"

        ans = cmd(broker, private, dev, "activate", "2.0.0")
        assert ans["result"] == "done" and ans["detail"]["model"]["version"] == "2.0.0", ans
        ans = cmd(broker, private, dev, "activate", "7.7.7")
        assert (ans["result"], ans["reason"]) == ("failed", "unknown_version"), ans

        ans = cmd(broker, private, dev, "set", "telemetry_interval=1.5")
        assert ans["result"] == "done" and ans["detail"]["telemetry_interval"] == 1.5, ans
        n = len(a.windows)
        wait_for(lambda: len(a.windows) > n + 2, 30, "windows after set")
        w = a.windows[-1]
        assert w["ts_end"] - w["ts_start"] == pytest.approx(1.5, abs=0.5)

        ans = cmd(broker, private, dev, "bench", "1")
        assert ans["result"] == "done" and ans["detail"]["count"] > 0, ans
        assert ans["detail"]["latency_ms"]["p50"] > 0
        ans = cmd(broker, private, dev, "reload")
        assert ans["result"] == "done" and ans["detail"]["model"]["version"] == "2.0.0", ans

        # refused, never executed: another key, expired, replayed, unsigned
        other, _ = init_keys(tmp_path / "other")
        with EventWaiter(broker.host, broker.port, [f"edgekit/{dev}/events"]) as w:
            topic = f"edgekit/{dev}/cmd"

            def refused(payload: bytes, nonce: str) -> dict[str, Any]:
                w.publish(topic, payload)
                got = w.wait(lambda _t, e: e.get("kind") == "command" and e.get("nonce") == nonce
                             and e.get("result") == "rejected", 30)
                assert got is not None, f"no answer to {nonce}"
                return got[1]

            foreign = build_command(load_private_key(other), dev, "rollback", {}, nonce="a" * 32)
            assert refused(foreign, "a" * 32)["reason"] == "bad_signature"
            old = build_command(load_private_key(private), dev, "rollback", {}, nonce="b" * 32,
                                now=time.time() - 3600, ttl_s=60)
            assert refused(old, "b" * 32)["reason"] == "expired"
            ok = build_command(load_private_key(private), dev, "set", {"telemetry_interval": 2}, nonce="c" * 32)
            w.publish(topic, ok)
            first = w.wait(lambda _t, e: e.get("kind") == "command" and e.get("nonce") == "c" * 32, 30)
            assert first is not None and first[1]["result"] == "done"
            assert refused(ok, "c" * 32)["reason"] == "replayed"
            unsigned = json.dumps({"command": json.loads(ok)["command"].replace("c" * 32, "d" * 32)}).encode()
            assert refused(unsigned, "d" * 32)["reason"] == "unsigned"
        assert a.windows[-1]["model"]["version"] == "2.0.0"  # nothing refused was executed
    finally:
        assert a.stop() == 0, a.log[-3000:]
