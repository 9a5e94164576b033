"""The agent SIGKILLed at each step of an activation, then restarted: it serves a complete model, the old or
the new one, never none and never a mix (``EDGE_AGENT_FAILPOINT`` kills it at the named step)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy_helpers import ROOT, AgentProc, drop_into, golden_bundle

# the steps in the order an activation passes them, and the version a restarted agent must serve
STEPS = [("journal", "1.0.0"), ("verified", "1.0.0"), ("unpacked", "1.0.0"), ("slot", "1.0.0"),
         ("smoke", "1.0.0"), ("switched", "1.0.0"), ("health", "1.0.0"), ("committed", "2.0.0")]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> dict[str, Path]:
    """A state folder whose store serves version 1.0.0, made once by a real agent, and bundle 2.0.0."""
    private, pub = keypair
    d = tmp_path_factory.mktemp("crash")
    v1 = golden_bundle(d / "mlp-1.0.0.edgebundle", private, version="1.0.0", seed=1)
    v2 = golden_bundle(d / "mlp-2.0.0.edgebundle", private, version="2.0.0", seed=2)
    state, inbox = d / "template-state", d / "template-inbox"
    agent = AgentProc("--state-dir", str(state), "--inbox", str(inbox), "--pubkey", str(pub), "--window", "0.2")
    try:
        drop_into(inbox, v1)
        agent.wait_version("1.0.0")
    finally:
        assert agent.stop() == 0, agent.log[-3000:]
    return {"state": state, "v2": v2, "pub": pub}


@pytest.mark.parametrize(("step", "expected"), STEPS, ids=[s for s, _ in STEPS])
def test_sigkill_at_each_step_leaves_a_complete_model(step: str, expected: str, setup: dict[str, Path],
                                                      tmp_path: Path) -> None:
    state, inbox = tmp_path / "state", tmp_path / "inbox"
    shutil.copytree(setup["state"], state)
    common = ("--state-dir", str(state), "--inbox", str(inbox), "--pubkey", str(setup["pub"]), "--window", "0.2",
              "--health-inferences", "10")
    doomed = AgentProc(*common, env={"EDGE_AGENT_FAILPOINT": step})
    try:
        doomed.wait_version("1.0.0")
        drop_into(inbox, setup["v2"])
        assert doomed.wait_exit(60) == -signal.SIGKILL, doomed.log[-3000:]
    finally:
        doomed.stop()
    assert f"failpoint {step}" in doomed.log

    again = AgentProc(*common, "--duration", "2")
    assert again.wait_exit(60) == 0, again.log[-3000:]
    served = again.versions()
    assert served and set(served) == {expected}, (step, served, again.log[-3000:])
    assert all(w["count"] > 0 for w in again.windows[:-1])
    models = state / "models"
    assert not [p.name for p in models.iterdir() if p.name.startswith(".staging") or ".unpack-" in p.name]
    listing = subprocess.run([sys.executable, "-m", "edge_agent.cli", "models", "list", "--state-dir", str(state),
                              "--pubkey", str(setup["pub"]), "--json"], capture_output=True, text=True, timeout=60,
                             cwd=ROOT)
    assert listing.returncode == 0, listing.stderr
    doc = json.loads(listing.stdout)
    assert doc["active"]["version"] == expected and doc["pointer"]["state"] == "committed"
    if expected == "1.0.0":  # the interrupted bundle is answered, not retried on its own
        result = json.loads((inbox / f"{setup['v2'].name}.result.json").read_text())
        assert result["result"] in ("rejected", "rolled_back") and result["reason"] == "interrupted", result
