"""TFLite conversion end to end: real TensorFlow converter, real LiteRT interpreters, real signed bundles.

The tiny Keras models are built here with keras (batch_size=1 inputs, seeded weights) once per session;
TensorFlow is imported into the test process (LiteRT is not tflite_runtime, so the import order does not
matter). Each convert() call is one real conversion of about a second.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from converters.cli import main
from converters.convert import ConvertResult, convert
from converters.tflite_int8 import (
    convert_tflite_model,
    find_float_ops,
    interpreter,
    op_counts,
    prepare_source,
    spec_from_detail,
    tflite_io,
    to_model_input,
)
from converters.validate_tflite import delegated_nodes, xnnpack_nodes
from edge_agent.bundle import UnpackedBundle, load_golden, unpack_bundle, verify_bundle
from edge_agent.errors import ConversionError, EdgekitError, InputError, ModelError
from edge_agent.profiles import Profile, load_profile

RUNS = 20  # latency runs per model: enough to exercise the interleaving, fast for the suite
CLASSES = 3


def _with(profile: Profile, **quantization: object) -> Profile:
    return dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, **quantization))


def _expect(error: type[EdgekitError], fn: Callable[..., object], *args: object, **kwargs: object) -> EdgekitError:
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------------
# tiny Keras models, built once per session


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """cnn.keras / cnn.h5 / cnn_savedmodel (dynamic batch), mlp.keras, and SavedModels with a SIN and a
    Cumprod in the middle; calibration data cnn.npy (N, 8, 8, 1)."""
    import keras
    import tensorflow as tf

    d = tmp_path_factory.mktemp("keras")
    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(8, 8, 1), batch_size=1, name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, activation="relu")(x)  # 4096 weights: dynamic mode quantizes them
    out = keras.layers.Dense(CLASSES, activation="softmax")(x)
    cnn = keras.Model(inp, out, name="cnn")
    cnn.save(d / "cnn.keras")
    cnn.save(d / "cnn.h5")
    cnn.export(str(d / "cnn_savedmodel"), verbose=False)  # Keras exports with a dynamic batch axis

    inp = keras.Input(shape=(16,), batch_size=1, name="features")
    h = keras.layers.Dense(32, activation="relu")(inp)
    mlp = keras.Model(inp, keras.layers.Dense(CLASSES)(h), name="mlp")
    mlp.save(d / "mlp.keras")

    for name, fn in (("sin", tf.math.sin), ("cumprod", lambda t: tf.math.cumprod(t, axis=-1))):
        inp = keras.Input(shape=(16,), batch_size=1, name="x")
        h = keras.layers.Dense(16, name="d1")(inp)
        h = keras.layers.Lambda(fn, name=f"{name}_layer")(h)
        keras.Model(inp, keras.layers.Dense(CLASSES, name="head")(h)).export(str(d / f"{name}_savedmodel"),
                                                                             verbose=False)
    rng = np.random.default_rng(0)
    np.save(d / "cnn.npy", rng.random((60, 8, 8, 1), dtype=np.float32))
    np.save(d / "vec.npy", rng.normal(size=(40, 16)).astype(np.float32))
    return {"dir": d, "cnn.keras": d / "cnn.keras", "cnn.h5": d / "cnn.h5", "cnn_savedmodel": d / "cnn_savedmodel",
            "mlp.keras": d / "mlp.keras", "sin": d / "sin_savedmodel", "cumprod": d / "cumprod_savedmodel",
            "cnn.npy": d / "cnn.npy", "vec.npy": d / "vec.npy"}


@pytest.fixture(scope="session")
def rpi5() -> Profile:
    return load_profile("rpi5")


@pytest.fixture(scope="session")
def rpi5_case(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path],
              rpi5: Profile) -> tuple[ConvertResult, Path]:
    """The tiny CNN (.keras) converted to a full-int8 (int8 I/O) bundle for rpi5."""
    out = tmp_path_factory.mktemp("rpi5")
    steps: list[str] = []
    result = convert(models["cnn.keras"], rpi5, str(models["cnn.npy"]), out, keypair[0], progress=steps.append,
                     latency_runs=RUNS)
    assert steps == ["inspect", "calibration", "quantize", "validate", "golden", "package"]
    return result, out


@pytest.fixture(scope="session")
def rpi5_unpacked(rpi5_case: tuple[ConvertResult, Path], keypair: tuple[Path, Path]) -> UnpackedBundle:
    result, out = rpi5_case
    return unpack_bundle(result.bundle, out / "unpacked", keypair[1])


# --------------------------------------------------------------------------------------------------
# full-integer bundle for rpi5


def test_rpi5_bundle_is_a_signed_tflite_bundle(rpi5_case: tuple[ConvertResult, Path],
                                               keypair: tuple[Path, Path]) -> None:
    result, out = rpi5_case
    assert result.bundle == out / "cnn-1.0.0-rpi5.edgebundle"
    assert verify_bundle(result.bundle, keypair[1]).manifest == result.manifest
    m = result.manifest
    assert (m.format, m.engine, m.model, m.profile) == ("tflite", "litert", "model.tflite", "rpi5")
    assert m.runtime["delegates"] == ["xnnpack"]
    assert {"tensorflow", "keras", "ai-edge-litert", "edgekit", "numpy"} <= set(m.tools)
    assert m.quantization["mode"] == "int8" and m.quantization["io_dtype"] == "int8"
    assert m.quantization["float_ops"] == []


def test_rpi5_manifest_records_int8_io_with_scale_and_zero_point(rpi5_case: tuple[ConvertResult, Path],
                                                                rpi5_unpacked: UnpackedBundle) -> None:
    m = rpi5_case[0].manifest
    (inp,), (out,) = m.inputs, m.outputs
    assert inp.shape == (1, 8, 8, 1) and out.shape == (1, CLASSES)
    assert inp.dtype == out.dtype == "int8"
    assert inp.scale is not None and inp.scale > 0 and -128 <= (inp.zero_point or 0) <= 127
    assert out.scale == pytest.approx(1 / 256) and out.zero_point == -128  # softmax output range [0, 1)
    # the manifest says exactly what LiteRT reads from the bundled model
    ins, outs = tflite_io(rpi5_unpacked.model_path)
    assert (ins, outs) == ([inp], [out])


def test_rpi5_model_is_full_integer(rpi5_unpacked: UnpackedBundle) -> None:
    path = rpi5_unpacked.model_path
    assert find_float_ops(path) == []
    ops = op_counts(path)
    assert "QUANTIZE" not in ops and "DEQUANTIZE" not in ops  # int8 I/O: no float edges
    assert ops["CONV_2D"] == 1 and ops["FULLY_CONNECTED"] == 2


def test_rpi5_report_figures(rpi5_case: tuple[ConvertResult, Path]) -> None:
    result, _ = rpi5_case
    v = result.manifest.validation
    assert v["top1_agreement"] >= 0.9
    assert v["samples"] == 1  # 60 samples: 59 calibrate (the profile asks for 200), 1 validates
    assert v["quant_size_bytes"] < v["fp32_size_bytes"]
    assert v["fp32_p50_ms"] > 0 and v["quant_p50_ms"] > 0
    assert 0 < v["xnnpack_delegated_nodes"] <= v["xnnpack_total_nodes"]
    report = result.report
    xnn = report["validation"]["xnnpack"]
    assert xnn["delegated_nodes"] == v["xnnpack_delegated_nodes"] and xnn["partitions"] >= 1
    assert report["validation"]["host"]["litert"]
    assert report["source_model"]["kind"] == "keras" and len(report["source_model"]["sha256"]) == 64
    assert report["float_ops"] == []
    assert any("calibration used 59 samples" in n for n in report["notes"])
    assert not any("batch axis" in n for n in report["notes"])  # the model was built with batch_size=1
    assert set(report["timings_s"]) == {"inspect", "calibration", "quantize", "validate", "golden", "package"}


def test_rpi5_golden_outputs_match_the_bundled_model(rpi5_unpacked: UnpackedBundle) -> None:
    golden = load_golden(rpi5_unpacked)
    assert golden is not None
    (inputs,), (outputs,) = golden
    assert inputs.dtype == np.int8 and outputs.dtype == np.int8  # raw, in the model's own I/O dtype
    assert inputs.shape == (1, 1, 8, 8, 1) and outputs.shape == (1, 1, CLASSES)
    assert rpi5_unpacked.manifest.golden is not None
    atol = rpi5_unpacked.manifest.golden["atol"]
    assert atol >= 1.0
    it = interpreter(rpi5_unpacked.model_path)
    for x, y in zip(inputs, outputs, strict=True):
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        got = it.get_tensor(it.get_output_details()[0]["index"])
        np.testing.assert_allclose(got.astype(np.int32), y.astype(np.int32), atol=atol)


# --------------------------------------------------------------------------------------------------
# other profiles, sources and modes


def test_coral_usb_gets_uint8_io_from_an_h5_model(models: dict[str, Path], tmp_path: Path,
                                                  keypair: tuple[Path, Path]) -> None:
    result = convert(models["cnn.h5"], load_profile("coral-usb"), str(models["cnn.npy"]), tmp_path, keypair[0],
                     latency_runs=RUNS)
    (inp,), (out,) = result.manifest.inputs, result.manifest.outputs
    assert inp.dtype == out.dtype == "uint8"
    assert 0 <= (inp.zero_point or 0) <= 255 and out.zero_point == 0
    assert result.manifest.quantization["io_dtype"] == "uint8"
    compiled = result.manifest.validation["edgetpu"]["compiled"]  # CPU-only where edgetpu_compiler is missing
    assert result.manifest.runtime["delegates"] == (["edgetpu"] if compiled else ["xnnpack"])
    assert result.manifest.validation["top1_agreement"] >= 0.9
    assert any("the Edge TPU and its delegate (libedgetpu) are not used on this host" in n
               for n in result.report["notes"])


def test_savedmodel_with_a_dynamic_batch_is_fixed_to_1(models: dict[str, Path], tmp_path: Path) -> None:
    source = prepare_source(models["cnn_savedmodel"], tmp_path)
    assert source.kind == "savedmodel" and source.inputs[0].shape == (1, 8, 8, 1)
    assert any("batch axis of input 'image' (dynamic) was fixed to 1" in n for n in source.notes)
    calib = np.load(models["cnn.npy"])[:20, None]
    convert_tflite_model(source, tmp_path / "m.tflite", "int8", calib, io_dtype="int8")
    detail = interpreter(tmp_path / "m.tflite").get_input_details()[0]
    assert list(detail["shape_signature"]) == [1, 8, 8, 1]
    ops = op_counts(tmp_path / "m.tflite")
    assert not {"SHAPE", "STRIDED_SLICE", "PACK"} & set(ops)
    xnn = xnnpack_nodes(tmp_path / "m.tflite")
    assert xnn["delegated_nodes"] > 0


@pytest.mark.parametrize("mode", ["dynamic", "fp16", "none"])
def test_other_modes_give_loadable_float_io_models(mode: str, models: dict[str, Path], tmp_path: Path) -> None:
    source = prepare_source(models["cnn.keras"], tmp_path)
    calib = np.load(models["cnn.npy"])[:, None]
    result = convert_tflite_model(source, tmp_path / f"{mode}.tflite", mode, calib, io_dtype="float32")
    it = interpreter(tmp_path / f"{mode}.tflite")
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert inp["dtype"] == np.float32 and out["dtype"] == np.float32
    dtypes = {np.dtype(t["dtype"]).name for t in it.get_tensor_details()}
    expected = {"dynamic": "int8", "fp16": "float16"}.get(mode)
    if expected:
        assert expected in dtypes
    else:
        assert dtypes <= {"float32", "int32"}
    convert_tflite_model(source, tmp_path / "ref.tflite", "none", calib, io_dtype="float32")
    ref = interpreter(tmp_path / "ref.tflite")
    for x in calib[:5]:
        for runner in (it, ref):
            runner.set_tensor(runner.get_input_details()[0]["index"], x)
            runner.invoke()
        got = it.get_tensor(out["index"])
        want = ref.get_tensor(ref.get_output_details()[0]["index"])
        np.testing.assert_allclose(got, want, atol=0.05)
    assert result.float_ops == [] and any(f"mode {mode}" in n for n in result.notes)


def test_mode_override_and_label_names(models: dict[str, Path], tmp_path: Path, keypair: tuple[Path, Path],
                                       rpi5: Profile) -> None:
    result = convert(models["cnn.keras"], rpi5, str(models["cnn.npy"]), tmp_path, keypair[0], mode="fp16",
                     latency_runs=RUNS)
    m = result.manifest
    assert m.quantization["mode"] == "fp16" and m.quantization["io_dtype"] == "float32"
    assert [t.dtype for t in m.inputs] == ["float32"] and m.inputs[0].scale is None
    assert any("'fp16' (--mode) overrides the profile's 'int8'" in n for n in result.report["notes"])
    assert m.validation["max_abs_error"] < 0.01


def test_per_tensor_and_float_io_from_profile(models: dict[str, Path], tmp_path: Path, rpi5: Profile) -> None:
    source = prepare_source(models["mlp.keras"], tmp_path)
    calib = np.load(models["vec.npy"])[:, None]
    result = convert_tflite_model(source, tmp_path / "m.tflite", "int8", calib, io_dtype="float32",
                                  per_channel=False, method="entropy")
    ins, outs = tflite_io(tmp_path / "m.tflite")
    assert ins[0].dtype == outs[0].dtype == "float32"
    ops = op_counts(tmp_path / "m.tflite")
    assert ops["QUANTIZE"] == 1 and ops["DEQUANTIZE"] == 1  # float edges around an int8 graph
    assert find_float_ops(tmp_path / "m.tflite") == []
    text = " ".join(result.notes)
    assert "'entropy' is not available for TFLite" in text and "per tensor" in text
    it = interpreter(tmp_path / "m.tflite", delegates=False)
    weights = [t for t in it.get_tensor_details() if np.dtype(t["dtype"]) == np.int8
               and len(t["quantization_parameters"]["scales"]) > 1]
    assert weights == []  # no per-channel scales anywhere


# --------------------------------------------------------------------------------------------------
# ops without int8 kernels, ops without any TFLite kernel


def test_sin_has_no_int8_kernel(models: dict[str, Path], tmp_path: Path, keypair: tuple[Path, Path],
                                rpi5: Profile) -> None:
    calib = str(models["vec.npy"])
    err = _expect(ConversionError, convert, models["sin"], rpi5, calib, tmp_path / "out", keypair[0],
                  latency_runs=RUNS)
    assert err.exit_code == 1
    assert "without an int8 kernel in float: SIN" in err.message
    assert "sin_layer" in err.message  # where it is: the output tensor carries the layer path
    assert "--allow-float-ops" in (err.hint or "") and "Edge TPU" in (err.hint or "")
    assert not list((tmp_path / "out").glob("*.edgebundle"))

    result = convert(models["sin"], rpi5, calib, tmp_path / "out", keypair[0], allow_float_ops=True,
                     latency_runs=RUNS)
    float_ops = result.report["float_ops"]
    assert [op["op"] for op in float_ops] == ["SIN"]
    assert "sin_layer" in float_ops[0]["location"]
    assert result.manifest.quantization["float_ops"] == ["SIN"]
    assert result.manifest.quantization["allow_float_ops"] is True
    assert any("--allow-float-ops: 1 op(s)" in n for n in result.report["notes"])
    assert [t.dtype for t in result.manifest.inputs] == ["int8"]  # the edges stay int8
    assert result.manifest.validation["top1_agreement"] is not None


def test_cumprod_has_no_tflite_kernel_at_all(models: dict[str, Path], tmp_path: Path) -> None:
    source = prepare_source(models["cumprod"], tmp_path)
    calib = np.load(models["vec.npy"])[:, None]
    for allow in (False, True):
        err = _expect(ConversionError, convert_tflite_model, source, tmp_path / "m.tflite", "int8", calib,
                      io_dtype="int8", allow_float_ops=allow)
        assert "no builtin kernel for op Cumprod" in err.message
        assert "cumprod_layer" in err.message and "/Cumprod'" in err.message  # the op and where it is
        assert "Flex" in err.message and "does not help" in (err.hint or "")
    assert not (tmp_path / "m.tflite").exists()


# --------------------------------------------------------------------------------------------------
# XNNPACK node count


def test_delegated_node_count_follows_partitions() -> None:
    """Pure graph walk: node 2 is outside the delegate partition {0, 1}."""
    ops = [
        {"index": 0, "op_name": "CONV_2D", "inputs": [0, 10], "outputs": [1]},
        {"index": 1, "op_name": "FULLY_CONNECTED", "inputs": [1, 11, -1], "outputs": [2]},
        {"index": 2, "op_name": "SOFTMAX", "inputs": [2], "outputs": [3]},
        {"index": 3, "op_name": "DELEGATE", "inputs": [0, 10, 11], "outputs": [2]},
    ]
    assert delegated_nodes(ops) == (2, 1)
    assert delegated_nodes(ops[:3]) == (0, 0)


@pytest.mark.realmodels
def test_xnnpack_takes_all_of_mobilenet_v2(realmodels: Path) -> None:
    model = realmodels / "mobilenet_v2_int8" / "mobilenet_v2_quantized_1x3x224x224.tflite"
    assert xnnpack_nodes(model, 2) == {"delegated_nodes": 84, "total_nodes": 84, "partitions": 1}
    dog = np.load(realmodels / "mobilenet_v2_int8" / "dog_input_int8_1x3x224x224.npy").reshape(1, 3, 224, 224)
    it = interpreter(model, 2)
    it.set_tensor(it.get_input_details()[0]["index"], dog)
    it.invoke()
    assert int(it.get_tensor(it.get_output_details()[0]["index"]).argmax()) == 258  # Samoyed


@pytest.mark.realmodels
def test_xnnpack_leaves_micro_speech_softmax_out(realmodels: Path) -> None:
    model = realmodels / "micro_speech" / "micro_speech_quantized.tflite"
    assert xnnpack_nodes(model) == {"delegated_nodes": 3, "total_nodes": 4, "partitions": 1}


# --------------------------------------------------------------------------------------------------
# .tflite sources


def test_float_tflite_source_with_and_without_ai_edge_quantizer(models: dict[str, Path], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("ai_edge_quantizer", reason="ai-edge-quantizer is not installed")
    calib = np.load(models["cnn.npy"])[:, None]
    convert_tflite_model(prepare_source(models["cnn.keras"], tmp_path), tmp_path / "float.tflite", "none", calib,
                         io_dtype="float32")
    source = prepare_source(tmp_path / "float.tflite", tmp_path)
    assert source.kind == "tflite" and not source.quantized
    result = convert_tflite_model(source, tmp_path / "int8.tflite", "int8", calib, io_dtype="int8")
    assert result.tools["ai-edge-quantizer"]
    ins, outs = tflite_io(tmp_path / "int8.tflite")
    assert ins[0].dtype == outs[0].dtype == "int8" and ins[0].scale
    assert find_float_ops(tmp_path / "int8.tflite") == []
    assert not any("no signature" in n for n in result.notes)  # TF 2.21 writes a serving_default signature

    monkeypatch.setitem(sys.modules, "ai_edge_quantizer", None)  # as if it were not installed
    err = _expect(InputError, convert_tflite_model, source, tmp_path / "again.tflite", "int8", calib,
                  io_dtype="int8")
    assert err.exit_code == 2 and "'ai-edge-quantizer'" in err.message and "source model" in err.message
    assert "edgekit[host]" in (err.hint or "") and "--mode none" in (err.hint or "")
    packaged = convert_tflite_model(source, tmp_path / "asis.tflite", "none", calib, io_dtype="float32")
    assert (tmp_path / "asis.tflite").read_bytes() == (tmp_path / "float.tflite").read_bytes()
    assert any("packaged as it is" in n for n in packaged.notes)


@pytest.mark.realmodels
def test_float_tflite_is_quantized_with_ai_edge_quantizer(realmodels: Path, tmp_path: Path,
                                                          keypair: tuple[Path, Path], rpi5: Profile) -> None:
    pytest.importorskip("ai_edge_quantizer", reason="ai-edge-quantizer is not installed")
    folder = realmodels / "hand_gesture"
    result = convert(folder / "keypoint_classifier.tflite", rpi5, str(folder / "keypoint.csv"), tmp_path,
                     keypair[0], label_column=0, latency_runs=RUNS)
    notes = " ".join(result.report["notes"])
    assert "deprecated builtin code" in notes  # a 2020 file: FULLY_CONNECTED coded the old way
    assert "no signature" in notes and "ai-edge-quantizer" in notes
    assert "dynamic batch axis" in notes
    assert "ai-edge-quantizer" in result.manifest.tools
    assert [t.dtype for t in result.manifest.inputs] == ["int8"]
    assert "true min/max" in notes  # not the quantizer's default moving average (88% accuracy here)
    v = result.manifest.validation
    assert v["top1_agreement"] >= 0.98 and abs(v["accuracy_fp32"] - v["accuracy_quant"]) <= 0.01


@pytest.mark.realmodels
def test_float_tflite_for_uint8_io_is_refused(realmodels: Path, tmp_path: Path,
                                              keypair: tuple[Path, Path]) -> None:
    pytest.importorskip("ai_edge_quantizer", reason="ai-edge-quantizer is not installed")
    folder = realmodels / "hand_gesture"
    err = _expect(InputError, convert, folder / "keypoint_classifier.tflite", load_profile("coral-usb"),
                  str(folder / "keypoint.csv"), tmp_path, keypair[0], label_column=0)
    assert "uint8" in err.message and "int8 inputs and outputs only" in err.message
    assert "source model" in (err.hint or "")


@pytest.mark.realmodels
def test_quantized_tflite_is_packaged_as_is_with_mode_none(realmodels: Path, tmp_path: Path,
                                                           keypair: tuple[Path, Path], rpi5: Profile) -> None:
    src = realmodels / "hello_world" / "hello_world_int8.tflite"
    xs = np.linspace(0, 2 * np.pi, 50, dtype=np.float32)[:, None]
    np.save(tmp_path / "x.npy", xs)
    err = _expect(InputError, convert, src, rpi5, str(tmp_path / "x.npy"), tmp_path / "a", keypair[0])
    assert "already quantized" in err.message and "--mode none" in (err.hint or "")
    result = convert(src, rpi5, str(tmp_path / "x.npy"), tmp_path / "b", keypair[0], mode="none",
                     latency_runs=RUNS)
    root = unpack_bundle(result.bundle, tmp_path / "u", keypair[1]).root
    assert (root / "model.tflite").read_bytes() == src.read_bytes()
    assert result.manifest.inputs[0].scale == pytest.approx(0.02448, rel=1e-3)
    assert any("packaged as it is" in n for n in result.report["notes"])
    # the bundled int8 model approximates sin(x) as the manifest documents
    spec = result.manifest.inputs[0]
    it = interpreter(root / "model.tflite")
    out = spec_from_detail(it.get_output_details()[0])
    errors = []
    for x in xs:
        it.set_tensor(it.get_input_details()[0]["index"], to_model_input(x[None], spec))
        it.invoke()
        y = (float(it.get_tensor(it.get_output_details()[0]["index"])[0, 0]) - (out.zero_point or 0)) * out.scale
        errors.append(abs(y - np.sin(float(x[0]))))
    assert float(np.mean(errors)) < 0.05


@pytest.mark.realmodels
def test_tflite_with_custom_ops_is_a_model_error(realmodels: Path, tmp_path: Path) -> None:
    err = _expect(ModelError, prepare_source, realmodels / "micro_speech" / "audio_preprocessor_int8.tflite",
                  tmp_path)
    assert err.exit_code == 2 and "custom op" in err.message


# --------------------------------------------------------------------------------------------------
# the command line


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_converts_keras_with_csv_labels_and_mode(models: dict[str, Path], tmp_path: Path,
                                                     keypair: tuple[Path, Path],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 16))
    rows = ["label," + ",".join(f"f{i}" for i in range(16))]
    rows += [f"{i % CLASSES}," + ",".join(f"{v:.6f}" for v in row) for i, row in enumerate(x)]
    (tmp_path / "data.csv").write_text("\ufeff" + "\r\n".join(rows) + "\r\n", encoding="utf-8")
    code, out, err = run_cli(capsys, "convert", str(models["mlp.keras"]), "--profile", "rpi4", "--calib",
                             str(tmp_path / "data.csv"), "--label-column", "label", "--mode", "dynamic",
                             "--out", str(tmp_path / "out"), "--key", str(keypair[0]), "--json")
    assert code == 0, err
    summary = json.loads(out)  # stdout holds only the JSON: Keras/TF progress output went to stderr
    assert summary["profile"] == "rpi4" and summary["bundle"].endswith("mlp-1.0.0-rpi4.edgebundle")
    assert summary["validation"]["accuracy_fp32"] is not None  # the CSV's label column was used
    assert any("'dynamic' (--mode) overrides" in n for n in summary["notes"])


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("missing_model", "does not exist"),
        ("not_a_model_h5", "not a keras model"),
        ("junk_tflite", "not a tflite model"),
        ("empty_calib", "no samples"),
        ("wrong_calib_shape", "(1, 16)"),
        ("label_column_on_npy", "applies to a .csv"),
        ("onnx_model", "cannot be built offline"),
        ("text_file", "is not a keras model"),
    ],
)
def test_cli_bad_inputs_exit_2(case: str, words: str, models: dict[str, Path], tmp_path: Path,
                               keypair: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    import h5py

    model, calib = models["mlp.keras"], tmp_path / "calib"
    calib.mkdir()
    for i in range(4):
        np.save(calib / f"{i}.npy", np.full((1, 16), i, np.float32))
    extra: list[str] = []
    if case == "missing_model":
        model = tmp_path / "absent.keras"
    elif case == "not_a_model_h5":
        model = tmp_path / "weights.h5"
        with h5py.File(model, "w") as f:
            f.create_dataset("data", data=np.arange(10))
    elif case == "junk_tflite":
        model = tmp_path / "junk.tflite"
        model.write_bytes(b"not a flatbuffer at all" * 10)
    elif case == "empty_calib":
        calib = tmp_path / "empty"
        calib.mkdir()
    elif case == "wrong_calib_shape":
        for f in calib.iterdir():
            np.save(f, np.zeros((3, 3), np.float32))
    elif case == "label_column_on_npy":
        extra = ["--label-column", "0"]
    elif case == "onnx_model":
        from tests.models import tiny_mlp

        model = tiny_mlp(tmp_path / "m.onnx")
        extra = ["--offline", "--onnx2tf-env", str(tmp_path / "no-env")]  # onnx2tf, whose environment is missing
    elif case == "text_file":
        model = tmp_path / "model.txt"
        model.write_text("hello")
    code, out, err = run_cli(capsys, "convert", str(model), "--profile", "rpi5", "--calib", str(calib),
                             "--out", str(tmp_path / "out"), "--key", str(keypair[0]), "--json", *extra)
    assert code == 2, err
    assert words.lower() in err.lower()
    assert "error" in json.loads(out)
    assert not list((tmp_path / "out").glob("*.edgebundle")), "no bundle may be written on bad input"


# --------------------------------------------------------------------------------------------------
# acceptance: the real hand-gesture classifier


@pytest.mark.realmodels
def test_hand_gesture_hdf5_to_full_int8_keeps_accuracy(realmodels: Path, tmp_path: Path,
                                                       keypair: tuple[Path, Path], rpi5: Profile) -> None:
    folder = realmodels / "hand_gesture"
    # 200 rows calibrate; every other row (4250) is the held-out validation split
    profile = _with(rpi5, validation_samples=10_000)
    result = convert(folder / "keypoint_classifier.hdf5", profile, str(folder / "keypoint.csv"), tmp_path,
                     keypair[0], label_column=0, latency_runs=RUNS)
    v = result.manifest.validation
    assert v["samples"] == 4250
    assert result.report["calibration"]["count"] == 200
    assert v["accuracy_fp32"] == pytest.approx(0.965, abs=0.01)  # MANIFEST.md: 0.965 on keypoint.csv
    assert abs(v["accuracy_fp32"] - v["accuracy_quant"]) <= 0.01  # the gate: within 1 point of fp32
    assert v["top1_agreement"] >= 0.98
    assert [t.dtype for t in result.manifest.inputs] == ["int8"] and result.manifest.inputs[0].shape == (1, 42)
    assert result.manifest.quantization["float_ops"] == []
    assert v["xnnpack_delegated_nodes"] >= 3
    assert any("batch axis of input 'input_1' (dynamic) was fixed to 1" in n for n in result.report["notes"])


# --------------------------------------------------------------------------------------------------
# the accuracy gate and the recovery ladder (TFLite)


@pytest.fixture(scope="session")
def outlier_keras_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.int8_models import outlier_keras

    d = tmp_path_factory.mktemp("outlier_keras")
    np.save(d / "calib.npy", np.random.default_rng(1).normal(size=(300, 1, 16)).astype(np.float32))
    return outlier_keras(d / "outlier.keras"), d / "calib.npy"


def test_tflite_outlier_is_caught_and_fixed_by_keeping_two_layers_float(
        outlier_keras_model: tuple[Path, Path], tmp_path: Path, keypair: tuple[Path, Path], rpi5: Profile) -> None:
    model, calib = outlier_keras_model
    result = convert(model, rpi5, str(calib), tmp_path, keypair[0], latency_runs=RUNS)
    ladder = result.report["ladder"]
    assert ladder["passed_rung"] == "float_layers_1"
    rows = {a["rung"]: a for a in ladder["attempts"]}
    assert rows["initial"]["passed"] is False and rows["initial"]["value"] < 0.5
    assert rows["per_tensor"]["passed"] is False
    assert rows["method_entropy"]["error"].startswith("skipped:")  # TFLite calibrates with min/max only
    worst = ladder["worst_layers"][0]
    assert "fc2" in worst["name"] and worst["error_db"] < 10
    assert [n.split("/")[1] for n in worst["nodes"]] == ["fc2_1", "fc3_1"]  # fc2 and the layer reading it
    v = result.manifest.validation
    assert v["gate"]["passed"] and v["top1_agreement"] >= 0.99 and v["ladder_rung"] == "float_layers_1"
    q = result.manifest.quantization
    assert q["float_ops"] == [] and q["kept_float_ops"] == ["FULLY_CONNECTED", "FULLY_CONNECTED"]
    assert q["io_dtype"] == "int8"  # the profile's int8 I/O is kept
    root = unpack_bundle(result.bundle, tmp_path / "u", keypair[1]).root
    ops = op_counts(root / "model.tflite")
    assert ops["DEQUANTIZE"] == 1 and ops["QUANTIZE"] == 1 and ops["FULLY_CONNECTED"] == 4
    assert tflite_io(root / "model.tflite")[0][0].dtype == "int8"


def test_tflite_no_ladder_names_the_worst_layer(outlier_keras_model: tuple[Path, Path], tmp_path: Path,
                                                keypair: tuple[Path, Path], rpi5: Profile) -> None:
    from converters.convert import Overrides
    from edge_agent.errors import GateError

    model, calib = outlier_keras_model
    with pytest.raises(GateError) as info:
        convert(model, rpi5, str(calib), tmp_path / "out", keypair[0], latency_runs=RUNS,
                overrides=Overrides(ladder=False))
    assert [a["rung"] for a in info.value.attempts] == ["initial"]
    assert "fc2" in info.value.worst_layers[0]["name"]
    assert "rmse/scale" in info.value.worst_layers[0]["detail"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.edgebundle"))


def test_tflite_exclude_nodes_by_tensor_name(models: dict[str, Path], tmp_path: Path,
                                             keypair: tuple[Path, Path], rpi5: Profile) -> None:
    from converters.convert import Overrides

    probe = convert(models["mlp.keras"], rpi5, str(models["vec.npy"]), tmp_path / "probe", keypair[0],
                    latency_runs=RUNS)
    root = unpack_bundle(probe.bundle, tmp_path / "u", keypair[1]).root
    it = interpreter(root / "model.tflite", delegates=False)
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    first_fc = next(op for op in it._get_ops_details() if op["op_name"] == "FULLY_CONNECTED")
    node = names[int(first_fc["outputs"][0])]
    result = convert(models["mlp.keras"], rpi5, str(models["vec.npy"]), tmp_path / "o", keypair[0],
                     latency_runs=RUNS, overrides=Overrides(exclude_nodes=(node, "no/such/node")))
    assert result.manifest.quantization["kept_float_ops"] == ["FULLY_CONNECTED"]
    notes = " ".join(result.report["notes"])
    assert "1 op(s) kept in float on purpose" in notes
    assert "no op with output 'no/such/node' stayed in float" in notes
