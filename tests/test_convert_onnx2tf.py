"""`edgekit convert model.onnx --profile <TFLite profile>`: the onnx2tf path of convert.

Fast tests: the dispatch, the offline error when the tool environment is missing (an empty env folder), the
refused options, the fp32 parity check (an ONNX model against float .tflite models TensorFlow writes here), and
`edgekit tools onnx2tf`. One end-to-end test (marks ``slow`` and ``onnx2tf``) converts a small CNN with the
real onnx2tf environment (tests/onnx2tf_env.py) and runs the bundle with `edge-agent infer`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from converters import onnx2tf_tool as o2t
from converters.cli import main
from converters.convert import Overrides, convert
from converters.convert_onnx2tf import fp32_parity
from edge_agent.errors import ConversionError, InputError
from edge_agent.profiles import load_profile
from tests import onnx2tf_env
from tests.models import tiny_cnn, tiny_mlp

onnx2tf_python = onnx2tf_env.onnx2tf_python  # the real tool environment (a shared session fixture)


def _calib(path: Path, shape: tuple[int, ...], n: int = 40) -> str:
    np.save(path, np.random.default_rng(0).random((n, *shape), dtype=np.float32))
    return str(path)


# --------------------------------------------------------------------------------------------------
# dispatch and errors (fast)


def test_onnx_for_tflite_goes_through_onnx2tf_offline_needs_the_env(tmp_path: Path,
                                                                     keypair: tuple[Path, Path]) -> None:
    model = tiny_cnn(tmp_path / "cnn.onnx", channels=3, size=16)
    steps: list[str] = []
    empty = tmp_path / "env"
    empty.mkdir()
    with pytest.raises(InputError) as info:
        convert(model, load_profile("rpi5"), _calib(tmp_path / "c.npy", (3, 16, 16)), tmp_path / "out", keypair[0],
                offline=True, onnx2tf_env=empty, progress=steps.append)
    assert steps == ["inspect", "tool env"]  # the ONNX model was inspected, then the tool env refused: no work
    e = info.value
    assert e.exit_code == 2
    assert str(empty) in e.message and "is incomplete" in e.message and "cannot be built offline" in e.message
    assert e.hint is not None and o2t.INSTALL_COMMAND in e.hint
    assert not (tmp_path / "out").exists()


def test_cli_offline_without_env_is_exit_2(tmp_path: Path, keypair: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_cnn(tmp_path / "cnn.onnx", channels=3, size=16)
    calib = _calib(tmp_path / "c.npy", (3, 16, 16))
    code = main(["convert", str(model), "--profile", "coral-usb", "--calib", calib, "--out", str(tmp_path / "out"),
                 "--key", str(keypair[0]), "--offline", "--onnx2tf-env", str(tmp_path / "absent"), "--json"])
    out, err = capsys.readouterr()
    assert code == 2
    assert json.loads(out)["error"] == "InputError"
    assert "does not exist and cannot be built offline" in err
    assert not list((tmp_path / "out").glob("*"))


def test_exclude_nodes_are_refused_for_onnx2tf(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    model = tiny_cnn(tmp_path / "cnn.onnx", channels=3, size=16)
    with pytest.raises(InputError, match="onnx2tf has no option to keep chosen nodes in float"):
        convert(model, load_profile("rpi5"), _calib(tmp_path / "c.npy", (3, 16, 16)), tmp_path / "out", keypair[0],
                overrides=Overrides(exclude_nodes=("c",)), offline=True, onnx2tf_env=tmp_path / "env")


def test_tools_onnx2tf_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tools", "onnx2tf", "--env-dir", str(tmp_path / "env"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["installed"] is False and info["env_dir"] == str(tmp_path / "env")
    assert info["requirements"][0] == f"onnx2tf=={o2t.ONNX2TF_VERSION}"
    assert main(["tools", "onnx2tf", "--env-dir", str(tmp_path / "env")]) == 0
    assert "not installed" in capsys.readouterr().out
    assert main(["tools", "onnx2tf", "--python", sys.executable]) == 2  # --python without --install
    assert "--install" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# fp32 parity: onnx2tf's float32 model against the ONNX model


@pytest.fixture(scope="module")
def mlp_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """tiny_mlp as ONNX, the same weights as a float .tflite, and other weights as a float .tflite."""
    import keras
    import onnx
    from onnx import numpy_helper

    from converters.tflite_int8 import float_reference, prepare_source

    d = tmp_path_factory.mktemp("parity")
    model = tiny_mlp(d / "mlp.onnx", in_features=16, hidden=32, classes=4)
    w = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(model)).graph.initializer}
    paths = []
    for name, same in (("same", True), ("other", False)):
        inp = keras.Input(shape=(16,), batch_size=1, name="x")
        hidden = keras.layers.Dense(32, activation="relu")
        out = keras.layers.Dense(4)
        k = keras.Model(inp, out(hidden(inp)))
        if same:
            hidden.set_weights([w["w1"], w["b1"]])
            out.set_weights([w["w2"], w["b2"]])
        k.save(d / f"{name}.keras")
        source = prepare_source(d / f"{name}.keras", d / f"work-{name}")
        float_reference(source, d / f"{name}.tflite")
        paths.append(d / f"{name}.tflite")
    return model, paths[0], paths[1]


def test_fp32_parity_passes_for_the_same_model(mlp_pair: tuple[Path, Path, Path]) -> None:
    model, same, _ = mlp_pair
    x = np.random.default_rng(0).normal(size=(12, 1, 16)).astype(np.float32)
    parity = fp32_parity(model, same, x, x, threads=1)
    assert parity["samples"] == 8
    assert parity["outputs"]["logits"]["max_abs_error"] <= parity["outputs"]["logits"]["tolerance"]


def test_fp32_parity_fails_when_the_model_changed_meaning(mlp_pair: tuple[Path, Path, Path]) -> None:
    model, _, other = mlp_pair
    x = np.random.default_rng(0).normal(size=(12, 1, 16)).astype(np.float32)
    with pytest.raises(ConversionError) as info:
        fp32_parity(model, other, x, x, threads=1)
    assert "onnx2tf changed the model's meaning" in info.value.message and "'logits'" in info.value.message
    assert info.value.exit_code == 1


# --------------------------------------------------------------------------------------------------
# end to end: real onnx2tf, a verified bundle, edge-agent infer against onnxruntime


@pytest.mark.slow
@pytest.mark.onnx2tf
def test_onnx_cnn_to_rpi5_bundle_runs_in_the_agent(tmp_path: Path, onnx2tf_python: Path,
                                                   keypair: tuple[Path, Path]) -> None:
    from converters.onnx_int8 import session

    model = tiny_cnn(tmp_path / "cnn.onnx", channels=3, size=16)
    calib = _calib(tmp_path / "calib.npy", (3, 16, 16), n=300)
    steps: list[str] = []
    t0 = time.perf_counter()
    result = convert(model, load_profile("rpi5"), calib, tmp_path / "out", keypair[0], latency_runs=20,
                     overrides=Overrides(gate_agreement=0.9), plot=True,
                     progress=lambda step, fraction=None: steps.append(step) if fraction is None else None)
    print(f"\nONNX -> TFLite convert (onnx2tf environment present) took {time.perf_counter() - t0:.1f} s: "
          f"{result.report['timings_s']}")
    assert steps[:5] == ["inspect", "tool env", "calibration", "quantize", "validate"]
    assert steps[-3:] == ["golden", "package", "plot"]
    m = result.manifest
    assert m.format == "tflite" and m.model == "model.tflite"
    assert m.inputs[0].shape == (1, 16, 16, 3) and m.inputs[0].dtype == "int8"
    assert m.tools["onnx2tf"] == o2t.ONNX2TF_VERSION and m.tools["onnx2tf-env:tensorflow"] == "2.19.0"
    assert m.quantization["converter"] == "onnx2tf"
    parity = result.report["validation"]["fp32_parity"]
    assert all(o["max_abs_error"] <= o["tolerance"] for o in parity["outputs"].values())
    assert result.report["onnx2tf"]["input_layout"] == "NHWC"
    assert result.plot is not None and result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the device side: verify, unpack, run one input with edge-agent infer (a subprocess, as on a device)
    x = np.random.default_rng(7).random((1, 3, 16, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", x.transpose(0, 2, 3, 1))  # the bundle's model takes NHWC
    exe = Path(sys.executable).parent / "edge-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edge_agent.cli"]
    r = subprocess.run([*cmd, "infer", "--bundle", str(result.bundle), "--pubkey", str(keypair[1]), "--input",
                        str(tmp_path / "x.npy"), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    scores = np.asarray(json.loads(r.stdout)["outputs"][0]["dequantized"]).ravel()
    ref = session(model).run(None, {"image": x})[0].ravel()
    assert int(np.argmax(scores)) == int(np.argmax(ref))
