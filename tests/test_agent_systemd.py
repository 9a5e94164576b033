"""The agent under systemd's protocols, with real sockets and signals: READY / STATUS / WATCHDOG / STOPPING
over a unix datagram socket (as systemd's NOTIFY_SOCKET), and SIGHUP reloading the config file without
dropping the model (a bad file is refused and the agent goes on as it was)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy_helpers import AgentProc, drop_into, golden_bundle, wait_for


class NotifySocket:
    """What systemd does for Type=notify: a datagram socket whose messages are collected."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def has(self, key: str) -> list[float]:
        return [t for t, m in list(self.messages) if key in m.split("\n")]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    try:
        yield n
    finally:
        n.close()


def config_file(path: Path, state: Path, inbox: Path, pub: Path, window: float) -> Path:
    path.write_text(f'state_dir = "{state}"\npubkey = "{pub}"\nwindow_s = {window}\nlog_level = "info"\n'
                    f'power = "none"\n[store]\ninboxes = ["{inbox}"]\nhealth_inferences = 10\n')
    return path


def test_ready_watchdog_and_stopping_reach_the_notify_socket(notify: NotifySocket, tmp_path: Path,
                                                              keypair: tuple[Path, Path]) -> None:
    private, pub = keypair
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}  # pings every ≤ 0.2 s
    agent = AgentProc("--state-dir", str(state), "--inbox", str(inbox), "--pubkey", str(pub), "--window", "0.5",
                      env=env)
    try:
        wait_for(lambda: notify.has("READY=1"), 30, "READY=1 while waiting for a first bundle")
        assert any("STATUS=no model yet" in m for _, m in notify.messages)
        drop_into(inbox, golden_bundle(tmp_path / "m-1.0.0.edgebundle", private, version="1.0.0"))
        agent.wait_version("1.0.0")
        wait_for(lambda: any("STATUS=serving mlp 1.0.0" in m for _, m in list(notify.messages)), 30, "STATUS")
        start = len(notify.has("WATCHDOG=1"))
        time.sleep(1.5)
        pings = notify.has("WATCHDOG=1")
        assert len(pings) - start >= 3, pings  # fed from the serving loop, about every 0.2 s
    finally:
        assert agent.stop() == 0, agent.log[-3000:]
    assert notify.has("STOPPING=1")
    assert notify.has("STOPPING=1")[0] >= notify.has("READY=1")[-1]


def test_sighup_reloads_the_window_without_dropping_the_model(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    private, pub = keypair
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    conf = config_file(tmp_path / "config.toml", state, inbox, pub, window=0.3)
    agent = AgentProc("--config", str(conf))
    try:
        drop_into(inbox, golden_bundle(tmp_path / "m-1.0.0.edgebundle", private, version="1.0.0"))
        agent.wait_version("1.0.0")
        config_file(conf, state, inbox, pub, window=1.5)
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "config reloaded" in agent.log, 30, "the reload")
        n = len(agent.windows)
        wait_for(lambda: len(agent.windows) >= n + 3, 30, "windows after the reload")
        longer = agent.windows[-2]
        assert longer["ts_end"] - longer["ts_start"] == pytest.approx(1.5, abs=0.4)
        assert longer["count"] > 0 and longer["model"]["version"] == "1.0.0"

        conf.write_text(conf.read_text() + "no_such_key = 1\n")  # a broken file: refused, nothing changes
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "the config was not reloaded" in agent.log, 30, "the refused reload")
        assert "no_such_key" in agent.log
        n = len(agent.windows)
        wait_for(lambda: len(agent.windows) >= n + 2, 30, "windows after the refused reload")
        assert agent.proc.poll() is None
        assert agent.windows[-1]["model"]["version"] == "1.0.0"
    finally:
        assert agent.stop() == 0, agent.log[-3000:]
    assert os.path.exists(state / "models" / "current.json")
