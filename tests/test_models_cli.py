"""`edge-agent models list | activate | rollback` in a subprocess, on a store built with real bundles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_agent.store import ModelStore, Slot
from tests.test_model_store import install, store_bundle

ROOT = Path(__file__).resolve().parent.parent
MODELS = [sys.executable, "-m", "edge_agent.models_cli", "models"]


def models(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if home is not None:
        env["HOME"] = str(home)  # no ~/.config/edgekit key to fall back on
    return subprocess.run([*MODELS, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def ok_json(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture()
def store_two(tmp_path: Path, keypair: tuple[Path, Path]) -> tuple[Path, Slot, Slot]:
    d = tmp_path / "bundles"
    d.mkdir()
    state = tmp_path / "state"
    store = ModelStore(state, keypair[1])
    s1 = install(store, store_bundle(d / "v1.edgebundle", keypair[0], version="1.0.0", seed=1))
    s2 = install(store, store_bundle(d / "v2.edgebundle", keypair[0], version="2.0.0", seed=2))
    return state, s1, s2


def test_list_json_and_text(store_two: tuple[Path, Slot, Slot]) -> None:
    state, s1, s2 = store_two
    out = ok_json(models("list", "--state-dir", str(state), "--json"))  # no key needed to list
    assert out["pointer"]["state"] == "committed"
    assert out["active"]["slot"] == s2.id and out["active"]["version"] == "2.0.0"
    assert out["previous"]["slot"] == s1.id and out["activation_in_progress"] is None
    rows = out["slots"]
    assert [r["slot"] for r in rows] == [s2.id, s1.id]
    assert rows[0] == {**rows[0], "name": "mlp", "profile": "x86-64", "bundle_sha256": s2.bundle_sha256,
                       "active": True, "previous": False}
    assert rows[0]["result"]["result"] == "activated" and rows[1]["previous"] is True

    r = models("list", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "pointer committed" in lines[0]
    row2 = next(line for line in lines if s2.id in line)
    assert row2.startswith("*") and "active" in row2 and s2.bundle_sha256[:12] in row2 and "2.0.0" in row2
    assert "previous" in next(line for line in lines if s1.id in line)


def test_rollback_then_activate(store_two: tuple[Path, Slot, Slot], keypair: tuple[Path, Path]) -> None:
    state, s1, s2 = store_two
    pub = str(keypair[1])
    out = ok_json(models("rollback", "--state-dir", str(state), "--pubkey", pub, "--json"))
    assert out["action"] == "rollback" and out["changed"] is True
    assert (out["before"]["active"], out["after"]["active"]) == (s2.id, s1.id)
    assert out["active"]["version"] == "1.0.0"
    listing = ok_json(models("list", "--state-dir", str(state), "--json"))
    assert listing["active"]["slot"] == s1.id and listing["previous"] is None
    assert next(r for r in listing["slots"] if r["slot"] == s2.id)["result"]["result"] == "rolled_back"

    # nothing left to roll back to
    r = models("rollback", "--state-dir", str(state), "--pubkey", pub, "--json")
    assert r.returncode == 1 and "no previous model" in r.stderr and "hint:" in r.stderr
    assert json.loads(r.stdout)["error"] == "ModelStoreError"

    r = models("activate", "2.0.0", "--state-dir", str(state), "--pubkey", pub)
    assert r.returncode == 0, r.stderr
    assert f"active:   {s1.id} -> {s2.id}" in r.stdout and f"previous: none -> {s1.id}" in r.stdout
    out = ok_json(models("activate", s2.id, "--state-dir", str(state), "--pubkey", pub, "--json"))
    assert out["changed"] is False  # already active


def test_errors_are_clear(store_two: tuple[Path, Slot, Slot], keypair: tuple[Path, Path], tmp_path: Path) -> None:
    state, s1, s2 = store_two
    pub = str(keypair[1])
    r = models("activate", "9.9.9", "--state-dir", str(state), "--pubkey", pub, "--json")
    assert r.returncode == 2 and "no model '9.9.9'" in r.stderr and "1.0.0" in r.stderr
    assert json.loads(r.stdout)["error"] == "InputError"

    r = models("list", "--state-dir", str(tmp_path / "nowhere"), "--json")
    assert r.returncode == 2 and "does not exist" in r.stderr and json.loads(r.stdout)["hint"]

    r = models("activate", "1.0.0", "--state-dir", str(state), "--json", home=tmp_path)
    assert r.returncode == 2 and "--pubkey" in r.stderr and json.loads(r.stdout)["error"] == "KeyFileError"

    (s1.path / "model.onnx").write_bytes(b"changed on disk")
    r = models("activate", "1.0.0", "--state-dir", str(state), "--pubkey", pub, "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["reason"] == "tampered"
    r = models("rollback", "--state-dir", str(state), "--pubkey", pub, "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["reason"] == "tampered"
    assert ok_json(models("list", "--state-dir", str(state), "--json"))["active"]["slot"] == s2.id  # untouched


def test_corrupt_pointer_lists_the_slots_and_activate_repairs_it(store_two: tuple[Path, Slot, Slot],
                                                                 keypair: tuple[Path, Path]) -> None:
    state, s1, s2 = store_two
    current = state / "models" / "current.json"
    current.write_text("{not json")
    r = models("list", "--state-dir", str(state), "--json")
    assert r.returncode == 1 and str(current) in r.stderr and "hint:" in r.stderr
    out = json.loads(r.stdout)
    assert out["error"]["error"] == "ModelStoreError" and out["active"] is None
    assert {row["slot"] for row in out["slots"]} == {s1.id, s2.id}
    out = ok_json(models("activate", "1.0.0", "--state-dir", str(state), "--pubkey", str(keypair[1]), "--json"))
    assert out["before"] is None and out["after"]["active"] == s1.id
    assert ok_json(models("list", "--state-dir", str(state), "--json"))["active"]["slot"] == s1.id


def test_refused_while_an_activation_is_in_progress(store_two: tuple[Path, Slot, Slot],
                                                    keypair: tuple[Path, Path], tmp_path: Path) -> None:
    state, _, s2 = store_two
    store = ModelStore(state, keypair[1])
    store.stage(store_bundle(tmp_path / "v3.edgebundle", keypair[0], version="3.0.0", seed=3), source="inbox")
    listing = ok_json(models("list", "--state-dir", str(state), "--json"))
    assert listing["activation_in_progress"]["step"] == "slot"
    for args in (("activate", "1.0.0"), ("rollback",)):
        r = models(*args, "--state-dir", str(state), "--pubkey", str(keypair[1]))
        assert r.returncode == 1 and "in progress" in r.stderr, args
    assert store.active == s2


def test_help_names_the_commands() -> None:
    r = subprocess.run([*MODELS, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and all(c in r.stdout for c in ("list", "activate", "rollback"))
