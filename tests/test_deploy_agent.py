"""The agent's model store end to end: bundles dropped into its inbox are verified, smoke-tested, switched
to and committed, or refused / rolled back with the reason, while the current model keeps serving."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.deploy_helpers import AgentProc, drop_into, golden_bundle, wait_for


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> dict[str, Path]:
    from converters.keys import init_keys

    d = tmp_path_factory.mktemp("deploy-bundles")
    private, _ = keypair
    other, _ = init_keys(d / "other-keys")
    good1 = golden_bundle(d / "mlp-1.0.0.edgebundle", private, version="1.0.0", seed=1)
    tampered = d / "mlp-9.0.0-tampered.edgebundle"
    data = bytearray(golden_bundle(d / "t.edgebundle", private, version="9.0.0", seed=9).read_bytes())
    at = data.index(b"logits.npy") + 40  # inside the golden outputs member: its sha256 no longer matches
    data[at] ^= 0xFF
    tampered.write_bytes(bytes(data))
    truncated = d / "mlp-9.0.1-truncated.edgebundle"
    truncated.write_bytes(good1.read_bytes()[:4000])
    corrupt = d / "mlp-9.0.3-corrupt.edgebundle"
    corrupt.write_bytes(np.random.default_rng(7).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    unsigned = d / "mlp-9.0.4-unsigned.edgebundle"
    with tarfile.open(good1) as src, tarfile.open(unsigned, "w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers():
            if member.name != "manifest.sig":
                dst.addfile(member, src.extractfile(member))
    return {
        "v1": good1,
        "v2": golden_bundle(d / "mlp-2.0.0.edgebundle", private, version="2.0.0", seed=2),
        "v3": golden_bundle(d / "mlp-3.0.0.edgebundle", private, version="3.0.0", seed=3),
        "tampered": tampered,
        "truncated": truncated,
        "corrupt": corrupt,
        "unsigned": unsigned,
        "wrong_key": golden_bundle(d / "mlp-9.0.2-foreign.edgebundle", other, version="9.0.2", seed=4),
        "no_load": golden_bundle(d / "mlp-9.1.0-noload.edgebundle", private, version="9.1.0",
                                 model_bytes=b"this is not an onnx model"),
        "golden_bad": golden_bundle(d / "mlp-9.2.0-golden.edgebundle", private, version="9.2.0", seed=5,
                                    golden_shift=0.5),
        "slow": golden_bundle(d / "mlp-9.3.0-slow.edgebundle", private, version="9.3.0", seed=6,
                              budget_ms=1e-6),
    }


def result_of(inbox: Path, name: str, timeout: float = 60) -> dict[str, Any]:
    path = inbox / f"{name}.result.json"
    wait_for(path.exists, timeout, f"{path.name}")
    return json.loads(path.read_text())


def models_list(state: Path, pub: Path) -> dict[str, Any]:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "models", "list", "--state-dir", str(state),
                          "--pubkey", str(pub), "--json"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_inbox_activation_refusals_and_rollbacks_keep_serving(tmp_path: Path, versions: dict[str, Path],
                                                               keypair: tuple[Path, Path]) -> None:
    _, pub = keypair
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    agent = AgentProc("--state-dir", str(state), "--inbox", str(inbox), "--pubkey", str(pub), "--window", "0.2",
                      "--health-inferences", "20")
    try:
        # an empty store: the agent waits; the first bundle becomes the active model
        res = result_of(inbox, drop_into(inbox, versions["v1"]).name)
        assert res["result"] == "activated", res
        assert res["model"]["version"] == "1.0.0" and res["previous"] is None
        agent.wait_version("1.0.0")
        assert not (inbox / versions["v1"].name).exists()  # taken out of the inbox

        res = result_of(inbox, drop_into(inbox, versions["v2"]).name)
        assert res["result"] == "activated" and res["previous"]["version"] == "1.0.0", res
        agent.wait_version("2.0.0")

        # every bad bundle: refused or rolled back with its reason; version 2.0.0 serves throughout
        expected = {"tampered": ("rejected", "tampered"), "truncated": ("rejected", "truncated"),
                    "corrupt": ("rejected", "truncated"), "unsigned": ("rejected", "unsigned"),
                    "wrong_key": ("rejected", "bad_signature"), "no_load": ("rolled_back", "load_failed"),
                    "golden_bad": ("rolled_back", "golden_mismatch"), "slow": ("rolled_back", "latency_budget")}
        for key, (result, reason) in expected.items():
            before = len(agent.windows)
            res = result_of(inbox, drop_into(inbox, versions[key]).name)
            assert (res["result"], res["reason"]) == (result, reason), (key, res)
            assert res["message"], res
            wait_for(lambda b=before: len(agent.windows) > b + 1, 30, "windows after the refused bundle")
            assert agent.windows[-1]["model"]["version"] == "2.0.0" and agent.windows[-1]["count"] > 0, key
        served = agent.versions()
        assert served.index("2.0.0") > served.index("1.0.0")
        assert set(served) == {"1.0.0", "2.0.0"}  # never a refused version, never nothing
        gap_free = [w for w in agent.windows if w["model"]["version"] == "2.0.0"]
        assert all(w["count"] > 0 for w in gap_free[1:-1])  # inference never stopped
    finally:
        assert agent.stop() == 0, agent.log[-3000:]
    listing = models_list(state, pub)
    assert listing["active"]["version"] == "2.0.0"
    assert listing["previous"]["version"] == "1.0.0"


def test_restart_serves_the_active_version_and_usb_inbox_is_read_only(tmp_path: Path, versions: dict[str, Path],
                                                                        keypair: tuple[Path, Path]) -> None:
    _, pub = keypair
    state, inbox, usb = tmp_path / "state", tmp_path / "inbox", tmp_path / "usb"
    common = ("--state-dir", str(state), "--inbox", str(inbox), "--inbox", str(usb), "--pubkey", str(pub),
              "--window", "0.2", "--health-inferences", "10")
    agent = AgentProc(*common)
    try:
        drop_into(inbox, versions["v1"])
        agent.wait_version("1.0.0")
        # the "USB stick" appears later, holding version 3.0.0: imported once, left on the stick
        drop_into(usb, versions["v3"])
        agent.wait_version("3.0.0")
        assert (usb / versions["v3"].name).exists()
    finally:
        assert agent.stop() == 0, agent.log[-3000:]
    agent = AgentProc(*common, "--duration", "3")
    try:
        agent.wait_version("3.0.0")
        assert agent.wait_exit() == 0
        assert set(agent.versions()) == {"3.0.0"}  # the stick's bundle is not imported again
        assert "deploy_received" not in agent.log
    finally:
        agent.stop()


def test_store_mode_defaults_to_the_service_folder_and_bundle_mode_refuses_inboxes(
        tmp_path: Path, keypair: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from edge_agent import service

    _, pub = keypair
    monkeypatch.setattr(service, "DEFAULT_STATE_DIR", str(tmp_path / "var-lib-edge-agent"))
    # no --state-dir, an empty store: the service's folder is used; the agent waits for a bundle until
    # --duration ends
    assert service.run_agent(None, pub, duration=0.5, hardware=service.DeviceOptions(power="none")) == 0
    assert (tmp_path / "var-lib-edge-agent" / "models").is_dir()
    out = subprocess.run([sys.executable, "-m", "edge_agent.cli", "run", "--bundle", "x.edgebundle", "--inbox",
                          str(tmp_path), "--power", "none"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--inbox" in out.stderr


def test_the_default_inbox_is_in_the_state_folder(tmp_path: Path, versions: dict[str, Path],
                                                  keypair: tuple[Path, Path]) -> None:
    _, pub = keypair
    state = tmp_path / "state"
    agent = AgentProc("--state-dir", str(state), "--pubkey", str(pub), "--window", "0.2")
    try:
        res = result_of(state / "inbox", drop_into(state / "inbox", versions["v1"]).name)
        assert res["result"] == "activated", res
        agent.wait_version("1.0.0")
    finally:
        assert agent.stop() == 0, agent.log[-3000:]
