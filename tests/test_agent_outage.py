"""The durable spool end to end: real agent processes, a real Mosquitto that dies and comes back.

The monitor is a persistent-session subscriber (as ``edgekit monitor`` is) and the broker keeps its
sessions on disk (``autosave_interval 1``), so a window the broker accepted while the monitor was away
reaches it after the broker restarts; the agent's job is that the broker gets every window.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.telemetry.schema import validate_window
from tests.mosquitto import Collector, Mosquitto, free_port
from tests.test_agent_cli import AGENT, NO_POWER, ROOT, json_lines, make_bundle

pytestmark = pytest.mark.mqtt
PERSIST = "autosave_interval 1\n"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("outage-bundles")
    return make_bundle(d / "mlp.edgebundle", keypair[0]), keypair[1]


def start_agent(bundle: tuple[Path, Path], broker: str, device: str, state: Path, *extra: str,
                window: float = 0.2) -> subprocess.Popen[str]:
    return subprocess.Popen([*AGENT, "run", "--bundle", str(bundle[0]), "--pubkey", str(bundle[1]),
                             "--mqtt", broker, "--device-id", device, "--window", str(window),
                             "--state-dir", str(state), "--json",
                             *NO_POWER, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def telemetry(sub: Collector, timeout: float = 20.0) -> dict[str, Any]:
    return sub.wait_for(lambda t, m: t.endswith("/telemetry"), timeout=timeout)[1]


def spool_seqs(state: Path) -> list[int]:
    db = sqlite3.connect(f"file:{state / 'spool.db'}?mode=ro", uri=True)
    try:
        return [s for (s,) in db.execute("SELECT seq FROM spool ORDER BY seq")]
    finally:
        db.close()


def stop_agent(p: subprocess.Popen[str]) -> tuple[str, str]:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return out, err


def collect_until(sub: Collector, last_seq: int, got: list[dict[str, Any]]) -> list[dict[str, Any]]:
    while not got or max(w["seq"] for w in got) < last_seq:
        got.append(telemetry(sub))
    return got


def test_broker_killed_and_restarted_every_window_once_in_order(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    b = Mosquitto(tmp_path / "broker", persistence=True, extra_config=PERSIST).start()
    sub = Collector(b.host, b.port, "edgekit/out-1/telemetry", client_id="monitor-1", persistent=True)
    p = start_agent(bundle, b.address, "out-1", tmp_path / "state")
    try:
        got = [telemetry(sub) for _ in range(3)]
        time.sleep(1.2)  # the broker saves the monitor's session (autosave_interval 1)
        killed = time.time()
        b.kill()
        time.sleep(1.5)  # ~7 windows while the broker is gone: they wait in the spool
        restarted = time.time()
        b.start()
        while max(w["seq"] for w in got) < 15:
            got.append(telemetry(sub))
        out, err = stop_agent(p)
    finally:
        if p.poll() is None:
            p.kill()
    printed = json_lines(out)
    got = collect_until(sub, printed[-1]["seq"], got)
    sub.close()
    b.stop()
    seqs = [w["seq"] for w in got]
    first = list(dict.fromkeys(seqs))
    assert first == list(range(printed[-1]["seq"] + 1)), seqs  # every window, in order of first arrival
    # QoS 1 is at-least-once: a window the broker had forwarded when it was SIGKILLed can come again (the
    # agent's resend after a lost PUBACK, or the broker's restored session); the monitor keeps one per seq.
    # The agent itself never publishes a spooled window twice, so only windows of the kill moment repeat.
    repeated = [w for i, w in enumerate(got) if w["seq"] in seqs[:i]]
    assert len(repeated) <= 2 and all(abs(w["ts_end"] - killed) < 1.5 for w in repeated), seqs
    got = [w for i, w in enumerate(got) if w["seq"] not in seqs[:i]]
    assert all(validate_window(w) == [] for w in got)
    outage = [w for w in got if killed + 0.3 < w["ts_end"] < restarted]
    assert len(outage) >= 4 and all(w["historical"] for w in outage)
    assert not any(w["historical"] for w in got if w["ts_end"] < killed - 0.1)
    assert not any(w["historical"] for w in got if w["ts_end"] > restarted + 5)  # live again
    assert max(w["spool_depth"] for w in printed) >= 4  # the spool depth is reported in the windows
    assert "connection to" in err and "lost" in err
    assert spool_seqs(tmp_path / "state") == []  # everything acknowledged, nothing left


def test_agent_sigkilled_during_outage_delivers_spooled_windows_after_restart(
        bundle: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    b = Mosquitto(tmp_path / "broker", persistence=True, extra_config=PERSIST).start()
    sub = Collector(b.host, b.port, "edgekit/out-2/telemetry", client_id="monitor-2", persistent=True)
    p = start_agent(bundle, b.address, "out-2", state)
    try:
        got = [telemetry(sub) for _ in range(2)]
        time.sleep(1.2)
        b.kill()
        time.sleep(1.2)
        p.kill()  # SIGKILL during the outage: no chance to flush anything
        out1, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    first = json_lines(out1)
    spooled = spool_seqs(state)
    # Every printed window was spooled (a window is spooled before it is printed, so a SIGKILL between
    # the two leaves the spool one window ahead of stdout: the spool is the truth, not stdout).
    assert len(spooled) >= 3 and set(range(spooled[0], first[-1]["seq"] + 1)) <= set(spooled)
    assert spooled[-1] - first[-1]["seq"] in (0, 1)
    last_before_kill = spooled[-1]
    b.start()
    assert sub.wait_subscribed(30)  # the monitor is back before the agent restarts
    p = start_agent(bundle, b.address, "out-2", state)
    try:
        got = collect_until(sub, last_before_kill + 3, got)
        out2, _ = stop_agent(p)
    finally:
        if p.poll() is None:
            p.kill()
    second = json_lines(out2)
    assert second[0]["seq"] == last_before_kill + 1  # seq continues after SIGKILL
    got = collect_until(sub, second[-1]["seq"], got)
    sub.close()
    b.stop()
    seqs = [w["seq"] for w in got]
    assert list(dict.fromkeys(seqs)) == list(range(second[-1]["seq"] + 1)), seqs
    assert len(seqs) - len(set(seqs)) <= 2, seqs  # at most the windows in flight when the broker died
    replayed = [w for w in got if w["seq"] in spooled]
    assert replayed and all(w["historical"] for w in replayed)
    assert spool_seqs(state) == []


def test_spool_cap_drops_oldest_and_the_agent_keeps_running(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()  # no broker at all
    p = start_agent(bundle, f"127.0.0.1:{port}", "out-3", state, "--duration", "2", "--spool-max-mb", "0.004",
                    window=0.1)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    windows = json_lines(out)
    assert len(windows) >= 12 and all(w["count"] > 0 for w in windows)
    assert windows[-1]["dropped"] > 0 and windows[-1]["dropped"] >= windows[0]["dropped"]
    kept = spool_seqs(state)
    assert kept == list(range(windows[-1]["seq"] - len(kept) + 1, windows[-1]["seq"] + 1))  # the newest
    assert len(kept) + windows[-1]["dropped"] >= len(windows) - 1
    assert "telemetry spool full" in err
    assert max(w["spool_depth"] for w in windows) <= len(kept) + 1


def test_corrupt_spool_is_moved_aside_with_an_event(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool.db").write_bytes(b"this is not a database, the SD card ate it" * 200)
    b = Mosquitto(tmp_path / "broker").start()
    sub = Collector(b.host, b.port, "edgekit/out-4/#", client_id="monitor-4")
    p = start_agent(bundle, b.address, "out-4", state)
    try:
        _, event, _ = sub.wait_for(lambda t, m: t.endswith("/events"), timeout=20)
        assert event["kind"] == "spool_corrupt" and "spool.db.corrupt-" in event["moved_to"]
        w = telemetry(sub)
        assert w["seq"] == 0
        _, err = stop_agent(p)
    finally:
        if p.poll() is None:
            p.kill()
        sub.close()
        b.stop()
    assert "is corrupt" in err
    assert len(list(state.glob("spool.db.corrupt-*"))) == 1


def test_seq_file_from_an_older_agent_is_migrated(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "seq").write_text("41\n")
    p = start_agent(bundle, f"127.0.0.1:{free_port()}", "out-5", state, "--duration", "0.5")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert json_lines(out)[0]["seq"] == 41 and not (state / "seq").exists()
    # an offline run afterwards continues from the spool's seq
    r = subprocess.run([*AGENT, "run", "--bundle", str(bundle[0]), "--pubkey", str(bundle[1]), "--duration", "0.3",
                        "--window", "0.1", "--state-dir", str(state), "--json", *NO_POWER],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert json_lines(r.stdout)[0]["seq"] == json_lines(out)[-1]["seq"] + 1
    json.loads(out.splitlines()[0])


def test_birth_reports_the_spool(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.mosquitto import retained

    b = Mosquitto(tmp_path / "broker").start()
    sub = Collector(b.host, b.port, "edgekit/out-5/status", client_id="monitor-5")
    p = start_agent(bundle, b.address, "out-5", tmp_path / "state")
    try:
        birth = sub.wait_for(lambda t, m: m.get("state") == "online", timeout=30)[1]
        assert isinstance(birth["spool_depth"], int) and birth["spool_depth"] >= 0
        assert "spool_oldest_age_s" in birth
        assert retained(b.host, b.port, "edgekit/out-5/status")["state"] == "online"
        stop_agent(p)
    finally:
        if p.poll() is None:
            p.kill()
        sub.close()
        b.stop()
