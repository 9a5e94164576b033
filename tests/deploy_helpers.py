"""Helpers for the deployment tests: signed bundles with golden data, and an agent in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tests.models import tiny_mlp

ROOT = Path(__file__).resolve().parent.parent
AGENT = [sys.executable, "-m", "edge_agent.cli"]
RUNTIME = {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "threads": 1, "cpu_fallback": True,
           "graph_optimization": "all"}


def golden_bundle(out: Path, private_key: Path, *, version: str = "1.0.0", seed: int = 0, name: str = "mlp",
                  model_bytes: bytes | None = None, golden_shift: float = 0.0, budget_ms: float | None = None,
                  pad_bytes: int = 0, in_features: int = 16, hidden: int = 32) -> Path:
    """A signed bundle of a tiny MLP (``seed`` changes the weights) with golden inputs and outputs.

    ``model_bytes`` replaces the model file (a model that cannot load), ``golden_shift`` is added to the
    golden outputs (a golden mismatch), ``budget_ms`` sets ``golden.latency_budget_ms``, ``pad_bytes`` adds
    a labels member of that size (a bundle of a given size for benchmarks)."""
    import onnxruntime as ort

    from converters.package import build_bundle, golden_npz

    model = tiny_mlp(out.parent / f"{out.stem}.onnx", in_features, hidden, seed=seed)
    x = np.random.default_rng(seed).normal(size=(4, 1, in_features)).astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    y = np.stack([sess.run(None, {"x": x[i]})[0] for i in range(len(x))]) + np.float32(golden_shift)
    golden: dict[str, Any] = {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "atol": 1e-4}
    if budget_ms is not None:
        golden["latency_budget_ms"] = budget_ms
    manifest: dict[str, Any] = {
        "name": name, "version": version, "profile": "x86-64", "format": "onnx", "engine": "onnxruntime",
        "model": "model.onnx", "inputs": [{"name": "x", "shape": [1, in_features], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 4], "dtype": "float32"}],
        "runtime": RUNTIME, "tools": {"edgekit": "0.1.0"}, "golden": golden,
    }
    members: dict[str, Path | bytes] = {
        "model.onnx": model if model_bytes is None else model_bytes,
        "golden/inputs.npz": golden_npz({"x": x}), "golden/outputs.npz": golden_npz({"logits": y}),
    }
    if pad_bytes:
        manifest["labels"] = "labels.txt"
        members["labels.txt"] = (b"class\n" * (pad_bytes // 6 + 1))[:pad_bytes]
    return build_bundle(out, manifest, members, private_key)


def drop_into(inbox: Path, bundle: Path, name: str | None = None) -> Path:
    """Copy a bundle into an inbox the way a push does (temp name, then rename)."""
    inbox.mkdir(parents=True, exist_ok=True)
    name = name or bundle.name
    tmp = inbox / f".{name}.part"
    tmp.write_bytes(bundle.read_bytes())
    os.replace(tmp, inbox / name)
    return inbox / name


def wait_for(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class AgentProc:
    """``edge-agent run --json`` in a subprocess; its windows are collected from stdout as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        if "--power" not in args:
            args = (*args, "--power", "none")
        self.cmd = [*AGENT, "-v", "run", "--json", *args]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                     env={**os.environ, **(env or {})})
        self.windows: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read_out, daemon=True),
                         threading.Thread(target=self._read_err, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.windows.append(json.loads(line))

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    @property
    def log(self) -> str:
        return "".join(self.stderr)

    def versions(self) -> list[str]:
        return [w["model"]["version"] for w in list(self.windows)]

    def wait_version(self, version: str, timeout: float = 60) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the agent exited ({self.proc.returncode}):\n{self.log[-4000:]}")
            return next((w for w in list(self.windows) if w["model"]["version"] == version and w["count"] > 0),
                        None)
        try:
            return wait_for(find, timeout, f"a window of version {version}")
        except AssertionError as e:
            raise AssertionError(f"{e}\nagent log:\n{self.log[-4000:]}") from None

    def stop(self, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc

    def wait_exit(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return rc
