"""The activation smoke test (edge_agent/smoke.py) on real bundles and real onnxruntime, and the manifest's
``golden.latency_budget_ms``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.bundle import UnpackedBundle, unpack_bundle
from edge_agent.errors import ActivationError, BundleError, InputError
from edge_agent.manifest import parse_manifest
from edge_agent.smoke import smoke_test
from tests.test_model_store import store_bundle


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> dict[str, UnpackedBundle]:
    d = tmp_path_factory.mktemp("smoke")
    private, public = keypair
    specs: dict[str, dict[str, Any]] = {
        "ok": {},
        "budget_ok": {"budget_ms": 1e6},
        "slow": {"budget_ms": 1e-6},
        "golden_bad": {"shift": 0.5},
        "last_sample_bad": {"shift": 0.01, "shift_sample": 2},
        "no_load": {"model_bytes": b"this is not an onnx model"},
        "no_golden": {"golden": False},
    }
    out = {}
    for key, kw in specs.items():
        bundle = store_bundle(d / f"{key}.edgebundle", private, **kw)
        out[key] = unpack_bundle(bundle, d / key, public)
    return out


def test_a_good_model_passes_and_stays_open(unpacked: dict[str, UnpackedBundle]) -> None:
    backend, report = smoke_test(unpacked["ok"], threads=1)
    try:
        assert report["golden"]["samples"] == 3 and report["golden"]["atol"] == 1e-4
        assert 0 <= report["golden"]["max_abs_diff"] <= 1e-4
        assert report["latency_ms"]["median"] > 0 and report["latency_ms"]["budget"] is None
        assert report["load_ms"] > 0 and report["engine"] == "onnxruntime"
        assert report["providers"] == ["CPUExecutionProvider"] and report["degraded"] is False
        out = backend.run([np.zeros((1, 16), np.float32)])  # the caller serves with it
        assert out[0].shape == (1, 4)
    finally:
        backend.close()


def test_a_budget_that_holds_is_reported(unpacked: dict[str, UnpackedBundle]) -> None:
    backend, report = smoke_test(unpacked["budget_ok"], runs=3)
    backend.close()
    assert report["latency_ms"]["budget"] == 1e6 and report["latency_ms"]["median"] < 1e6


def test_without_golden_data_it_is_a_load_check(unpacked: dict[str, UnpackedBundle]) -> None:
    backend, report = smoke_test(unpacked["no_golden"])
    backend.close()
    assert report["golden"] is None and report["latency_ms"]["median"] > 0


def _fail(u: UnpackedBundle, monkeypatch: pytest.MonkeyPatch) -> tuple[ActivationError, list[bool]]:
    """Run a failing smoke test and record whether the backend it created was closed."""
    import edge_agent.smoke as smoke

    closed: list[bool] = []
    real = smoke.create_backend

    def tracking(*args: Any, **kwargs: Any) -> Any:
        backend = real(*args, **kwargs)
        close = backend.close

        def spy() -> None:
            closed.append(True)
            close()

        backend.close = spy
        return backend

    monkeypatch.setattr(smoke, "create_backend", tracking)
    with pytest.raises(ActivationError) as e:
        smoke_test(u)
    return e.value, closed


def test_a_model_that_does_not_load(unpacked: dict[str, UnpackedBundle], monkeypatch: pytest.MonkeyPatch) -> None:
    err, closed = _fail(unpacked["no_load"], monkeypatch)
    assert err.reason == "load_failed" and "does not load" in err.message and "mlp 1.0.0" in err.message
    assert err.hint and err.to_dict()["reason"] == "load_failed" and err.exit_code == 1
    assert closed == []  # nothing was created


def test_golden_outputs_that_differ(unpacked: dict[str, UnpackedBundle], monkeypatch: pytest.MonkeyPatch) -> None:
    err, closed = _fail(unpacked["golden_bad"], monkeypatch)
    assert err.reason == "golden_mismatch" and closed == [True]
    assert "0.5" in err.message and "tolerance 0.0001" in err.message and "'logits'" in err.message
    assert err.to_dict() == {"error": "ActivationError", "message": err.message, "hint": err.hint,
                             "reason": "golden_mismatch"}


def test_every_golden_sample_is_checked(unpacked: dict[str, UnpackedBundle],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    err, closed = _fail(unpacked["last_sample_bad"], monkeypatch)
    assert err.reason == "golden_mismatch" and "sample 2" in err.message and closed == [True]


def test_over_the_latency_budget(unpacked: dict[str, UnpackedBundle], monkeypatch: pytest.MonkeyPatch) -> None:
    err, closed = _fail(unpacked["slow"], monkeypatch)
    assert err.reason == "latency_budget" and closed == [True]
    assert "budget of 1e-06 ms" in err.message and "median of 5" in err.message


def test_runs_must_be_positive(unpacked: dict[str, UnpackedBundle]) -> None:
    with pytest.raises(InputError, match="runs must be at least 1"):
        smoke_test(unpacked["ok"], runs=0)


# ------------------------------------------------------------------------------------------ the manifest field


def _manifest(golden: dict[str, Any]) -> dict[str, Any]:
    sha = "0" * 64
    return {
        "schema": 1, "name": "m", "version": "1.0.0", "created": "2026-01-01T00:00:00Z", "profile": "x86-64",
        "format": "onnx", "engine": "onnxruntime", "model": "model.onnx",
        "files": {n: {"sha256": sha, "size": 1} for n in ("model.onnx", "golden/in.npz", "golden/out.npz")},
        "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": [1, 4], "dtype": "float32"}],
        "runtime": {}, "tools": {},
        "golden": {"inputs": "golden/in.npz", "outputs": "golden/out.npz", "atol": 0.01, **golden},
    }


@pytest.mark.parametrize("budget", [5, 0.25, None])
def test_latency_budget_accepted(budget: Any) -> None:
    m = parse_manifest(_manifest({"latency_budget_ms": budget}))
    assert m.golden is not None and m.golden["latency_budget_ms"] == budget
    assert parse_manifest(copy.deepcopy(_manifest({}))).golden is not None  # optional


@pytest.mark.parametrize("budget", [0, -1.5, True, "5", [5], float("nan"), float("inf"), 10**400])
def test_latency_budget_refused(budget: Any) -> None:
    with pytest.raises(BundleError, match="latency_budget_ms") as e:
        parse_manifest(_manifest({"latency_budget_ms": budget}))
    assert e.value.reason == "malformed"
