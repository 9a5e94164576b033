"""The health check at load runs the bundle's golden input through the real backend and reports the gap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.models import tiny_mlp
from tests.test_agent_cli import RUNTIME, agent


def golden_bundle(d: Path, private_key: Path, *, shift: float, atol: float) -> Path:
    from converters.package import build_bundle, golden_npz

    model = tiny_mlp(d / f"mlp{shift}.onnx")
    x = np.random.default_rng(3).normal(size=(2, 1, 16)).astype(np.float32)  # 2 samples, batch axis kept
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    y = np.stack([sess.run(None, {"x": xi})[0] for xi in x]) + np.float32(shift)
    manifest = {
        "name": "mlp", "version": "1.0.0", "profile": "x86-64", "format": "onnx", "engine": "onnxruntime",
        "model": "model.onnx",
        "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 4], "dtype": "float32"}],
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "atol": atol},
        "runtime": RUNTIME, "tools": {"edgekit": "0.1.0"},
    }
    members = {"model.onnx": model, "golden/inputs.npz": golden_npz({"x": x}),
               "golden/outputs.npz": golden_npz({"logits": y})}
    return build_bundle(d / f"mlp-{shift}.edgebundle", manifest, members, private_key)


@pytest.mark.parametrize(("shift", "within"), [(0.0, True), (0.5, False)])
def test_bench_reports_the_golden_run(tmp_path: Path, keypair: tuple[Path, Path], shift: float,
                                      within: bool) -> None:
    bundle = golden_bundle(tmp_path, keypair[0], shift=shift, atol=0.01)
    r = agent("bench", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--count", "20", "--json")
    assert r.returncode == 0, r.stderr  # a gap is reported, not fatal: the activation smoke test decides
    g = json.loads(r.stdout)["golden_check"]
    assert g["within_atol"] is within and g["atol"] == 0.01
    assert g["max_abs_diff"] == pytest.approx(shift, abs=1e-5)
    assert ("golden check" in r.stderr) is (not within)
    text = agent("bench", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--count", "20")
    assert ("DIFFERS" in text.stdout) is (not within) and "golden check" in text.stdout
