"""`edge-agent infer` (and bench/run on LiteRT bundles) end to end: real subprocesses, real signed bundles
around the public .tflite models in ../shared/realmodels, real LiteRT."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.telemetry.schema import validate_window
from tests.test_backend_tflite import (
    AUDIO_PRE,
    DOG,
    HELLO_INT8,
    KEYPOINT,
    MICRO,
    MOBILENET,
    edgetpu_present,
    tensor_specs,
)

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "edge-agent"
AGENT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "edge_agent.cli"]
LITERT = {"engine": "litert", "delegates": ["xnnpack"], "threads": 2, "cpu_fallback": True}
OUTPUT_KEYS = {"name", "shape", "dtype", "raw", "dequantized"}


def litert_bundle(out: Path, private_key: Path, model: Path, *, runtime: dict[str, Any] | None = None,
                  labels: Path | None = None, profile: str = "x86-64") -> Path:
    """A signed LiteRT bundle around ``model``, tensors (scale/zero point included) read from LiteRT."""
    from converters.package import build_bundle

    inputs, outputs = tensor_specs(model)
    manifest: dict[str, Any] = {
        "name": model.stem, "version": "1.0.0", "profile": profile, "format": "tflite", "engine": "litert",
        "model": "model.tflite", "inputs": inputs, "outputs": outputs, "runtime": runtime or LITERT,
        "tools": {"edgekit": "0.1.0"},
    }
    members: dict[str, Path | bytes] = {"model.tflite": model}
    if labels is not None:
        manifest["labels"] = "labels.txt"
        members["labels.txt"] = labels
    return build_bundle(out, manifest, members, private_key)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path],
            realmodels: Path) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("litert-bundles")
    private, public = keypair
    hand = realmodels / "hand_gesture"
    return {
        "mobilenet": litert_bundle(d / "mobilenet.edgebundle", private, realmodels / MOBILENET),
        "micro": litert_bundle(d / "micro.edgebundle", private, realmodels / MICRO),
        "hello": litert_bundle(d / "hello.edgebundle", private, realmodels / HELLO_INT8),
        "keypoint": litert_bundle(d / "keypoint.edgebundle", private, hand / KEYPOINT.name,
                                  labels=hand / "keypoint_classifier_label.csv"),
        "custom_op": litert_bundle(d / "audio.edgebundle", private, realmodels / AUDIO_PRE),
        "tpu_fallback": litert_bundle(d / "tpu.edgebundle", private, realmodels / MICRO, profile="coral-usb",
                                      runtime={**LITERT, "delegates": ["edgetpu"], "edgetpu_device": "usb"}),
        "tpu_required": litert_bundle(d / "tpu-req.edgebundle", private, realmodels / MICRO, profile="coral-usb",
                                      runtime={**LITERT, "delegates": ["edgetpu"], "cpu_fallback": False}),
        "pub": public,
    }


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ))


def infer(bundles: dict[str, Path], name: str, input_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return agent("infer", "--bundle", str(bundles[name]), "--pubkey", str(bundles["pub"]), "--input",
                 str(input_path), *extra)


# ------------------------------------------------------------------------------------------------ acceptance


@pytest.mark.realmodels
def test_mobilenet_dog_json_is_class_258(bundles: dict[str, Path], realmodels: Path) -> None:
    r = infer(bundles, "mobilenet", realmodels / DOG, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out) == {"outputs", "latency_ms"} and out["latency_ms"] > 0
    (o,) = out["outputs"]
    assert set(o) == OUTPUT_KEYS
    assert o["name"] == "Xq.1" and o["shape"] == [1, 1000] and o["dtype"] == "int8"
    raw = np.array(o["raw"])
    assert raw.shape == (1, 1000) and int(raw.argmax()) == 258
    _, (spec,) = tensor_specs(realmodels / MOBILENET)
    expected = (raw - spec["zero_point"]) * spec["scale"]
    assert np.allclose(np.array(o["dequantized"]), expected, rtol=1e-6)


@pytest.mark.realmodels
def test_mobilenet_text_shows_nodes_and_top5(bundles: dict[str, Path], realmodels: Path) -> None:
    r = infer(bundles, "mobilenet", realmodels / DOG)
    assert r.returncode == 0, r.stderr
    assert "84 of 84 nodes delegated (xnnpack)" in r.stdout
    assert "ai-edge-litert" in r.stdout and "input.5 (1, 3, 224, 224) int8" in r.stdout
    top = [line.split() for line in r.stdout.splitlines() if line.strip().startswith(("1 ", "2 ", "3 "))]
    assert top[0][:2] == ["1", "258"] and len(top) == 3


@pytest.mark.realmodels
@pytest.mark.parametrize(("word", "index"), [("yes", 2), ("no", 3)])
def test_micro_speech_yes_no(bundles: dict[str, Path], realmodels: Path, tmp_path: Path, word: str,
                             index: int) -> None:
    features = realmodels / "micro_speech" / f"{word}_features_int8_1x1960.npy"
    np.save(tmp_path / "nobatch.npy", np.load(features).reshape(1960))  # without the batch axis
    for path in (features, tmp_path / "nobatch.npy"):
        r = infer(bundles, "micro", path, "--json")
        assert r.returncode == 0, r.stderr
        (o,) = json.loads(r.stdout)["outputs"]
        assert o["shape"] == [1, 4] and int(np.argmax(o["raw"])) == index
        assert int(np.argmax(o["dequantized"])) == index and abs(sum(o["dequantized"][0]) - 1) < 0.02  # softmax


@pytest.mark.realmodels
def test_hello_world_float_input_is_quantized(bundles: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.array([math.pi / 2], np.float32))  # float, no batch axis, int8 model
    r = infer(bundles, "hello", tmp_path / "x.npy", "--json")
    assert r.returncode == 0, r.stderr
    (o,) = json.loads(r.stdout)["outputs"]
    assert o["dtype"] == "int8" and isinstance(o["raw"][0][0], int)
    assert abs(o["dequantized"][0][0] - 1.0) < 0.1  # sin(pi/2)
    r = infer(bundles, "hello", tmp_path / "x.npy")
    assert r.returncode == 0 and "dequantized" in r.stdout and "top-5" not in r.stdout


@pytest.mark.realmodels
def test_keypoint_labels_and_dynamic_batch(bundles: dict[str, Path], realmodels: Path, tmp_path: Path) -> None:
    rows = np.loadtxt(realmodels / "hand_gesture" / "keypoint.csv", delimiter=",", dtype=np.float32)  # sorted
    names = ["Open", "Close", "Pointer"]
    for label in (0, 1, 2):
        row = rows[rows[:, 0] == label][0]
        np.save(tmp_path / "k.npy", row[1:])
        r = infer(bundles, "keypoint", tmp_path / "k.npy")
        assert r.returncode == 0, r.stderr
        first = next(line.split() for line in r.stdout.splitlines() if line.strip().startswith("1 "))
        assert first[1] == str(label) and first[-1] == names[label], r.stdout
    out = json.loads(infer(bundles, "keypoint", tmp_path / "k.npy", "--json").stdout)
    assert out["outputs"][0]["dtype"] == "float32"
    assert out["outputs"][0]["dequantized"] == out["outputs"][0]["raw"]  # float: dequantized = raw


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.realmodels
def test_custom_op_model_is_exit_2(bundles: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "frame.npy", np.zeros((1, 480), np.int16))
    r = infer(bundles, "custom_op", tmp_path / "frame.npy", "--json")
    assert r.returncode == 2
    assert "custom op SignalWindow is not available in this runtime" in r.stderr and "hint:" in r.stderr
    assert json.loads(r.stdout)["error"] == "ModelError"


@pytest.mark.realmodels
def test_wrong_shape_and_stacks_are_exit_2(bundles: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((1, 1000), np.int8))
    r = infer(bundles, "micro", tmp_path / "wrong.npy", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "SourceError"
    assert "(1, 1000)" in r.stderr and "(1, 1960)" in r.stderr
    np.save(tmp_path / "two.npy", np.zeros((2, 1960), np.int8))
    r = infer(bundles, "micro", tmp_path / "two.npy")
    assert r.returncode == 2 and "holds 2 samples" in r.stderr and "(1, 1960)" in r.stderr
    r = infer(bundles, "micro", tmp_path / "nope.npy")
    assert r.returncode == 2 and "nope.npy" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.realmodels
def test_required_edgetpu_missing_is_exit_1(bundles: dict[str, Path], realmodels: Path) -> None:
    if edgetpu_present():
        pytest.skip("libedgetpu.so.1 is installed on this machine")
    features = realmodels / "micro_speech" / "yes_features_int8_1x1960.npy"
    r = infer(bundles, "tpu_required", features, "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["error"] == "BackendError"
    assert "libedgetpu.so.1" in r.stderr and "firmware_notes/coral-usb.md" in r.stderr


# ------------------------------------------------------------------------------------------------ bench / run


@pytest.mark.realmodels
def test_bench_litert_reports_delegated_nodes(bundles: dict[str, Path]) -> None:
    r = agent("bench", "--bundle", str(bundles["mobilenet"]), "--pubkey", str(bundles["pub"]), "--warmup", "3",
              "--count", "20", "--json", "--power", "none")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["engine"] == "litert" and out["delegate"] == "xnnpack" and out["providers"] == ["xnnpack"]
    assert out["delegated_nodes"] == out["total_nodes"] == 84
    assert out["count"] == 20 and out["threads"] == 2 and out["degraded"] is False
    r = agent("bench", "--bundle", str(bundles["mobilenet"]), "--pubkey", str(bundles["pub"]), "--count", "5",
              "--power", "none")
    assert r.returncode == 0 and "84 of 84 nodes (xnnpack)" in r.stdout


@pytest.mark.realmodels
def test_bench_degraded_edgetpu_names_the_library(bundles: dict[str, Path]) -> None:
    if edgetpu_present():
        pytest.skip("libedgetpu.so.1 is installed on this machine")
    r = agent("bench", "--bundle", str(bundles["tpu_fallback"]), "--pubkey", str(bundles["pub"]), "--count", "5",
              "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["degraded"] is True and "libedgetpu.so.1" in out["degraded_reason"]
    assert "firmware_notes/coral-usb.md" in out["degraded_reason"]
    assert out["providers_requested"] == ["edgetpu"] and out["delegate"] == "xnnpack"
    assert out["delegated_nodes"] == 3 and out["total_nodes"] == 4


@pytest.mark.realmodels
def test_run_litert_windows(bundles: dict[str, Path]) -> None:
    r = agent("run", "--bundle", str(bundles["micro"]), "--pubkey", str(bundles["pub"]), "--duration", "0.4",
              "--window", "0.2", "--json", "--power", "none")
    assert r.returncode == 0, r.stderr
    windows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert windows and all(validate_window(w) == [] for w in windows)
    assert all(w["engine"] == "litert" and w["delegate"] == "xnnpack" and w["count"] > 0 for w in windows)


# ------------------------------------------------------------------------------------------------ onnxruntime


def test_infer_onnx_bundle(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    from tests.test_agent_cli import make_bundle

    bundle = make_bundle(tmp_path / "mlp.edgebundle", keypair[0])
    np.save(tmp_path / "x.npy", np.ones(16, np.float32))
    r = agent("infer", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--input", str(tmp_path / "x.npy"),
              "--json")
    assert r.returncode == 0, r.stderr
    (o,) = json.loads(r.stdout)["outputs"]
    assert o["name"] == "logits" and o["shape"] == [1, 4] and o["dtype"] == "float32"
    assert o["dequantized"] == o["raw"] and len(o["raw"][0]) == 4
    r = agent("infer", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--input", str(tmp_path / "x.npy"))
    assert r.returncode == 0 and "CPUExecutionProvider" in r.stdout and "top-4" in r.stdout
