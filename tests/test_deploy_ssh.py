"""`edgekit deploy` and `edgekit push` over ssh, end to end: a real OpenSSH server on loopback, a real agent
serving its model store, and the device's answer coming back through the same ssh session."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.deploy_helpers import ROOT, AgentProc, golden_bundle
from tests.models import tiny_mlp
from tests.sshd import Sshd

EDGEKIT = [sys.executable, "-m", "converters.cli"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    s = Sshd(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield s
    finally:
        s.stop()


def edgekit(*args: str, timeout: float = 300) -> tuple[int, Any, str]:
    out = subprocess.run([*EDGEKIT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    try:
        doc = json.loads(out.stdout)
    except ValueError:
        doc = None
    return out.returncode, doc, out.stderr


def ssh_opts(s: Sshd) -> list[str]:
    return [f"--ssh-option={o}" for o in s.ssh_options()]


def test_deploy_converts_once_pushes_over_ssh_and_waits_for_activation(sshd: Sshd, tmp_path: Path,
                                                                        keypair: tuple[Path, Path]) -> None:
    private, pub = keypair
    model = tiny_mlp(tmp_path / "classifier.onnx", seed=3)
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(40, 1, 16)).astype(np.float32))
    state, inbox, usb = tmp_path / "state", tmp_path / "inbox", tmp_path / "usb"
    usb.mkdir()
    agent = AgentProc("--state-dir", str(state), "--inbox", str(inbox), "--pubkey", str(pub), "--window", "0.3")
    args = [str(model), "--profile", "x86-64", "--calib", str(tmp_path / "calib.npy"), "--key", str(private),
            "--version", "1.4.0", "--cache-dir", str(tmp_path / "cache"), "--to", sshd.target(str(inbox)),
            "--to", f"dir:{usb}", "--wait", "60", "--json", *ssh_opts(sshd)]
    try:
        code, doc, err = edgekit("deploy", *args)
        assert code == 0, err
        assert doc["cached"] is False
        by_kind = {r["transport"]: r for r in doc["results"]}
        assert by_kind["ssh"]["state"] == "activated", by_kind["ssh"]
        assert by_kind["ssh"]["detail"]["model"]["version"] == "1.4.0"
        assert by_kind["dir"]["state"] == "pushed"
        bundle = Path(doc["bundle"])
        assert (usb / bundle.name).read_bytes() == bundle.read_bytes()
        agent.wait_version("1.4.0")

        code, doc, err = edgekit("deploy", *args)  # the same model again: conversion skipped, already active
        assert code == 0, err
        assert doc["cached"] is True
        ssh = next(r for r in doc["results"] if r["transport"] == "ssh")
        assert ssh["state"] == "activated" and ssh["detail"].get("already_active") is True, ssh
    finally:
        assert agent.stop() == 0, agent.log[-3000:]


def test_push_reports_a_refused_bundle_and_an_unreachable_device(sshd: Sshd, tmp_path: Path,
                                                                  keypair: tuple[Path, Path]) -> None:
    from converters.keys import init_keys

    _, pub = keypair
    other, _ = init_keys(tmp_path / "other")
    foreign = golden_bundle(tmp_path / "foreign-1.0.0.edgebundle", other, version="1.0.0")
    inbox = tmp_path / "inbox"
    agent = AgentProc("--state-dir", str(tmp_path / "state"), "--inbox", str(inbox), "--pubkey", str(pub))
    try:
        code, doc, err = edgekit("push", str(foreign), "--to", sshd.target(str(inbox)), "--wait", "60", "--json",
                                 *ssh_opts(sshd))
        assert code == 1, err
        assert doc[0]["state"] == "rejected" and doc[0]["detail"]["reason"] == "bad_signature", doc
    finally:
        assert agent.stop() == 0, agent.log[-3000:]
    from tests.mosquitto import free_port

    code, doc, err = edgekit("push", str(foreign), "--to", f"ssh://127.0.0.1:{free_port()}/tmp/x", "--json",
                             "--wait", "5", *ssh_opts(sshd))
    assert code == 1
    assert doc[0]["state"] == "failed" and "ssh" in doc[0]["message"].lower(), doc
