"""The device's model store (edge_agent/store.py): slots, the atomic pointer, rollback, recovery after a
crash at every durable step (a real SIGKILL in a subprocess), with real signed bundles."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import BundleError, InputError, ModelStoreError
from edge_agent.store import STEPS, ModelStore, Slot
from tests.models import tiny_mlp

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "threads": 1, "cpu_fallback": True,
           "graph_optimization": "all"}


def store_bundle(out: Path, private_key: Path, *, version: str = "1.0.0", seed: int = 0, name: str = "mlp",
                 golden: bool = True, shift: float = 0.0, shift_sample: int | None = None,
                 budget_ms: float | None = None, model_bytes: bytes | None = None, samples: int = 3) -> Path:
    """A signed bundle of a tiny MLP (``seed`` changes the weights) with golden data computed by onnxruntime.

    ``shift`` is added to the golden outputs (of one sample with ``shift_sample``), ``budget_ms`` sets
    ``golden.latency_budget_ms``, ``model_bytes`` replaces the model file, ``golden=False`` leaves it out.
    """
    import onnxruntime as ort

    from converters.package import build_bundle, golden_npz

    model = tiny_mlp(out.parent / f"{out.stem}.onnx", seed=seed)
    manifest: dict[str, Any] = {
        "name": name, "version": version, "profile": "x86-64", "format": "onnx", "engine": "onnxruntime",
        "model": "model.onnx", "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 4], "dtype": "float32"}],
        "runtime": RUNTIME, "tools": {"edgekit": "0.1.0"},
    }
    members: dict[str, Path | bytes] = {"model.onnx": model if model_bytes is None else model_bytes}
    if golden:
        x = np.random.default_rng(seed).normal(size=(samples, 1, 16)).astype(np.float32)
        sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        y = np.stack([sess.run(None, {"x": xi})[0] for xi in x])
        if shift_sample is None:
            y = y + np.float32(shift)
        else:
            y[shift_sample] += np.float32(shift)
        g: dict[str, Any] = {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "atol": 1e-4}
        if budget_ms is not None:
            g["latency_budget_ms"] = budget_ms
        manifest["golden"] = g
        members["golden/inputs.npz"] = golden_npz({"x": x})
        members["golden/outputs.npz"] = golden_npz({"logits": y})
    return build_bundle(out, manifest, members, private_key)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> dict[str, Path]:
    from converters.keys import init_keys

    d = tmp_path_factory.mktemp("store-bundles")
    private, _ = keypair
    other, _ = init_keys(d / "other-keys")
    out = {f"v{i}": store_bundle(d / f"mlp-{i}.0.0.edgebundle", private, version=f"{i}.0.0", seed=i)
           for i in range(1, 5)}
    out["foreign"] = store_bundle(d / "foreign.edgebundle", other, version="9.0.0", seed=9)
    return out


def install(store: ModelStore, bundle: Path) -> Slot:
    """The agent's happy path: stage, smoke (noted), switch, health (noted), commit."""
    slot = store.stage(bundle, source="inbox")
    store.note_step("smoke")
    store.switch(slot)
    store.note_step("health")
    store.commit()
    return slot


def leftovers(state: Path) -> list[str]:
    models = state / "models"
    return sorted(p.name for p in models.iterdir()
                  if p.name.startswith(".staging-") or ".unpack-" in p.name or p.name.endswith(".tmp")
                  or p.name == "journal.json")


def pointer(state: Path) -> dict[str, Any]:
    return json.loads((state / "models" / "current.json").read_text())


# ------------------------------------------------------------------------------------------ happy paths


def test_stage_switch_commit_and_layout(tmp_path: Path, bundles: dict[str, Path],
                                        keypair: tuple[Path, Path]) -> None:
    steps: list[str] = []
    store = ModelStore(tmp_path, keypair[1], hook=steps.append)
    assert store.recover() == [] and store.active is None and store.slots() == []
    slot = store.stage(bundles["v1"], source="inbox")
    assert steps == ["journal", "verified", "unpacked", "slot"]
    assert slot.id == f"mlp-1.0.0-{slot.bundle_sha256[:12]}" and slot.path == tmp_path / "models" / slot.id
    assert slot.manifest.version == "1.0.0" and slot.installed > 0
    assert (slot.path / "model.onnx").is_file() and (slot.path / "manifest.sig").is_file()
    journal = json.loads((tmp_path / "models" / "journal.json").read_text())
    assert journal["bundle_sha256"] == slot.bundle_sha256 and journal["step"] == "slot"
    assert store.active is None  # staged, not switched: nothing changes for the serving model

    store.switch(slot)
    assert pointer(tmp_path)["state"] == "trial" and store.active == slot and store.previous is None
    store.commit()
    assert steps == [*STEPS]
    p = pointer(tmp_path)
    assert (p["schema"], p["active"], p["previous"], p["state"]) == (1, slot.id, None, "committed")
    assert not (tmp_path / "models" / "journal.json").exists()
    assert store.result(slot.bundle_sha256)["result"] == "activated"
    unpacked = store.load(slot)
    assert unpacked.root == slot.path and unpacked.model_path.is_file()
    assert leftovers(tmp_path) == []


def test_previous_rollback_activate_and_find(tmp_path: Path, bundles: dict[str, Path],
                                             keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1, s2 = install(store, bundles["v1"]), install(store, bundles["v2"])
    assert store.active == s2 and store.previous == s1
    assert [s.id for s in store.slots()] == [s2.id, s1.id]  # newest first
    assert store.find("1.0.0") == s1 and store.find(s2.id) == s2 and store.find("7.7.7") is None

    back = store.rollback("command", "command", "operator asked")  # no activation in progress
    assert back == s1 and store.active == s1 and store.previous is None
    assert pointer(tmp_path)["state"] == "committed"
    assert store.result(s2.bundle_sha256) == {**store.result(s2.bundle_sha256), "result": "rolled_back",
                                              "reason": "command", "message": "operator asked"}

    assert store.activate("2.0.0") == s2
    assert store.active == s2 and store.previous == s1
    assert store.activate(s2.id) == s2 and store.previous == s1  # already active: nothing changes
    with pytest.raises(InputError, match=r"no model '9\.9\.9'") as e:
        store.activate("9.9.9")
    assert "1.0.0" in e.value.message and e.value.hint


def test_rollback_before_and_after_the_switch(tmp_path: Path, bundles: dict[str, Path],
                                              keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1, s2 = install(store, bundles["v1"]), install(store, bundles["v2"])
    # a smoke failure: the pointer never moved
    s3 = store.stage(bundles["v3"], source="mqtt")
    store.note_step("smoke")
    assert store.rollback("golden_mismatch", "smoke", "differs by 0.5") == s2
    assert (store.active, store.previous) == (s2, s1)
    assert store.result(s3.bundle_sha256)["reason"] == "golden_mismatch"
    assert leftovers(tmp_path) == []
    # a health failure: the pointer goes back to exactly what it was before the switch
    s3 = store.stage(bundles["v3"], source="mqtt")
    store.switch(s3)
    assert (store.active, store.previous) == (s3, s2)
    assert store.rollback("health_error", "health", "inference 3 failed") == s2
    assert (store.active, store.previous) == (s2, s1) and pointer(tmp_path)["state"] == "committed"
    assert store.result(s3.bundle_sha256)["result"] == "rolled_back" and leftovers(tmp_path) == []


def test_a_result_for_the_staged_bundle_ends_its_activation(tmp_path: Path, bundles: dict[str, Path],
                                                            keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    install(store, bundles["v1"])
    s2 = store.stage(bundles["v2"], source="inbox")
    store.record_result(s2.bundle_sha256, "rolled_back", "load_failed", "not a model")
    assert store.journal() is None
    install(store, bundles["v3"])  # the next activation is not blocked


def test_switch_to_an_existing_slot_without_staging(tmp_path: Path, bundles: dict[str, Path],
                                                    keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1, s2 = install(store, bundles["v1"]), install(store, bundles["v2"])
    store.switch(s1)  # e.g. a signed `rollback` command: smoke-tested, then switched like a new bundle
    assert store.journal()["slot"] == s1.id
    with pytest.raises(ModelStoreError, match="already on trial"):
        store.switch(s2)
    store.commit()
    assert (store.active, store.previous) == (s1, s2) and store.journal() is None


def test_prune_keeps_the_newest_and_never_active_or_previous(tmp_path: Path, bundles: dict[str, Path],
                                                             keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1], keep=1)
    s1, s2 = install(store, bundles["v1"]), install(store, bundles["v2"])
    assert {s.id for s in store.slots()} == {s1.id, s2.id}  # keep=1, but the previous one stays
    s3 = install(store, bundles["v3"])
    assert {s.id for s in store.slots()} == {s2.id, s3.id}
    store.activate(s2.id)  # active v2, previous v3
    s4 = store.stage(bundles["v4"], source="inbox")
    store.switch(s4)
    store.commit()  # active v4, previous v2: v3 is the one to go
    assert {s.id for s in store.slots()} == {s4.id, s2.id} and not s3.path.exists()
    assert leftovers(tmp_path) == []

    store3 = ModelStore(tmp_path, keypair[1])  # keep=3: nothing beyond three is removed
    install(store3, bundles["v1"])
    install(store3, bundles["v3"])
    assert len(store3.slots()) == 3


def test_prune_drops_failed_bundles_before_working_versions(tmp_path: Path, bundles: dict[str, Path],
                                                            keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1], keep=3)
    s1, s2 = install(store, bundles["v1"]), install(store, bundles["v2"])
    bad = store.stage(bundles["v3"], source="inbox")  # say its smoke test failed
    store.record_result(bad.bundle_sha256, "rolled_back", "golden_mismatch", "outputs differ")
    s4 = install(store, bundles["v4"])  # the commit prunes: the failed slot goes, v1 (older, working) stays
    assert {s.id for s in store.slots()} == {s1.id, s2.id, s4.id}
    assert not bad.path.exists() and leftovers(tmp_path) == []


def test_restaging_the_same_bundle_reuses_its_slot(tmp_path: Path, bundles: dict[str, Path],
                                                   keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1 = install(store, bundles["v1"])
    again = store.stage(bundles["v1"], source="dir")
    assert again == s1  # same id, same install time: not unpacked again
    store.rollback("command", "command", "already active")
    # a slot that no longer verifies is replaced by a fresh copy
    (s1.path / "model.onnx").write_bytes(b"garbage")
    fresh = store.stage(bundles["v1"], source="dir")
    assert fresh.id == s1.id and fresh.installed > s1.installed
    store.load(fresh)
    assert leftovers(tmp_path) == ["journal.json"]


# ------------------------------------------------------------------------------------------ refusals


def test_a_bad_bundle_is_rejected_and_touches_nothing(tmp_path: Path, bundles: dict[str, Path],
                                                      keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1 = install(store, bundles["v1"])
    with pytest.raises(BundleError) as e:
        store.stage(bundles["foreign"], source="inbox")
    assert e.value.reason == "bad_signature"
    sha = __import__("hashlib").sha256(bundles["foreign"].read_bytes()).hexdigest()
    assert store.result(sha)["result"] == "rejected" and store.result(sha)["reason"] == "bad_signature"
    assert store.active == s1 and [s.id for s in store.slots()] == [s1.id] and leftovers(tmp_path) == []
    with pytest.raises(BundleError) as e:
        store.stage(tmp_path / "nope.edgebundle", source="inbox")
    assert e.value.reason == "not_found"


def test_one_activation_at_a_time(tmp_path: Path, bundles: dict[str, Path], keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    install(store, bundles["v1"])
    store.stage(bundles["v2"], source="inbox")
    with pytest.raises(ModelStoreError, match="already in progress") as e:
        store.stage(bundles["v3"], source="inbox")
    assert e.value.hint
    with pytest.raises(ModelStoreError, match="in progress"):
        store.activate("1.0.0")
    with pytest.raises(ModelStoreError, match="nothing to commit"):
        store.commit()


@pytest.mark.parametrize("damage", ["member", "manifest", "missing", "symlink", "signature"])
def test_a_tampered_slot_is_detected_on_load(tmp_path: Path, bundles: dict[str, Path], keypair: tuple[Path, Path],
                                             damage: str) -> None:
    store = ModelStore(tmp_path, keypair[1])
    slot = install(store, bundles["v1"])
    model = slot.path / "model.onnx"
    if damage == "member":
        data = bytearray(model.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit, same size
        model.write_bytes(bytes(data))
    elif damage == "manifest":
        text = (slot.path / "manifest.json").read_text()
        (slot.path / "manifest.json").write_text(text.replace('"threads": 1', '"threads": 2'))
    elif damage == "missing":
        (slot.path / "golden" / "outputs.npz").unlink()
    elif damage == "symlink":
        target = tmp_path / "elsewhere.onnx"
        target.write_bytes(model.read_bytes())
        model.unlink()
        model.symlink_to(target)
    else:
        (slot.path / "manifest.sig").write_bytes(bytes(64))
    with pytest.raises(BundleError) as e:
        store.load(slot)
    assert e.value.reason == "tampered" and str(slot.path) in e.value.message and e.value.hint
    with pytest.raises(BundleError):
        store.activate(slot.id)  # never points at it


def test_load_refuses_a_slot_under_another_key(tmp_path: Path, bundles: dict[str, Path],
                                               keypair: tuple[Path, Path]) -> None:
    from converters.keys import init_keys

    slot = install(ModelStore(tmp_path, keypair[1]), bundles["v1"])
    _, other_pub = init_keys(tmp_path / "k2")
    with pytest.raises(BundleError, match="pins another key") as e:
        ModelStore(tmp_path, other_pub).load(slot)
    assert e.value.reason == "tampered"


# ------------------------------------------------------------------------------------------ recovery


def test_corrupt_pointer_is_a_clear_error_and_recover_falls_back(tmp_path: Path, bundles: dict[str, Path],
                                                                 keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1, s2 = install(store, bundles["v1"]), install(store, bundles["v2"])
    s3 = install(store, bundles["v3"])
    current = tmp_path / "models" / "current.json"
    current.write_text('{"schema": 1, "active": "mlp-3.0')  # a torn write (what fsync+rename prevents)
    with pytest.raises(ModelStoreError) as e:
        _ = store.active
    assert str(current) in e.value.message and "corrupt" in e.value.message
    assert "models activate" in (e.value.hint or "")
    # the newest slot no longer verifies: recover() takes the newest one that does
    (s3.path / "model.onnx").write_bytes(b"bit rot")
    events = ModelStore(tmp_path, keypair[1]).recover()
    assert [ev["kind"] for ev in events] == ["error"]
    assert events[0]["what"] == "model_store_corrupt" and s2.id in events[0]["message"]
    fresh = ModelStore(tmp_path, keypair[1])
    assert fresh.active == s2 and fresh.previous is None and pointer(tmp_path)["state"] == "committed"
    fresh.load(fresh.active)
    assert s1 in fresh.slots()


CORRUPT_POINTERS = [
    "", "[]", '{"schema": 2, "active": null, "previous": null, "state": "committed"}',
    '{"schema": 1, "active": "../../etc", "previous": null, "state": "committed"}',
    '{"schema": 1, "active": null, "previous": null, "state": "maybe"}', "\udcff",
]


@pytest.mark.parametrize("content", CORRUPT_POINTERS)
def test_every_kind_of_corrupt_pointer_is_recovered(tmp_path: Path, bundles: dict[str, Path],
                                                    keypair: tuple[Path, Path], content: str) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1 = install(store, bundles["v1"])
    (tmp_path / "models" / "current.json").write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(ModelStoreError, match=r"current\.json is corrupt"):
        store.pointer()
    assert store.recover()[0]["kind"] == "error"
    assert store.active == s1


def test_missing_active_slot_falls_back_to_previous(tmp_path: Path, bundles: dict[str, Path],
                                                    keypair: tuple[Path, Path]) -> None:
    import shutil

    store = ModelStore(tmp_path, keypair[1])
    s1, s2 = install(store, bundles["v1"]), install(store, bundles["v2"])
    shutil.rmtree(s2.path)
    events = store.recover()
    assert events[0]["kind"] == "error" and s2.id in events[0]["message"]
    assert store.active == s1


def test_recover_removes_staging_leftovers(tmp_path: Path, bundles: dict[str, Path],
                                           keypair: tuple[Path, Path]) -> None:
    store = ModelStore(tmp_path, keypair[1])
    s1 = install(store, bundles["v1"])
    models = tmp_path / "models"
    (models / ".staging-abc123" / "slot" / "golden").mkdir(parents=True)
    (models / ".staging-abc123" / "slot" / "model.onnx").write_bytes(b"half")
    (models / "..staging-x.unpack-y").mkdir()
    (models / ".current.json.k2j3.tmp").write_text("{")
    events = ModelStore(tmp_path, keypair[1]).recover()
    assert events == [] and leftovers(tmp_path) == [] and store.active == s1
    assert sorted(p.name for p in models.iterdir()) == sorted([".lock", "current.json", "results.json", s1.id])


def test_trial_without_a_previous_model_leaves_none(tmp_path: Path, bundles: dict[str, Path],
                                                    keypair: tuple[Path, Path]) -> None:
    """A first model that never proved itself is not run again after a restart (it may be what crashed)."""
    store = ModelStore(tmp_path, keypair[1])
    s1 = store.stage(bundles["v1"], source="inbox")
    store.switch(s1)
    events = ModelStore(tmp_path, keypair[1]).recover()
    assert [(e["kind"], e["stage"], e["reason"], e["to"]) for e in events] == [
        ("rolled_back", "restart", "interrupted", None)]
    assert store.active is None and store.result(s1.bundle_sha256)["result"] == "rolled_back"


# ------------------------------------------------------------------------------------------ SIGKILL at each step

KILL_SCRIPT = r"""
import os, signal, sys
from edge_agent.store import ModelStore

state, pub, bundle, at = sys.argv[1:5]

def hook(step):
    if step == at:
        os.kill(os.getpid(), signal.SIGKILL)

store = ModelStore(state, pub, hook=hook)
store.recover()
slot = store.stage(bundle, source="inbox")
store.note_step("smoke")
store.switch(slot)
store.note_step("health")
if at == "rolled_back":
    store.rollback("health_error", "health", "inference 3 of the health window failed")
else:
    store.commit()
sys.exit(3)
"""

# step -> (the model active after recovery, the event recover() returns)
KILL_CASES = {
    "journal": ("old", ("deploy_rejected", "interrupted")),
    "verified": ("old", ("deploy_rejected", "interrupted")),
    "unpacked": ("old", ("deploy_rejected", "interrupted")),
    "slot": ("old", ("deploy_rejected", "interrupted")),
    "smoke": ("old", ("rolled_back", "interrupted")),
    "switched": ("old", ("rolled_back", "interrupted")),
    "health": ("old", ("rolled_back", "interrupted")),
    "committed": ("new", ("activated", None)),
    "rolled_back": ("old", ("rolled_back", "health_error")),
}


def test_kill_cases_cover_every_step() -> None:
    assert set(STEPS) <= set(KILL_CASES)


@pytest.mark.parametrize("step", list(KILL_CASES))
def test_sigkill_at_each_step_never_leaves_the_device_without_a_whole_model(
        tmp_path: Path, bundles: dict[str, Path], keypair: tuple[Path, Path], step: str) -> None:
    pub = keypair[1]
    old = install(ModelStore(tmp_path, pub), bundles["v1"])
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(pub), str(bundles["v2"]), step],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, (r.returncode, r.stderr)

    store = ModelStore(tmp_path, pub)
    events = store.recover()
    want_model, (kind, reason) = KILL_CASES[step]
    assert [e["kind"] for e in events] == [kind], events
    ev = events[0]
    sha2 = __import__("hashlib").sha256(bundles["v2"].read_bytes()).hexdigest()
    assert ev["bundle_sha256"] == sha2
    active = store.active
    assert active is not None  # never none
    unpacked = store.load(active)  # whole: signature and every member's sha256 (never a mix)
    new_manifest = json.loads(__import__("tarfile").open(bundles["v2"]).extractfile("manifest.json").read())
    if want_model == "old":
        assert active == old and unpacked.manifest.version == "1.0.0"
        assert store.result(sha2)["result"] in ("rejected", "rolled_back")
        assert store.result(sha2)["reason"] == reason
        if kind == "rolled_back":
            assert ev["to"] == old.model_ref and ev["message"]
            assert ev["stage"] == ("health" if step == "rolled_back" else "restart")
    else:
        assert unpacked.manifest.version == "2.0.0"
        assert {k: v.sha256 for k, v in unpacked.manifest.files.items()} == {
            k: v["sha256"] for k, v in new_manifest["files"].items()}
        assert store.previous == old and ev["model"] == active.model_ref and ev["previous"] == old.model_ref
        assert store.result(sha2)["result"] == "activated"
    assert pointer(tmp_path)["state"] == "committed"
    assert leftovers(tmp_path) == []
    assert store.recover() == []  # recovery is done once
    # the store is not wedged: the next activation goes through
    s3 = install(store, bundles["v3"])
    assert store.active == s3


def test_two_stores_on_one_folder_take_turns(tmp_path: Path, bundles: dict[str, Path],
                                             keypair: tuple[Path, Path]) -> None:
    """The agent and the `models` command may act at once: mutations hold an flock on models/.lock."""
    import fcntl

    store = ModelStore(tmp_path, keypair[1])
    install(store, bundles["v1"])
    install(store, bundles["v2"])
    fd = os.open(tmp_path / "models" / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code = ("import sys; from edge_agent.store import ModelStore; "
                "ModelStore(sys.argv[1], sys.argv[2]).activate('1.0.0')")
        p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(keypair[1])], cwd=ROOT)
        with pytest.raises(subprocess.TimeoutExpired):
            p.wait(timeout=3)  # waits for the lock
        assert store.active.manifest.version == "2.0.0"
    finally:
        os.close(fd)
    assert p.wait(timeout=60) == 0
    assert store.active.manifest.version == "1.0.0"
