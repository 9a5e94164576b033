"""ONNX conversion end to end: real onnxruntime quantization, real sessions, real signed bundles."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from converters.convert import ConvertResult, convert
from converters.onnx_int8 import convert_onnx_model, count_ops, inspect_onnx, quantize_onnx, session
from edge_agent.bundle import UnpackedBundle, load_golden, unpack_bundle, verify_bundle
from edge_agent.errors import CalibrationError, EdgekitError, InputError, ModelError, ProfileError
from edge_agent.profiles import Profile, load_profile
from tests.digits import build_digits
from tests.models import tiny_cnn, tiny_mlp

RUNS = 20  # latency runs per model: enough to exercise the interleaving, fast for the suite


def _with(profile: Profile, **quantization: object) -> Profile:
    return dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, **quantization))


def _expect(error: type[EdgekitError], fn: Callable[..., object], *args: object, **kwargs: object) -> EdgekitError:
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 2
    return info.value


@pytest.fixture(scope="session")
def x86() -> Profile:
    return load_profile("x86-64")


@pytest.fixture(scope="session")
def mlp_case(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path],
             x86: Profile) -> tuple[ConvertResult, Path]:
    """A tiny MLP with a dynamic batch, converted for x86-64 from one .npy of 300 samples."""
    d = tmp_path_factory.mktemp("mlp")
    model = tiny_mlp(d / "mlp.onnx", batch="N")
    np.save(d / "calib.npy", np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32))
    steps: list[str] = []
    result = convert(model, x86, str(d / "calib.npy"), d / "out", keypair[0], progress=steps.append,
                     latency_runs=RUNS)
    assert steps == ["inspect", "calibration", "quantize", "validate", "golden", "package"]
    return result, d


@pytest.fixture(scope="session")
def mlp_unpacked(mlp_case: tuple[ConvertResult, Path], keypair: tuple[Path, Path]) -> UnpackedBundle:
    result, d = mlp_case
    return unpack_bundle(result.bundle, d / "unpacked", keypair[1])


# --------------------------------------------------------------------------------------------------
# end to end on a tiny model


def test_bundle_verifies_with_the_public_key(mlp_case: tuple[ConvertResult, Path],
                                             keypair: tuple[Path, Path]) -> None:
    result, d = mlp_case
    assert result.bundle == d / "out" / "mlp-1.0.0-x86-64.edgebundle"
    verified = verify_bundle(result.bundle, keypair[1])
    assert verified.manifest == result.manifest
    m = result.manifest
    assert (m.name, m.version, m.profile, m.format, m.engine, m.model) == (
        "mlp", "1.0.0", "x86-64", "onnx", "onnxruntime", "model.onnx")
    assert [t.shape for t in m.inputs] == [(1, 16)]  # dynamic batch fixed to 1
    assert [t.shape for t in m.outputs] == [(1, 4)]
    assert m.runtime["providers"] == ["CPUExecutionProvider"]
    assert set(m.tools) == {"edgekit", "onnx", "onnxruntime", "numpy"}
    assert m.quantization["format"] == "QDQ" and m.quantization["per_channel"] is True


def test_report_figures_are_sane(mlp_case: tuple[ConvertResult, Path]) -> None:
    result, _ = mlp_case
    v = result.manifest.validation
    assert 0.9 <= v["top1_agreement"] <= 1.0  # a tiny MLP keeps its decisions in int8
    assert v["fp32_size_bytes"] > 0 and v["quant_size_bytes"] > 0
    assert v["samples"] == 100  # 300 samples: 200 calibration, the rest validation
    assert v["fp32_p50_ms"] > 0 and v["quant_p50_ms"] > 0 and v["speedup"] > 0
    assert v["accuracy_fp32"] is None  # no labels
    report = result.report
    assert report["calibration"]["count"] == 200
    assert report["calibration"]["sha256"] == result.manifest.quantization["calibration"]["sha256"]
    assert any("batch axis of input 'x' was fixed to 1" in n for n in report["notes"])
    assert any("validation used 100 samples" in n for n in report["notes"])
    assert set(report["timings_s"]) == {"inspect", "calibration", "quantize", "validate", "golden", "package"}
    assert report["validation"]["host"]["cpu"]


def test_bundle_members(mlp_case: tuple[ConvertResult, Path], mlp_unpacked: UnpackedBundle) -> None:
    result, _ = mlp_case
    root = mlp_unpacked.root
    assert mlp_unpacked.model_path == root / "model.onnx"
    ops = count_ops(root / "model.onnx")
    assert ops.get("QuantizeLinear", 0) >= 2 and ops.get("DequantizeLinear", 0) >= 4
    inside = json.loads((root / "report.json").read_text())
    assert inside["notes"] == result.report["notes"]
    assert inside["validation"]["outputs"]["logits"]["top1_agreement"] == result.manifest.validation[
        "top1_agreement"]


def test_golden_outputs_match_the_bundled_model(mlp_unpacked: UnpackedBundle) -> None:
    golden = load_golden(mlp_unpacked)
    assert golden is not None
    (inputs,), (outputs,) = golden
    assert inputs.shape == (4, 1, 16) and outputs.shape == (4, 1, 4)
    assert mlp_unpacked.manifest.golden is not None
    atol = mlp_unpacked.manifest.golden["atol"]
    assert atol == pytest.approx(max(1e-4, 0.02 * float(np.abs(outputs).max())))
    sess = session(mlp_unpacked.model_path)
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(sess.run(None, {"x": x})[0], y, atol=atol)


def test_calibration_sha256_follows_the_data(mlp_case: tuple[ConvertResult, Path], keypair: tuple[Path, Path],
                                             x86: Profile) -> None:
    result, d = mlp_case
    model = d / "mlp.onnx"
    np.save(d / "other.npy", np.random.default_rng(2).normal(size=(300, 16)).astype(np.float32))
    other = convert(model, x86, str(d / "other.npy"), d / "other", keypair[0], latency_runs=RUNS)
    again = convert(model, x86, str(d / "calib.npy"), d / "again", keypair[0], latency_runs=RUNS)
    first = result.manifest.quantization["calibration"]["sha256"]
    assert other.manifest.quantization["calibration"]["sha256"] != first
    assert again.manifest.quantization["calibration"]["sha256"] == first  # same data, same seed


def test_mode_none_and_dynamic(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    model = tiny_mlp(tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32))
    none = convert(model, _with(x86, mode="none"), str(tmp_path / "c.npy"), tmp_path / "none", keypair[0],
                   latency_runs=RUNS)
    assert none.manifest.validation["max_abs_error"] == 0.0
    assert any("packaged as float32" in n for n in none.report["notes"])
    dyn = convert(model, _with(x86, mode="dynamic"), str(tmp_path / "c.npy"), tmp_path / "dyn", keypair[0],
                  name="m-dyn", latency_runs=RUNS)
    root = unpack_bundle(dyn.bundle, tmp_path / "dyn-unpacked", keypair[1]).root
    assert "DynamicQuantizeLinear" in count_ops(root / "model.onnx")
    assert dyn.manifest.quantization["mode"] == "dynamic"


def test_mode_fp16_is_refused(tmp_path: Path) -> None:
    err = _expect(InputError, convert_onnx_model, tiny_mlp(tmp_path / "m.onnx"), tmp_path / "q.onnx", "fp16",
                  np.zeros((1, 1, 16), np.float32), "x", per_channel=True, method="minmax", workdir=tmp_path)
    assert err.message == "fp16 for ONNX is not supported yet"
    assert "trt_fp16 = true" in (err.hint or "")


def test_tensorrt_profile_quantizes_activations_symmetrically(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    profile = load_profile("jetson-orin-nano")
    model = tiny_cnn(tmp_path / "cnn.onnx")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).random((30, 1, 1, 8, 8), dtype=np.float32))
    result = convert(model, profile, str(tmp_path / "c.npy"), tmp_path / "out", keypair[0], latency_runs=RUNS)
    assert any("symmetrically" in n and "TensorRT" in n for n in result.report["notes"])
    root = unpack_bundle(result.bundle, tmp_path / "u", keypair[1]).root
    q = onnx.load(str(root / "model.onnx"))
    weights = {t.name: t for t in q.graph.initializer}
    zero_points = [onnx.numpy_helper.to_array(weights[n.input[2]]) for n in q.graph.node
                   if n.op_type == "QuantizeLinear"]
    assert zero_points and all(np.all(z == 0) for z in zero_points)
    assert result.manifest.quantization["method"] == "entropy"


def test_image_folder_with_labels_file(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    model = tiny_cnn(tmp_path / "cnn.onnx", classes=3)
    rng = np.random.default_rng(5)
    names = ["zero", "one", "two"]  # labels.txt order differs from the sorted folder names
    for name in names:
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(6):
            assert cv2.imwrite(str(tmp_path / "imgs" / name / f"{i}.png"),
                               rng.integers(0, 256, (8, 8), dtype=np.uint8))
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    result = convert(model, x86, str(tmp_path / "imgs"), tmp_path / "out", keypair[0],
                     labels=tmp_path / "labels.txt", latency_runs=RUNS)
    v = result.manifest.validation
    assert v["accuracy_fp32"] is not None and 0 <= v["accuracy_quant"] <= 1
    assert result.manifest.labels == "labels.txt"
    from edge_agent.bundle import unpack_bundle

    unpacked = unpack_bundle(result.bundle, tmp_path / "unpacked", keypair[1])
    assert unpacked.member("labels.txt").read_text().splitlines() == names
    assert result.manifest.preprocessing == {"size": [8, 8], "color": "gray", "layout": "NCHW",
                                             "scale": 1 / 255, "mean": [0.0], "std": [1.0],
                                             "resize_mode": "stretch"}
    assert any("derived from the input shape" in n for n in result.report["notes"])
    (tmp_path / "short.txt").write_text("zero\none\n")
    err = _expect(InputError, convert, model, x86, str(tmp_path / "imgs"), tmp_path / "o2", keypair[0],
                  labels=tmp_path / "short.txt")
    assert "short.txt" in err.message and "2 classes" in err.message
    (tmp_path / "other.txt").write_text("zero\none\nthree\n")
    err = _expect(CalibrationError, convert, model, x86, str(tmp_path / "imgs"), tmp_path / "o3", keypair[0],
                  labels=tmp_path / "other.txt")
    assert "'two'" in err.message


# --------------------------------------------------------------------------------------------------
# quantize_onnx


def test_inspect_reports_specs_and_opset(tmp_path: Path) -> None:
    inputs, outputs, opset = inspect_onnx(tiny_cnn(tmp_path / "c.onnx", batch="N", opset=11))
    assert [(t.name, t.shape, t.dtype) for t in inputs] == [("image", (-1, 1, 8, 8), "float32")]
    assert [(t.name, t.shape) for t in outputs] == [("logits", (-1, 10))]
    assert opset == 11


def test_old_opset_is_upgraded_before_quantization(tmp_path: Path) -> None:
    src = tiny_cnn(tmp_path / "c11.onnx", opset=11, batch="N")
    calib = np.random.default_rng(0).random((10, 1, 1, 8, 8), dtype=np.float32)
    notes = quantize_onnx(src, tmp_path / "q.onnx", calib, "image", per_channel=True, method="minmax",
                          workdir=tmp_path)
    assert any("upgraded from opset 11 to 13" in n for n in notes)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert {o.version for o in q.opset_import if o.domain in ("", "ai.onnx")} == {13}
    assert q.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert "QuantizeLinear" in count_ops(tmp_path / "q.onnx")
    assert not list(tmp_path.glob(".q.onnx.partial"))


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods(tmp_path: Path, method: str) -> None:
    src = tiny_cnn(tmp_path / "c.onnx")
    calib = np.random.default_rng(0).random((16, 1, 1, 8, 8), dtype=np.float32)
    quantize_onnx(src, tmp_path / "q.onnx", calib, "image", per_channel=False, method=method, workdir=tmp_path)
    out = session(tmp_path / "q.onnx").run(None, {"image": calib[0]})[0]
    ref = session(src).run(None, {"image": calib[0]})[0]
    assert out.shape == (1, 10)
    assert float(np.abs(out - ref).max()) < 0.2 * float(np.abs(ref).max())


# --------------------------------------------------------------------------------------------------
# bad inputs


def _calib_npy(path: Path, shape: tuple[int, ...] = (10, 1, 16)) -> str:
    np.save(path, np.zeros(shape, np.float32))
    return str(path)


def test_missing_model(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    err = _expect(ModelError, convert, tmp_path / "nope.onnx", x86, _calib_npy(tmp_path / "c.npy"),
                  tmp_path / "out", keypair[0])
    assert "nope.onnx" in err.message and "does not exist" in err.message


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(2000), b"this is a text file\n"])
def test_not_an_onnx_file(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile, content: bytes) -> None:
    (tmp_path / "fake.onnx").write_bytes(content)
    err = _expect(ModelError, convert, tmp_path / "fake.onnx", x86, _calib_npy(tmp_path / "c.npy"),
                  tmp_path / "out", keypair[0])
    assert "fake.onnx" in err.message and "is not an ONNX model" in err.message
    assert not (tmp_path / "out").exists()


def test_empty_calibration_folder(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    (tmp_path / "calib").mkdir()
    err = _expect(CalibrationError, convert, tiny_mlp(tmp_path / "m.onnx"), x86, str(tmp_path / "calib"),
                  tmp_path / "out", keypair[0])
    assert str(tmp_path / "calib") in err.message


def test_calibration_of_the_wrong_shape(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    err = _expect(CalibrationError, convert, tiny_mlp(tmp_path / "m.onnx"), x86,
                  _calib_npy(tmp_path / "c.npy", (10, 3, 3)), tmp_path / "out", keypair[0])
    assert "c.npy" in err.message and "(10, 3, 3)" in err.message and "(1, 16)" in err.message


def test_onnx_model_with_a_tflite_profile(tmp_path: Path, keypair: tuple[Path, Path]) -> None:
    # ONNX -> TFLite goes through onnx2tf, whose environment is missing here and cannot be built offline
    err = _expect(InputError, convert, tiny_mlp(tmp_path / "m.onnx"), load_profile("rpi4"),
                  _calib_npy(tmp_path / "c.npy"), tmp_path / "out", keypair[0], offline=True,
                  onnx2tf_env=tmp_path / "no-env")
    assert "onnx2tf" in err.message and "cannot be built offline" in err.message


def test_non_onnx_model_with_an_onnx_profile(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    (tmp_path / "m.tflite").write_bytes(b"TFL3")
    err = _expect(InputError, convert, tmp_path / "m.tflite", x86, _calib_npy(tmp_path / "c.npy"),
                  tmp_path / "out", keypair[0])
    assert "m.tflite" in err.message and "x86-64" in err.message


def test_bad_version(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    err = _expect(InputError, convert, tiny_mlp(tmp_path / "m.onnx"), x86, _calib_npy(tmp_path / "c.npy"),
                  tmp_path / "out", keypair[0], version="v1")
    assert "'v1'" in err.message


def test_unknown_profile() -> None:
    err = _expect(ProfileError, load_profile, "nope")
    assert "'nope'" in err.message and "x86-64" in err.message


# --------------------------------------------------------------------------------------------------
# real public models


@pytest.mark.realmodels
def test_opset1_model_is_refused_with_a_reexport_hint(realmodels: Path, tmp_path: Path,
                                                      keypair: tuple[Path, Path], x86: Profile) -> None:
    model = realmodels / "onnx_mnist" / "mnist_opset1_original.onnx"
    err = _expect(ModelError, inspect_onnx, model)
    assert "mnist_opset1_original.onnx" in err.message and "opset 1" in err.message
    assert "re-export the model at opset 13 or newer" in str(err)
    np.save(tmp_path / "c.npy", np.zeros((4, 1, 1, 28, 28), np.float32))
    again = _expect(ModelError, convert, model, x86, str(tmp_path / "c.npy"), tmp_path / "out", keypair[0])
    assert "opset 1" in again.message


def _mnist_references(realmodels: Path) -> tuple[np.ndarray, list[int]]:
    xs = [np.load(realmodels / "onnx_mnist" / "samples" / f"reference_{i}.npz")["inputs"] for i in range(3)]
    return np.stack(xs)[:, None], [5, 0, 4]  # (3, 1, 1, 28, 28)


@pytest.mark.realmodels
def test_mnist_opset8_per_channel_int8(realmodels: Path, tmp_path: Path, keypair: tuple[Path, Path],
                                       x86: Profile) -> None:
    refs, labels = _mnist_references(realmodels)
    # calibration: the three reference digits shifted by up to one pixel (27 real-looking samples)
    shifted = [np.roll(refs, (dy, dx), axis=(-2, -1)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    np.save(tmp_path / "calib.npy", np.concatenate(shifted))
    result = convert(realmodels / "onnx_mnist" / "mnist_opset8.onnx", x86, str(tmp_path / "calib.npy"),
                     tmp_path / "out", keypair[0], name="mnist", latency_runs=RUNS)
    notes = " ".join(result.report["notes"])
    assert "upgraded from opset 8 to 13" in notes
    assert "microsoft/onnxruntime#24815" in notes and "QDQDisableWeightAdjustForInt32Bias" in notes
    assert result.manifest.quantization["per_channel"] is True
    root = unpack_bundle(result.bundle, tmp_path / "u", keypair[1]).root
    sess = session(root / "model.onnx")
    predicted = [int(sess.run(None, {"Input3": x})[0].argmax()) for x in refs]
    assert predicted == labels


@pytest.mark.realmodels
def test_super_resolution_quantizes_and_runs(realmodels: Path, tmp_path: Path) -> None:
    src = realmodels / "super_resolution" / "super_resolution.onnx"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:224, 0:224]

    def smooth(fy: float, fx: float, phase: float) -> np.ndarray:
        img = 0.5 + 0.4 * np.sin(xx / fx + phase) * np.cos(yy / fy)
        return img.astype(np.float32)[None, None]

    calib = np.stack([smooth(*rng.uniform(5, 40, 2), rng.uniform(0, 6)) for _ in range(8)])
    notes = quantize_onnx(src, tmp_path / "sr.onnx", calib, "input", per_channel=True, method="minmax",
                          workdir=tmp_path)
    text = " ".join(notes)
    assert "batch axis of input 'input' was fixed to 1" in text
    assert "listed as graph inputs were made constants" in text
    assert "upgraded from opset 10 to 13" in text
    assert "QuantizeLinear" in count_ops(tmp_path / "sr.onnx")
    test = smooth(17.0, 11.0, 1.0)
    out = session(tmp_path / "sr.onnx").run(None, {"input": test})[0]
    ref = session(src).run(None, {"input": test})[0]
    assert out.shape == (1, 1, 672, 672)
    assert float(np.abs(out - ref).mean()) < 0.03


# --------------------------------------------------------------------------------------------------
# the demo model


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return build_digits(tmp_path_factory)


def _accuracy(model: Path, x: np.ndarray, y: np.ndarray) -> float:
    sess = session(model)
    predicted = np.array([int(sess.run(None, {"image": s[None]})[0].argmax()) for s in x])
    return float(np.mean(predicted == y))


@pytest.mark.slow
def test_digits_model_to_x86_int8_bundle(digits: tuple[Path, dict], tmp_path: Path,
                                         keypair: tuple[Path, Path], x86: Profile) -> None:
    folder, summary = digits
    assert summary["onnx_vs_keras_max_abs_diff"] <= 1e-4
    assert summary["onnx_test_accuracy"] >= 0.9
    assert sorted(p.name for p in (folder / "calib").iterdir()) == [str(c) for c in range(10)]
    result = convert(folder / "digits_fp32.onnx", x86, str(folder / "calib"), tmp_path / "out", keypair[0],
                     name="digits", labels=folder / "labels.txt", latency_runs=RUNS)
    v = result.manifest.validation
    assert v["top1_agreement"] >= 0.95
    assert v["quant_size_bytes"] < v["fp32_size_bytes"]
    root = unpack_bundle(result.bundle, tmp_path / "u", keypair[1]).root
    with np.load(folder / "test.npz") as test:
        x, y = test["x"], test["y"]
    acc_fp32 = _accuracy(folder / "digits_fp32.onnx", x, y)
    acc_int8 = _accuracy(root / "model.onnx", x, y)
    assert acc_fp32 == pytest.approx(summary["onnx_test_accuracy"])
    assert abs(acc_fp32 - acc_int8) <= 0.02
