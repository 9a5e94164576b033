"""The onnxruntime backend with real sessions: providers, degraded fallback, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.backends import REGISTRY, create_backend
from edge_agent.backends.onnx import choose_providers, provider_options
from edge_agent.errors import BackendError, InputError, ModelError
from edge_agent.manifest import FileEntry, Manifest, TensorSpec
from tests.models import tiny_cnn, tiny_mlp

CPU = "CPUExecutionProvider"


def manifest(runtime: dict, *, profile: str = "x86-64", engine: str = "onnxruntime",
             inputs: tuple[TensorSpec, ...] = (TensorSpec("x", (1, 16), "float32"),),
             outputs: tuple[TensorSpec, ...] = (TensorSpec("logits", (1, 4), "float32"),)) -> Manifest:
    return Manifest(name="t", version="1.0.0", created="2026-01-01T00:00:00Z", profile=profile,
                    format="onnx" if engine == "onnxruntime" else "tflite", engine=engine,
                    model="model.onnx", files={"model.onnx": FileEntry("0" * 64, 1)}, inputs=inputs,
                    outputs=outputs, runtime=runtime, tools={})


RT = {"engine": "onnxruntime", "providers": [CPU], "cpu_fallback": True, "threads": 2,
      "graph_optimization": "all"}


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    return tiny_mlp(tmp_path / "model.onnx")


def test_runs_and_matches_direct_onnxruntime(mlp: Path) -> None:
    import onnxruntime as ort

    be = create_backend(manifest(RT), mlp)
    x = np.random.default_rng(0).standard_normal((1, 16), dtype=np.float32)
    (y,) = be.run([x])
    ref = ort.InferenceSession(str(mlp), providers=[CPU]).run(None, {"x": x})[0]
    assert y.shape == (1, 4) and np.allclose(y, ref, atol=1e-6)
    info = be.info()
    assert info["engine"] == "onnxruntime"
    assert info["providers"] == [CPU]  # what the session really uses
    assert info["providers_requested"] == [CPU]
    assert info["delegate"] is None
    assert info["degraded"] is False and info["degraded_reason"] is None
    assert info["threads"] == 2
    be.close()


def test_threads_override_and_graph_levels(mlp: Path) -> None:
    for level in ("disable", "basic", "extended", "all"):
        be = create_backend(manifest({**RT, "graph_optimization": level}), mlp, threads=1)
        assert be.info()["threads"] == 1 and be.info()["graph_optimization"] == level
        assert be.run([np.zeros((1, 16), np.float32)])[0].shape == (1, 4)
    with pytest.raises(BackendError, match="graph_optimization"):
        create_backend(manifest({**RT, "graph_optimization": "max"}), mlp)
    with pytest.raises(InputError, match="threads"):
        create_backend(manifest(RT), mlp, threads=0)


def test_multi_dim_model(tmp_path: Path) -> None:
    m = manifest(RT, inputs=(TensorSpec("image", (1, 1, 8, 8), "float32"),),
                 outputs=(TensorSpec("logits", (1, 10), "float32"),))
    be = create_backend(m, tiny_cnn(tmp_path / "cnn.onnx"))
    assert be.run([np.ones((1, 1, 8, 8), np.float32)])[0].shape == (1, 10)


def test_missing_provider_with_cpu_fallback_is_degraded(mlp: Path) -> None:
    rt = {**RT, "providers": ["CUDAExecutionProvider", CPU], "cpu_fallback": True}
    be = create_backend(manifest(rt, profile="jetson-orin-nano"), mlp)
    info = be.info()
    assert info["degraded"] is True
    assert "CUDAExecutionProvider" in info["degraded_reason"]
    assert "firmware_notes/jetson-orin-nano.md" in info["degraded_reason"]
    assert info["providers"] == [CPU]
    assert info["providers_requested"] == ["CUDAExecutionProvider", CPU]
    assert be.run([np.zeros((1, 16), np.float32)])[0].shape == (1, 4)


def test_missing_provider_without_fallback_is_an_error(mlp: Path) -> None:
    rt = {**RT, "providers": ["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU], "cpu_fallback": False}
    with pytest.raises(BackendError) as e:
        create_backend(manifest(rt, profile="jetson-nano"), mlp)
    text = str(e.value)
    assert "TensorrtExecutionProvider" in text and "CUDAExecutionProvider" in text
    assert "firmware_notes/jetson-nano.md" in text and "cpu_fallback" in text
    assert e.value.exit_code == 1


def test_choose_providers_logic() -> None:
    avail = ["AzureExecutionProvider", CPU]
    assert choose_providers([CPU], avail, cpu_fallback=False, profile="p") == ([CPU], None)
    use, why = choose_providers(["OpenVINOExecutionProvider"], avail, cpu_fallback=True, profile="p")
    assert use == [CPU] and "OpenVINOExecutionProvider" in why
    assert choose_providers([], avail, cpu_fallback=False, profile="p") == ([CPU], None)


def test_tensorrt_options() -> None:
    opts = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", CPU],
                            {"trt_cache_dir": "/var/cache/trt", "trt_fp16": True})
    assert opts[0] == {"trt_engine_cache_enable": True, "trt_engine_cache_path": "/var/cache/trt",
                       "trt_fp16_enable": True}
    assert opts[1] == {} and opts[2] == {}
    assert provider_options(["TensorrtExecutionProvider"], {"trt_cache_dir": "", "trt_fp16": False}) == [{}]
    assert provider_options(["TensorrtExecutionProvider"], {"trt_int8": True}) == [{"trt_int8_enable": True}]


def test_orin_profile_bundles_ask_tensorrt_for_int8_and_fp16() -> None:
    import dataclasses

    from edge_agent.profiles import load_profile

    runtime = dataclasses.asdict(load_profile("jetson-orin-nano").runtime)
    opts = provider_options(list(runtime["providers"]), runtime)[0]
    assert opts["trt_int8_enable"] is True and opts["trt_fp16_enable"] is True
    assert opts["trt_engine_cache_path"] == "/var/lib/edge-agent/trt-cache"


def test_corrupt_model_is_a_model_error(tmp_path: Path) -> None:
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07garbage that is not a protobuf model")
    with pytest.raises(ModelError) as e:
        create_backend(manifest(RT), bad)
    assert "model.onnx" in str(e.value) and e.value.hint and e.value.exit_code == 2
    assert e.value.__cause__ is not None  # wrapped, not swallowed


def test_unknown_op_is_a_model_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["logits"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    with pytest.raises(ModelError, match="NoSuchOp"):
        create_backend(manifest(RT), tmp_path / "model.onnx")


def test_manifest_not_matching_model(mlp: Path) -> None:
    with pytest.raises(ModelError, match="does not match its manifest"):
        create_backend(manifest(RT, inputs=(TensorSpec("input", (1, 16), "float32"),)), mlp)


def test_wrong_feed_is_a_backend_error(mlp: Path) -> None:
    be = create_backend(manifest(RT), mlp)
    with pytest.raises(BackendError, match="inference failed"):
        be.run([np.zeros((1, 3), np.float32)])


def test_registry_and_litert_refuses_an_onnx_file(mlp: Path) -> None:
    assert REGISTRY == {"onnxruntime": "edge_agent.backends.onnx", "litert": "edge_agent.backends.tflite"}
    with pytest.raises(ModelError, match=r"cannot load the model model\.onnx"):
        create_backend(manifest({"engine": "litert"}, engine="litert"), mlp)


def test_missing_onnxruntime_names_the_extra(mlp: Path) -> None:
    code = (
        "import sys; sys.modules['onnxruntime'] = None\n"
        "from pathlib import Path\n"
        "from tests.test_backend_onnx import manifest, RT\n"
        "from edge_agent.backends import create_backend\n"
        "from edge_agent.errors import MissingDependencyError\n"
        "try:\n"
        f"    create_backend(manifest(RT), Path({str(mlp)!r}))\n"
        "except MissingDependencyError as e:\n"
        "    print(e.hint)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    assert "edgekit[onnx]" in out.stdout


# ---------------------------------------------------------------------------------------------- real models

MNIST_IN = (TensorSpec("Input3", (1, 1, 28, 28), "float32"),)
MNIST_OUT = (TensorSpec("Plus214_Output_0", (1, 10), "float32"),)


@pytest.mark.realmodels
def test_real_mnist_matches_reference_outputs(realmodels: Path, tmp_path: Path) -> None:
    from edge_agent.sources import open_source

    be = create_backend(manifest(RT, inputs=MNIST_IN, outputs=MNIST_OUT),
                        realmodels / "onnx_mnist" / "mnist_opset8.onnx")
    for i, label in enumerate((5, 0, 4)):
        ref = np.load(realmodels / "onnx_mnist" / "samples" / f"reference_{i}.npz")
        np.save(tmp_path / f"in{i}.npy", ref["inputs"])  # (1, 28, 28): one sample without the batch axis
        feeds = open_source(f"npy:{tmp_path / f'in{i}.npy'}", be.inputs, None).next()
        (logits,) = be.run(feeds)
        assert np.allclose(logits, ref["outputs"], atol=1e-4)
        assert int(logits.argmax()) == label


@pytest.mark.realmodels
def test_real_mnist_opset1_is_a_clear_model_error(realmodels: Path) -> None:
    with pytest.raises(ModelError) as e:
        create_backend(manifest(RT, inputs=MNIST_IN, outputs=MNIST_OUT),
                       realmodels / "onnx_mnist" / "mnist_opset1_original.onnx")
    assert "Add(1)" in e.value.message and "opset" in (e.value.hint or "")
