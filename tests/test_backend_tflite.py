"""The LiteRT backend with real interpreters: delegates, node counts, degraded fallback, errors, state.

Models: the real public .tflite files in ../shared/realmodels, a tiny stateful RNN written here as a
flatbuffer with LiteRT's own schema classes, and two tiny external delegates compiled from C when a C
compiler is present (the real ``load_delegate`` path without an accelerator).
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.backends import REGISTRY, create_backend
from edge_agent.backends import tflite as tfl
from edge_agent.backends.tflite import (
    DelegateSpec,
    TFLiteBackend,
    nodes_taken_by_delegates,
    parse_delegates,
    unresolved_op,
)
from edge_agent.errors import BackendError, MissingDependencyError, ModelError
from edge_agent.manifest import FileEntry, Manifest, TensorSpec
from edge_agent.preprocess import dequantize, quantize

RT: dict[str, Any] = {"engine": "litert", "delegates": ["xnnpack"], "threads": 2, "cpu_fallback": True}
MOBILENET = Path("mobilenet_v2_int8") / "mobilenet_v2_quantized_1x3x224x224.tflite"
DOG = Path("mobilenet_v2_int8") / "dog_input_int8_1x3x224x224.npy"
MICRO = Path("micro_speech") / "micro_speech_quantized.tflite"
AUDIO_PRE = Path("micro_speech") / "audio_preprocessor_int8.tflite"
HELLO_INT8 = Path("hello_world") / "hello_world_int8.tflite"
HELLO_FLOAT = Path("hello_world") / "hello_world_float.tflite"
KEYPOINT = Path("hand_gesture") / "keypoint_classifier.tflite"
REAL_TFLITE = (MOBILENET, MICRO, HELLO_INT8, HELLO_FLOAT, KEYPOINT)


# --------------------------------------------------------------------------------------------------
# helpers shared with tests/test_agent_infer.py


def tensor_specs(model: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Manifest inputs/outputs of a .tflite as the converter records them: signature shapes (-1 kept),
    dtype, and scale/zero point of quantized tensors, read from a LiteRT interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))

    def spec(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"name": d["name"], "shape": [int(x) for x in d["shape_signature"]],
                               "dtype": np.dtype(d["dtype"]).name}
        scale, zero_point = d["quantization"]
        if scale:
            out.update(scale=float(scale), zero_point=int(zero_point))
        return out

    return [spec(d) for d in it.get_input_details()], [spec(d) for d in it.get_output_details()]


def _spec(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(d["name"], tuple(d["shape"]), d["dtype"], d.get("scale"), d.get("zero_point"))


def manifest_for(model: Path, runtime: dict[str, Any] | None = None, *, profile: str = "x86-64") -> Manifest:
    ins, outs = tensor_specs(model)
    return Manifest(name="t", version="1.0.0", created="2026-01-01T00:00:00Z", profile=profile, format="tflite",
                    engine="litert", model="model.tflite", files={"model.tflite": FileEntry("0" * 64, 1)},
                    inputs=tuple(map(_spec, ins)), outputs=tuple(map(_spec, outs)),
                    runtime=dict(RT if runtime is None else runtime), tools={})


def backend(model: Path, runtime: dict[str, Any] | None = None, *, profile: str = "x86-64",
            threads: int | None = None) -> Any:
    return create_backend(manifest_for(model, runtime, profile=profile), model, threads=threads)


def rnn_accumulator(path: Path) -> Path:
    """A one-op stateful model: RNN with unit weights and no activation, so y = x + h and h <- y.

    Its hidden state is a *variable tensor*, which ``reset_all_variables`` sets back to zero."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    def buffer(values: list[float] | None = None) -> Any:
        b = s.BufferT()
        if values is not None:
            b.data = np.frombuffer(np.asarray(values, np.float32).tobytes(), np.uint8)
        return b

    def tensor(name: str, shape: list[int], buf: int, variable: bool = False) -> Any:
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer, t.isVariable = name.encode(), shape, s.TensorType.FLOAT32, buf, variable
        if name == "x":
            t.shapeSignature = [-1, 1]  # a dynamic batch, as Keras exports write it
        return t

    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.RNN
    code.version = 1
    options = s.RNNOptionsT()
    options.fusedActivationFunction = s.ActivationFunctionType.NONE
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2, 3, 4], [5]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.RNNOptions, options
    graph = s.SubGraphT()
    graph.tensors = [tensor("x", [1, 1], 1), tensor("w", [1, 1], 2), tensor("r", [1, 1], 3), tensor("b", [1], 4),
                     tensor("h", [1, 1], 5, variable=True), tensor("y", [1, 1], 6)]
    graph.inputs, graph.outputs, graph.operators = [0], [5], [op]
    model = s.ModelT()
    model.version, model.operatorCodes, model.subgraphs = 3, [code], [graph]
    model.buffers = [buffer(), buffer(), buffer([1.0]), buffer([1.0]), buffer([0.0]), buffer(), buffer()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def edgetpu_present() -> bool:
    try:
        ctypes.CDLL("libedgetpu.so.1")
    except OSError:
        return False
    return True


_DELEGATE_C = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
/* the leading fields of TfLiteDelegate (tensorflow/lite/core/c/common.h); allocated oversized and zeroed */
typedef struct Delegate {
  void* data_;
  int (*Prepare)(void* context, struct Delegate* delegate);
  void* copy_from; void* copy_to; void* free_handle;
  int64_t flags;
  void* opaque_delegate_builder;
} Delegate;
static int prepare(void* context, Delegate* delegate) { return 0; }  /* claims no node */
Delegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n, void (*report)(const char*)) {
#ifdef REFUSE
  report("no accelerator found on the bus");
  return NULL;
#else
  Delegate* d = calloc(1, 512);
  d->Prepare = prepare;
  return d;
#endif
}
void tflite_plugin_destroy_delegate(Delegate* d) { free(d); }
"""


@pytest.fixture(scope="session")
def c_delegates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two real external delegate libraries: 'noop' (loads, takes no node) and 'refuse' (create fails)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a test delegate")
    d = tmp_path_factory.mktemp("delegates")
    (d / "delegate.c").write_text(_DELEGATE_C)
    out = {}
    for name, flags in (("noop", []), ("refuse", ["-DREFUSE"])):
        out[name] = d / f"lib{name}_delegate.so"
        subprocess.run([cc, "-shared", "-fPIC", "-O1", *flags, "-o", str(out[name]), str(d / "delegate.c")],
                       check=True, capture_output=True)
    return out


# --------------------------------------------------------------------------------------------------
# pure decisions


def test_parse_delegates() -> None:
    specs = parse_delegates(["edgetpu", "xnnpack", "external:/opt/d.so"], {"edgetpu_device": "usb:1"})
    assert specs == [DelegateSpec("edgetpu", "libedgetpu.so.1", {"device": "usb:1"}),
                     DelegateSpec("xnnpack", None), DelegateSpec("external:/opt/d.so", "/opt/d.so")]
    assert parse_delegates(["edgetpu"], {"edgetpu_device": ""}) == [DelegateSpec("edgetpu", "libedgetpu.so.1")]
    assert parse_delegates(["gpu"], {}) == [DelegateSpec("gpu", None)]
    assert parse_delegates(None, {}) == []
    for bad in (["nnapi"], ["external:"], "xnnpack", ["xnnpack", "xnnpack"]):
        with pytest.raises(BackendError):
            parse_delegates(bad, {})


def test_unresolved_op_parsing() -> None:
    assert unresolved_op("Encountered unresolved custom op: SignalWindow.\nSee instructions: x") == "SignalWindow"
    text = "Encountered unresolved custom op: edgetpu-custom-op.Node number 0 (edgetpu-custom-op) failed"
    assert unresolved_op(text) == "edgetpu-custom-op"
    assert unresolved_op("Node number 3 (CONV_2D) failed to prepare.") is None


def test_nodes_taken_walks_back_to_the_delegate_inputs() -> None:
    # t0 -A-> t1 -B-> t2 -C-> t3 (C also reads t1); a delegate took B and C: inputs t1 (+ weight t9), output t3
    ops = [{"index": 0, "op_name": "A", "inputs": [0], "outputs": [1]},
           {"index": 1, "op_name": "B", "inputs": [1, 9], "outputs": [2]},
           {"index": 2, "op_name": "C", "inputs": [2, 1, -1], "outputs": [3]},
           {"index": 3, "op_name": "DELEGATE", "inputs": [1, 9], "outputs": [3]}]
    assert nodes_taken_by_delegates(ops, 3) == {3: {1, 2}}
    ops[3] = {"index": 3, "op_name": "DELEGATE", "inputs": [0, 9], "outputs": [3]}  # all three
    assert nodes_taken_by_delegates(ops, 3) == {3: {0, 1, 2}}
    assert nodes_taken_by_delegates(ops[:3], 3) == {}


# --------------------------------------------------------------------------------------------------
# real models


@pytest.mark.realmodels
def test_mobilenet_dog_is_samoyed_and_xnnpack_takes_every_node(realmodels: Path) -> None:
    be = backend(realmodels / MOBILENET)
    (logits,) = be.run([np.load(realmodels / DOG)])
    assert logits.shape == (1, 1000) and logits.dtype == np.int8
    assert int(logits.argmax()) == 258
    info = be.info()
    assert info["engine"] == "litert" and info["runtime"].startswith("ai-edge-litert ")
    assert info["delegate"] == "xnnpack" and info["providers"] == ["xnnpack"]
    assert info["providers_requested"] == ["xnnpack"]
    assert info["total_nodes"] == 84 and info["delegated_nodes"] == 84  # DEPENDENCIES.md: 84 of 84
    assert info["delegates"] == [{"name": "xnnpack", "library": None, "nodes": 84}]
    assert info["degraded"] is False and info["degraded_reason"] is None
    assert info["threads"] == 2 and info["resized_inputs"] == {} and info["reset_state"] is False
    assert be.run([np.load(realmodels / DOG)])[0] is not logits  # a fresh copy per call
    be.close()


@pytest.mark.realmodels
@pytest.mark.parametrize("rel", REAL_TFLITE, ids=lambda p: p.stem)
def test_node_count_matches_unfused_delegation(realmodels: Path, rel: Path) -> None:
    """Cross-check of the walk-back count: with node fusion off, XNNPACK makes one DELEGATE node per node."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(realmodels / rel), experimental_op_resolver_type=OpResolverType.BUILTIN,
                     experimental_disable_delegate_node_fusion=True)
    it.allocate_tensors()
    one_per_node = sum(op["op_name"] == "DELEGATE" for op in it._get_ops_details())
    info = backend(realmodels / rel).info()
    assert info["delegated_nodes"] == one_per_node > 0
    assert info["delegated_nodes"] <= info["total_nodes"]


@pytest.mark.realmodels
def test_without_xnnpack_nothing_is_delegated(realmodels: Path) -> None:
    be = backend(realmodels / MOBILENET, {**RT, "delegates": []})
    info = be.info()
    assert info["delegated_nodes"] == 0 and info["total_nodes"] == 84
    assert info["delegate"] is None and info["providers"] == [] and info["delegates"] == []
    assert info["degraded"] is False  # nothing was asked for, nothing is missing
    assert int(be.run([np.load(realmodels / DOG)])[0].argmax()) == 258


@pytest.mark.realmodels
def test_micro_speech_yes_and_no(realmodels: Path) -> None:
    be = backend(realmodels / MICRO)
    for word, index in (("yes", 2), ("no", 3)):
        x = np.load(realmodels / "micro_speech" / f"{word}_features_int8_1x1960.npy")
        (scores,) = be.run([x.reshape(1, 1960)])
        assert int(scores.argmax()) == index, word
    info = be.info()
    assert (info["delegated_nodes"], info["total_nodes"]) == (3, 4)  # XNNPACK leaves the int8 SOFTMAX


@pytest.mark.realmodels
@pytest.mark.parametrize("rel", (HELLO_INT8, HELLO_FLOAT), ids=lambda p: p.stem)
def test_hello_world_approximates_sine(realmodels: Path, rel: Path) -> None:
    m = manifest_for(realmodels / rel)
    be = create_backend(m, realmodels / rel)
    assert be.info()["resized_inputs"] == {"serving_default_dense_input:0": [1, 1]}  # signature [-1, 1]
    xs = np.linspace(0.1, 2 * math.pi - 0.1, 25, dtype=np.float32)
    (i,), (o,) = m.inputs, m.outputs
    errors = []
    for x in xs:
        feed = np.array([[x]], np.float32)
        if i.dtype == "int8":
            feed = quantize(feed, i.scale, i.zero_point, "int8")
        (y,) = be.run([feed])
        value = dequantize(y, o.scale, o.zero_point) if o.dtype == "int8" else y
        errors.append(abs(float(value[0, 0]) - math.sin(float(x))))
    assert float(np.mean(errors)) < 0.05  # MANIFEST.md: 0.013 (float), 0.026 (int8)


@pytest.mark.realmodels
def test_keypoint_classifier_with_dynamic_batch(realmodels: Path) -> None:
    m = manifest_for(realmodels / KEYPOINT)
    assert m.inputs[0].shape == (-1, 42)
    be = create_backend(m, realmodels / KEYPOINT)
    assert be.info()["resized_inputs"] == {"input_1": [1, 42]}
    rows = np.loadtxt(realmodels / "hand_gesture" / "keypoint.csv", delimiter=",", dtype=np.float32,
                      max_rows=300)
    preds = [int(be.run([row[None, 1:]])[0].argmax()) for row in rows]
    accuracy = float(np.mean(np.array(preds) == rows[:, 0].astype(int)))
    assert accuracy > 0.9  # MANIFEST.md: 0.965 on the whole file
    with pytest.raises(BackendError, match="inference failed"):
        be.run([np.zeros((2, 42), np.float32)])  # the batch was fixed to 1


@pytest.mark.realmodels
def test_custom_op_is_a_model_error_naming_the_op(realmodels: Path) -> None:
    with pytest.raises(ModelError) as e:
        backend(realmodels / AUDIO_PRE)
    assert "custom op SignalWindow is not available in this runtime" in e.value.message
    assert "tflite-micro" in (e.value.hint or "") and e.value.exit_code == 2
    assert e.value.__cause__ is not None


@pytest.mark.realmodels
@pytest.mark.parametrize("cut", ["half", "garbage", "empty"])
def test_corrupt_or_truncated_model_is_a_model_error(realmodels: Path, tmp_path: Path, cut: str) -> None:
    data = (realmodels / MOBILENET).read_bytes()
    bad = tmp_path / "model.tflite"
    bad.write_bytes({"half": data[: len(data) // 2], "garbage": b"TFL3 not a real model", "empty": b""}[cut])
    with pytest.raises(ModelError) as e:
        create_backend(manifest_for(realmodels / MOBILENET), bad)
    assert "model.tflite" in e.value.message and "corrupt or truncated" in (e.value.hint or "")
    assert e.value.exit_code == 2 and e.value.__cause__ is not None


@pytest.mark.realmodels
def test_manifest_not_matching_model(realmodels: Path) -> None:
    import dataclasses

    m = manifest_for(realmodels / MICRO)
    renamed = dataclasses.replace(m, inputs=(dataclasses.replace(m.inputs[0], name="input"),))
    with pytest.raises(ModelError, match="does not match its manifest"):
        create_backend(renamed, realmodels / MICRO)
    retyped = dataclasses.replace(m, inputs=(dataclasses.replace(m.inputs[0], dtype="uint8"),))
    with pytest.raises(ModelError, match="the manifest says uint8"):
        create_backend(retyped, realmodels / MICRO)
    rescaled = dataclasses.replace(m, outputs=(dataclasses.replace(m.outputs[0], scale=0.5),))
    with pytest.raises(ModelError, match="quantized with scale"):
        create_backend(rescaled, realmodels / MICRO)


# --------------------------------------------------------------------------------------------------
# delegates that are missing here: the real load path, the decision, the report


@pytest.mark.realmodels
def test_missing_edgetpu_with_cpu_fallback_is_degraded(realmodels: Path) -> None:
    if edgetpu_present():
        pytest.skip("libedgetpu.so.1 is installed on this machine")
    rt = {**RT, "delegates": ["edgetpu"], "edgetpu_device": "usb:1", "cpu_fallback": True}
    be = backend(realmodels / MOBILENET, rt, profile="coral-usb")
    info = be.info()
    assert info["degraded"] is True
    reason = info["degraded_reason"]
    assert "libedgetpu.so.1" in reason and "cannot open shared object file" in reason  # the OSError text
    assert "device usb:1" in reason and "firmware_notes/coral-usb.md" in reason
    assert info["providers_requested"] == ["edgetpu"]
    assert info["delegate"] == "xnnpack" and info["delegated_nodes"] == info["total_nodes"] == 84  # CPU fallback
    assert int(be.run([np.load(realmodels / DOG)])[0].argmax()) == 258


@pytest.mark.realmodels
def test_missing_edgetpu_without_fallback_is_an_error(realmodels: Path) -> None:
    if edgetpu_present():
        pytest.skip("libedgetpu.so.1 is installed on this machine")
    rt = {**RT, "delegates": ["edgetpu"], "cpu_fallback": False}
    with pytest.raises(BackendError) as e:
        backend(realmodels / MOBILENET, rt, profile="coral-devboard")
    text = str(e.value)
    assert "libedgetpu.so.1" in text and "cannot open shared object file" in text
    assert "firmware_notes/coral-devboard.md" in text and "cpu_fallback" in text
    assert e.value.exit_code == 1


@pytest.mark.realmodels
def test_gpu_delegate_does_not_exist_for_this_runtime(realmodels: Path) -> None:
    be = backend(realmodels / MICRO, {**RT, "delegates": ["gpu", "xnnpack"]}, profile="rpi5")
    info = be.info()
    assert info["degraded"] is True and "no GPU delegate library exists" in info["degraded_reason"]
    assert "firmware_notes/rpi5.md" in info["degraded_reason"]
    with pytest.raises(BackendError, match="no GPU delegate library exists"):
        backend(realmodels / MICRO, {**RT, "delegates": ["gpu"], "cpu_fallback": False})


@pytest.mark.realmodels
def test_external_delegate_that_is_missing_or_not_a_delegate(realmodels: Path, tmp_path: Path) -> None:
    missing = tmp_path / "libnothere.so"
    with pytest.raises(BackendError) as e:
        backend(realmodels / MICRO, {**RT, "delegates": [f"external:{missing}"], "cpu_fallback": False})
    assert str(missing) in e.value.message and "cannot be loaded" in e.value.message
    libm = "libm.so.6"
    with pytest.raises(BackendError, match="is not a TFLite delegate"):
        backend(realmodels / MICRO, {**RT, "delegates": [f"external:{libm}"], "cpu_fallback": False})


@pytest.mark.realmodels
def test_real_external_delegate_is_loaded_and_counted(realmodels: Path, c_delegates: dict[str, Path]) -> None:
    spec = f"external:{c_delegates['noop']}"
    be = backend(realmodels / MOBILENET, {**RT, "delegates": [spec, "xnnpack"]})
    info = be.info()
    assert info["delegates"] == [{"name": spec, "library": str(c_delegates["noop"]), "nodes": 0},
                                 {"name": "xnnpack", "library": None, "nodes": 84}]
    assert info["providers"] == ["xnnpack"] and info["delegate"] == "xnnpack"
    # the profile's first delegate is in place but idle: that is not where the profile asked to run
    assert info["degraded"] is True
    assert f"the {spec} delegate took none of the 84 nodes" in info["degraded_reason"]
    assert "XNNPACK (84 nodes)" in info["degraded_reason"]
    assert int(be.run([np.load(realmodels / DOG)])[0].argmax()) == 258
    be.close()
    with pytest.raises(BackendError, match="took none of the 84 nodes"):
        backend(realmodels / MOBILENET, {**RT, "delegates": [spec, "xnnpack"], "cpu_fallback": False})
    # second in the list, it is just reported with its count
    info = backend(realmodels / MOBILENET, {**RT, "delegates": ["xnnpack", spec]}).info()
    assert info["degraded"] is False and info["delegated_nodes"] == 84


@pytest.mark.realmodels
def test_external_delegate_that_refuses_to_start(realmodels: Path, c_delegates: dict[str, Path]) -> None:
    spec = f"external:{c_delegates['refuse']}"
    info = backend(realmodels / MICRO, {**RT, "delegates": [spec]}).info()
    assert info["degraded"] is True
    assert "refused to start" in info["degraded_reason"] and "no accelerator found on the bus" in info[
        "degraded_reason"]
    with pytest.raises(BackendError, match="no accelerator found on the bus"):
        backend(realmodels / MICRO, {**RT, "delegates": [spec], "cpu_fallback": False})


# --------------------------------------------------------------------------------------------------
# state, threads, health check, runtimes


def _rnn_manifest(runtime: dict[str, Any]) -> Manifest:
    return Manifest(name="rnn", version="1.0.0", created="2026-01-01T00:00:00Z", profile="x86-64",
                    format="tflite", engine="litert", model="model.tflite",
                    files={"model.tflite": FileEntry("0" * 64, 1)},
                    inputs=(TensorSpec("x", (-1, 1), "float32"),), outputs=(TensorSpec("y", (1, 1), "float32"),),
                    runtime=runtime, tools={})


def test_stateful_model_and_reset_state(tmp_path: Path) -> None:
    model = rnn_accumulator(tmp_path / "rnn.tflite")
    one = np.ones((1, 1), np.float32)
    be = create_backend(_rnn_manifest(RT), model)
    # the health check at load ran once but left no state behind
    assert [float(be.run([one])[0][0, 0]) for _ in range(3)] == [1.0, 2.0, 3.0]
    assert be.info()["reset_state"] is False
    be = create_backend(_rnn_manifest({**RT, "reset_state": True}), model)
    assert [float(be.run([one])[0][0, 0]) for _ in range(3)] == [1.0, 1.0, 1.0]
    assert be.info()["reset_state"] is True
    info = be.info()
    assert info["delegated_nodes"] == 0 and info["total_nodes"] == 1  # XNNPACK has no RNN kernel
    assert info["degraded"] is True and "xnnpack delegate took none of the 1 nodes" in info["degraded_reason"]
    assert info["delegate"] is None and info["providers"] == []
    with pytest.raises(BackendError, match="reset_state"):
        create_backend(_rnn_manifest({**RT, "reset_state": "yes"}), model)


def test_threads_override_and_health_feeds(tmp_path: Path) -> None:
    model = rnn_accumulator(tmp_path / "rnn.tflite")
    assert create_backend(_rnn_manifest(RT), model, threads=1).info()["threads"] == 1
    assert create_backend(_rnn_manifest({**RT, "threads": 3}), model).info()["threads"] == 3
    be = tfl.create(_rnn_manifest(RT), model, health_feeds=[np.full((1, 1), 5, np.float32)])
    assert float(be.run([np.ones((1, 1), np.float32)])[0][0, 0]) == 1.0
    with pytest.raises(BackendError, match="first inference failed"):
        tfl.create(_rnn_manifest(RT), model, health_feeds=[np.ones((3, 7), np.float32)])


def test_registry_has_litert() -> None:
    assert REGISTRY["litert"] == "edge_agent.backends.tflite"


def _fake_tflite_runtime(monkeypatch: pytest.MonkeyPatch, interpreter_module: Any) -> None:
    """Hide ai_edge_litert and install a tflite_runtime package whose interpreter is ``interpreter_module``."""
    pkg = types.ModuleType("tflite_runtime")
    pkg.__version__ = "2.14.0"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", pkg)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", interpreter_module)


def test_falls_back_to_tflite_runtime_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import ai_edge_litert.interpreter as litert  # stands in for tflite_runtime.interpreter (same API)

    model = rnn_accumulator(tmp_path / "rnn.tflite")
    _fake_tflite_runtime(monkeypatch, litert)
    be = create_backend(_rnn_manifest(RT), model)
    assert be.info()["runtime"] == "tflite-runtime 2.14.0" and be.info()["engine_version"] == "2.14.0"
    assert float(be.run([np.ones((1, 1), np.float32)])[0][0, 0]) == 1.0


def test_tflite_runtime_under_numpy2_fails_the_health_check(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    import ai_edge_litert.interpreter as litert

    def interpreter(**kwargs: Any) -> Any:  # what tflite-runtime 2.14 does under numpy 2
        raise ImportError("numpy.core.multiarray failed to import")

    model = rnn_accumulator(tmp_path / "rnn.tflite")
    fake = types.SimpleNamespace(Interpreter=interpreter, OpResolverType=litert.OpResolverType,
                                 load_delegate=litert.load_delegate)
    _fake_tflite_runtime(monkeypatch, fake)
    with pytest.raises(BackendError) as e:
        create_backend(_rnn_manifest(RT), model)
    assert "tflite-runtime 2.14.0 cannot build an interpreter" in e.value.message
    assert "numpy<2" in (e.value.hint or "") and "ai-edge-litert" in (e.value.hint or "")


def test_no_runtime_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    model = rnn_accumulator(tmp_path / "rnn.tflite")
    for name in ("ai_edge_litert", "ai_edge_litert.interpreter", "tflite_runtime", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError) as e:
        create_backend(_rnn_manifest(RT), model)
    assert "ai-edge-litert" in e.value.message and "edgekit[tflite]" in (e.value.hint or "")


def test_backend_never_imports_tensorflow(tmp_path: Path) -> None:
    model = rnn_accumulator(tmp_path / "rnn.tflite")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.test_backend_tflite import _rnn_manifest, RT\n"
        "from edge_agent.backends import create_backend\n"
        f"be = create_backend(_rnn_manifest(RT), Path({str(model)!r}))\n"
        "print(be.info()['runtime'], 'tensorflow' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent, check=True)
    assert r.stdout.split()[-1] == "False", r.stdout


def test_direct_constructor_rejects_missing_file(tmp_path: Path) -> None:
    m = _rnn_manifest(RT)
    with pytest.raises(ModelError, match="does not exist"):
        TFLiteBackend(tmp_path / "nope.tflite", inputs=m.inputs, outputs=m.outputs, runtime=RT, profile="x86-64")
