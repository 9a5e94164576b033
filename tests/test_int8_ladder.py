"""ONNX static INT8 in depth and the accuracy gate, end to end with real onnxruntime quantization.

The acceptance case: ``tests/int8_models.outlier_mlp`` breaks int8 (one hidden unit with a x1e4 activation
outlier sets the per-tensor scale of its whole activation, so the other units round to zero). The gate
catches it; per-tensor weights and the other calibration methods do not help; keeping the layers around
that activation in float does (rung ``float_layers_1``). With ``--no-ladder``, or a gate nothing can meet,
`edgekit convert` exits 1 with the table of what was tried and writes no bundle.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest

from converters.calibration import Samples
from converters.cli import main
from converters.convert import ConvertResult, Overrides, _within_memory, convert
from converters.onnx_int8 import (
    _quantize_static,
    activation_bytes,
    calibration_chunk,
    layer_errors,
    prepare_static,
    quantize_onnx,
    session,
)
from converters.validate import compare_outputs, onnx_outputs
from edge_agent.bundle import unpack_bundle
from edge_agent.errors import ConversionError, GateError, InputError
from edge_agent.profiles import Profile, load_profile
from tests.int8_models import outlier_mlp
from tests.models import tiny_cnn, tiny_mlp

RUNS = 10
OUTLIER_NODES = {"relu2", "fc2_matmul/MatMulAddFusion", "fc3_matmul/MatMulAddFusion"}


def _with(profile: Profile, **quantization: object) -> Profile:
    return dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, **quantization))


@pytest.fixture(scope="module")
def x86() -> Profile:
    return load_profile("x86-64")


@pytest.fixture(scope="module")
def outlier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the outlier MLP, a .npy of 300 samples)."""
    d = tmp_path_factory.mktemp("outlier")
    model = outlier_mlp(d / "outlier.onnx")
    np.save(d / "calib.npy", np.random.default_rng(1).normal(size=(300, 1, 16)).astype(np.float32))
    return model, d / "calib.npy"


@pytest.fixture(scope="module")
def fixed(outlier: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path],
          x86: Profile) -> ConvertResult:
    model, calib = outlier
    steps: list[str] = []
    result = convert(model, x86, str(calib), tmp_path_factory.mktemp("fixed"), keypair[0], latency_runs=RUNS,
                     progress=steps.append)
    assert [s for s in steps if not s.startswith("ladder: ")] == [
        "inspect", "calibration", "quantize", "validate", "ladder", "golden", "package"]
    assert "ladder: per_tensor (per-tensor, minmax)" in steps
    return result


# --------------------------------------------------------------------------------------------------
# acceptance: the gate catches the outlier model and the ladder fixes it


def test_the_gate_catches_the_outlier_and_a_rung_fixes_it(fixed: ConvertResult) -> None:
    ladder = fixed.report["ladder"]
    assert ladder["ran"] is True and ladder["passed_rung"] == "float_layers_1"
    rows = {a["rung"]: a for a in ladder["attempts"]}
    assert list(rows) == ["initial", "per_tensor", "method_entropy", "method_percentile", "float_layers_1"]
    for rung in ("initial", "per_tensor", "method_entropy", "method_percentile"):
        assert rows[rung]["passed"] is False and rows[rung]["value"] < 0.9, rung
        assert rows[rung]["metric"] == "top1_agreement" and rows[rung]["threshold"] == 0.99
    assert rows["per_tensor"]["settings"]["per_channel"] is False
    assert rows["method_entropy"]["settings"]["method"] == "entropy"
    win = rows["float_layers_1"]
    assert win["passed"] is True and win["value"] >= 0.99
    assert set(win["settings"]["float_layers"]) == OUTLIER_NODES
    assert all(a["seconds"] > 0 for a in ladder["attempts"])
    worst = ladder["worst_layers"][0]
    assert worst["name"] == "act2" and worst["error_db"] < 10 and set(worst["nodes"]) == OUTLIER_NODES
    assert all(w["error_db"] > 30 for w in ladder["worst_layers"][1:])


def test_the_bundle_meets_the_gate_and_says_which_rung_passed(fixed: ConvertResult) -> None:
    v = fixed.manifest.validation
    assert v["gate"] == {"passed": True, "metric": "top1_agreement", "value": v["top1_agreement"],
                         "threshold": 0.99}
    assert v["ladder_rung"] == "float_layers_1" and v["top1_agreement"] >= 0.99
    assert v["snr_db"] > 20
    q = fixed.manifest.quantization
    assert set(q["float_nodes"]) == OUTLIER_NODES and q["per_channel"] is True and q["method"] == "minmax"
    assert fixed.report["gate"]["passed"] is True and "top-1 agreement" in fixed.report["gate"]["reason"]
    notes = " ".join(fixed.report["notes"])
    assert "failed the accuracy gate" in notes and "rung 'float_layers_1'" in notes
    assert set(fixed.report["timings_s"]) == {"inspect", "calibration", "quantize", "validate", "ladder",
                                              "golden", "package"}


def test_the_bundled_model_keeps_those_nodes_in_float(fixed: ConvertResult, keypair: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    root = unpack_bundle(fixed.bundle, tmp_path / "u", keypair[1]).root
    model = onnx.load(str(root / "model.onnx"))
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    weights = {t.name for t in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node}
    for name in ("fc3_matmul/MatMulAddFusion", "relu2"):
        assert not [i for i in by_name[name].input if i in dq_outputs and i not in weights], name
    assert by_name["relu2"].op_type == "Relu"  # kept, not folded into a QDQ pair
    fc3_weight = by_name["fc3_matmul/MatMulAddFusion"].input[1]
    assert fc3_weight in weights  # float weight, not a DequantizeLinear output
    # the other layers are still int8
    fc4 = by_name["fc4_matmul/MatMulAddFusion"]
    assert fc4.input[0] in dq_outputs and fc4.input[1] in dq_outputs
    inside = json.loads((root / "report.json").read_text())
    assert inside["ladder"]["passed_rung"] == "float_layers_1"


def test_no_ladder_is_exit_1_with_the_table_and_no_bundle(outlier: tuple[Path, Path], tmp_path: Path,
                                                          keypair: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, calib = outlier
    args = ["convert", str(model), "--profile", "x86-64", "--calib", str(calib), "--out", str(tmp_path / "out"),
            "--key", str(keypair[0]), "--threads", "1", "--no-ladder"]
    assert main(args) == 1
    _, err = capsys.readouterr()
    assert "failed the accuracy gate (top1_agreement >= 0.99)" in err and "recovery ladder is off" in err
    assert "no bundle was written" in err
    table = err[err.index("  rung"):]
    assert table.splitlines()[1].split()[:3] == ["initial", "per-channel,", "minmax"]
    assert "worst layers" in err and "act2:" in err and "--gate-agreement" in err
    assert not list((tmp_path / "out").glob("*.edgebundle"))
    assert main([*args, "--json"]) == 1
    out, _ = capsys.readouterr()
    data = json.loads(out)
    assert data["error"] == "GateError"
    assert [a["rung"] for a in data["attempts"]] == ["initial"]
    assert data["attempts"][0]["passed"] is False and data["attempts"][0]["value"] < 0.99
    assert data["worst_layers"][0]["name"] == "act2"
    assert set(data["worst_layers"][0]["nodes"]) == OUTLIER_NODES
    assert not list((tmp_path / "out").glob("*.edgebundle"))


def test_a_gate_nothing_meets_is_refused_with_every_rung(tmp_path: Path, keypair: tuple[Path, Path],
                                                         x86: Profile) -> None:
    """A regression model (one output value: no class scores, so SNR decides) against a 120 dB gate."""
    model = tiny_mlp(tmp_path / "reg.onnx", classes=1)
    np.save(tmp_path / "c.npy", np.random.default_rng(0).normal(size=(60, 1, 16)).astype(np.float32))
    with pytest.raises(GateError) as info:
        convert(model, x86, str(tmp_path / "c.npy"), tmp_path / "out", keypair[0], latency_runs=RUNS,
                overrides=Overrides(gate_snr_db=120.0))
    e = info.value
    assert e.exit_code == 1 and isinstance(e, ConversionError)
    rungs = [a["rung"] for a in e.attempts]
    assert rungs[:4] == ["initial", "per_tensor", "method_entropy", "method_percentile"]
    assert rungs[-1] == "float_layers" and e.attempts[-1]["error"].startswith("stopped:")
    assert all(a["metric"] == "snr_db" and a["passed"] is False for a in e.attempts if a["metric"])
    assert "no rung of the recovery ladder passed it" in e.message and "snr_db >= 120.0" in e.message
    assert "--gate-snr" in (e.hint or "")
    assert e.worst_layers and all("error_db" in w for w in e.worst_layers)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_model_that_passes_first_time_has_no_ladder(tmp_path: Path, keypair: tuple[Path, Path],
                                                      x86: Profile) -> None:
    model = tiny_mlp(tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", np.random.default_rng(0).normal(size=(80, 1, 16)).astype(np.float32))
    result = convert(model, x86, str(tmp_path / "c.npy"), tmp_path / "out", keypair[0], latency_runs=RUNS,
                     overrides=Overrides(gate_agreement=0.9))
    assert result.report["ladder"] == {"ran": False, "passed_rung": "initial",
                                       "attempts": [result.report["ladder"]["attempts"][0]]}
    assert result.manifest.validation["ladder_rung"] == "initial"
    assert result.manifest.validation["gate"]["threshold"] == 0.9
    assert any("--gate-agreement sets quantization.gate_min_agreement = 0.9" in n for n in result.report["notes"])


# --------------------------------------------------------------------------------------------------
# per-layer errors


def test_layer_errors_rank_the_outlier_activation_first(outlier: tuple[Path, Path], tmp_path: Path) -> None:
    model, calib = outlier
    x = np.load(calib)
    prepared = prepare_static(model, tmp_path)
    assert prepared.nodes["relu2"] == "Relu"  # unnamed nodes would be named <op>_<index>
    quantize_onnx(model, tmp_path / "q.onnx", x[:100], "x", per_channel=True, method="minmax", workdir=tmp_path)
    ranking = layer_errors(prepared, tmp_path / "q.onnx", x[100:], "x", tmp_path)
    assert ranking[0].name == "act2" and ranking[0].error_db < 5
    assert "onnxruntime qdq_err" in ranking[0].detail and "xmodel_err" in ranking[0].detail
    assert {r.name for r in ranking} >= {"x", "act1", "act2", "act3", "logits"}
    assert [r.error_db for r in ranking] == sorted(r.error_db for r in ranking)


def test_unnamed_nodes_are_named_for_exclusion(tmp_path: Path) -> None:
    prepared = prepare_static(tiny_cnn(tmp_path / "c.onnx"), tmp_path)
    assert all(prepared.nodes)  # tiny_cnn's nodes have no names in the file
    assert any("unnamed node(s)" in n for n in prepared.notes)


# --------------------------------------------------------------------------------------------------
# exclusions


def _qdq_fed(model: Path) -> dict[str, bool]:
    """node name -> whether any activation input comes out of a DequantizeLinear."""
    m = onnx.load(str(model))
    producers = {o: n.op_type for n in m.graph.node for o in n.output}
    weights = {t.name for t in m.graph.initializer}
    result = {}
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        fed = False
        for i in n.input[:1]:  # the activation input (weights come second)
            fed = fed or (i not in weights and producers.get(i) == "DequantizeLinear")
        result[n.name] = fed
    return result


def test_exclude_nodes_and_op_types_stay_float(tmp_path: Path) -> None:
    src = tiny_cnn(tmp_path / "c.onnx")
    calib = np.random.default_rng(0).random((12, 1, 1, 8, 8), dtype=np.float32)
    base = _qdq_fed(_quantized(src, calib, tmp_path / "a"))
    assert base["Conv_0"] and any(fed for name, fed in base.items() if name != "Conv_0")
    notes = quantize_onnx(src, tmp_path / "b.onnx", calib, "image", per_channel=True, method="minmax",
                          workdir=_mk(tmp_path / "b"), exclude_nodes=("Conv_0",))
    fed = _qdq_fed(tmp_path / "b.onnx")
    assert fed["Conv_0"] is False
    assert any("nodes kept in float: Conv_0" in n for n in notes)
    weights = {t.name for t in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    conv = next(n for n in onnx.load(str(tmp_path / "b.onnx")).graph.node if n.name == "Conv_0")
    assert conv.input[1] in weights  # the float weight itself
    notes = quantize_onnx(src, tmp_path / "c.onnx", calib, "image", per_channel=True, method="minmax",
                          workdir=_mk(tmp_path / "c"), exclude_op_types=("Conv", "Softmax"))
    assert _qdq_fed(tmp_path / "c.onnx")["Conv_0"] is False
    assert any("op types kept in float (exclude_op_types): Conv" in n for n in notes)
    assert any("Softmax, which the model does not use" in n for n in notes)


def _mk(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    return d


def _quantized(src: Path, calib: np.ndarray, d: Path) -> Path:
    quantize_onnx(src, d.with_suffix(".onnx"), calib, "image", per_channel=True, method="minmax", workdir=_mk(d))
    return d.with_suffix(".onnx")


def test_unknown_or_fused_node_names_are_input_errors(outlier: tuple[Path, Path], tmp_path: Path) -> None:
    model, calib = outlier
    x = np.load(calib)[:10]
    with pytest.raises(InputError) as info:
        quantize_onnx(model, tmp_path / "q.onnx", x, "x", per_channel=True, method="minmax", workdir=tmp_path,
                      exclude_nodes=("nope",))
    assert "no node named 'nope'" in info.value.message and "'relu2'" in (info.value.hint or "")
    with pytest.raises(InputError) as info:
        quantize_onnx(model, tmp_path / "q.onnx", x, "x", per_channel=True, method="minmax", workdir=tmp_path,
                      exclude_nodes=("fc2_matmul",))
    assert "pre-processing fused or renamed it" in info.value.message
    assert "'fc2_matmul/MatMulAddFusion'" in (info.value.hint or "")


# --------------------------------------------------------------------------------------------------
# memory bound


@pytest.mark.parametrize(("per_sample", "bound", "count", "chunk"), [
    (100, 10_000, 50, 50),  # everything fits: one pass
    (100, 1_000, 50, 10),  # 10 fit, and 10 divides 50
    (100, 1_200, 50, 10),  # 12 fit, the largest divisor of 50 up to 12 is 10
    (100, 1_000, 53, 1),  # a prime count: one sample per pass
    (100, 50, 40, 1),  # not even one fits: one at a time
    (0, 1, 7, 7),  # nothing held per sample
])
def test_calibration_chunk(per_sample: int, bound: int, count: int, chunk: int) -> None:
    got = calibration_chunk(per_sample, bound, count)
    assert got == chunk
    assert count % got == 0 and (got == 1 or got * per_sample <= bound)


def test_calibration_chunk_needs_samples() -> None:
    with pytest.raises(ValueError):
        calibration_chunk(1, 1, 0)


def test_activation_bytes_counts_every_float_activation(tmp_path: Path) -> None:
    prepared = prepare_static(tiny_cnn(tmp_path / "c.onnx"), tmp_path)
    total, unknown = activation_bytes(prepared.path)
    # image 64 + conv 8x64 + relu 8x64 + pool 8 + flatten 8 + logits 10 floats
    assert (total, unknown) == (4 * (64 + 512 + 512 + 8 + 8 + 10), 0)


@pytest.mark.parametrize("method", ["minmax", "entropy"])
def test_the_calibrator_is_fed_one_chunk_at_a_time_without_losing_ranges(tmp_path: Path, method: str) -> None:
    src = tiny_cnn(tmp_path / "c.onnx")
    prepared = prepare_static(src, tmp_path)
    calib = np.random.default_rng(0).random((24, 1, 1, 8, 8), dtype=np.float32)
    calib[0] *= 40  # the extreme sample comes first: a chunked calibration that dropped chunks would lose it
    one = _quantize_static(prepared.path, tmp_path / "one.onnx", calib, "image", True, method, False, [])
    chunked = _quantize_static(prepared.path, tmp_path / "chunked.onnx", calib, "image", True, method, False, [],
                               chunk=6)
    assert one.most_held == 24 and chunked.most_held == 6
    scale = {p.name: _input_scale(p) for p in (tmp_path / "one.onnx", tmp_path / "chunked.onnx")}
    if method == "minmax":  # min/max merge exactly across chunks
        assert scale["chunked.onnx"] == scale["one.onnx"] == pytest.approx(40 / 255, rel=0.05)
    else:
        assert scale["chunked.onnx"] == pytest.approx(scale["one.onnx"], rel=0.5)


def _input_scale(model: Path) -> float:
    m = onnx.load(str(model))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "image")
    return float(inits[q.input[1]])


def test_a_small_memory_bound_streams_calibration_and_says_so(tmp_path: Path) -> None:
    src = tiny_cnn(tmp_path / "c.onnx")
    calib = np.random.default_rng(0).random((20, 1, 1, 8, 8), dtype=np.float32)
    notes = quantize_onnx(src, tmp_path / "q.onnx", calib, "image", per_channel=True, method="entropy",
                          workdir=tmp_path, max_memory_mb=0)  # 0 MB: one sample per pass
    text = " ".join(notes)
    assert "streamed 20 samples to onnxruntime's calibrator in 20 passes of 1" in text
    assert "histograms are merged across passes" in text
    out = session(tmp_path / "q.onnx").run(None, {"image": calib[0]})[0]
    assert out.shape == (1, 10)


def test_calibration_samples_are_capped_by_the_memory_bound() -> None:
    one_mb = 2**20 // 4  # float32 values in 1 MB
    cal = Samples(np.arange(5 * one_mb, dtype=np.float32).reshape(5, 1, one_mb), None, "5 samples", None)
    notes: list[str] = []
    kept = _within_memory(cal, 3, seed=0, notes=notes)
    assert len(kept) == 3 and kept.arrays.nbytes <= 3 * 2**20
    assert "calibration used 3 of the 5 samples drawn" in notes[0] and "max_calibration_memory_mb = 3" in notes[0]
    assert _within_memory(cal, 5, seed=0, notes=notes) is cal and len(notes) == 1


# --------------------------------------------------------------------------------------------------
# --val: a validation source separate from --calib


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("val")
    model = tiny_mlp(d / "m.onnx")
    np.save(d / "calib.npy", np.random.default_rng(0).normal(size=(40, 1, 16)).astype(np.float32))
    return model, d


def _labelled(model: Path, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=(n, 1, 16)).astype(np.float32)
    sess = session(model)
    return x, np.array([int(sess.run(None, {"x": s})[0].argmax()) for s in x])


def _convert(model: Path, d: Path, keypair: tuple[Path, Path], x86: Profile, out: str,
             **kw: object) -> ConvertResult:
    return convert(model, x86, str(d / "calib.npy"), d / out, keypair[0], latency_runs=RUNS,
                   overrides=Overrides(gate_agreement=0.5, gate_accuracy=0.5), **kw)  # type: ignore[arg-type]


def test_without_val_the_split_is_said(mlp: tuple[Path, Path], keypair: tuple[Path, Path], x86: Profile) -> None:
    model, d = mlp
    r = _convert(model, d, keypair, x86, "split")
    assert any("validation split from the calibration source (seed 0): 1 of its 40 samples validate, 39 "
               "calibrate" in n for n in r.report["notes"])
    assert r.report["calibration"]["validation_source"] == "split from the calibration source"


def test_val_npz_with_labels(mlp: tuple[Path, Path], keypair: tuple[Path, Path], x86: Profile) -> None:
    model, d = mlp
    x, y = _labelled(model, 30, 5)
    np.savez(d / "val.npz", x=x, y=y)
    r = _convert(model, d, keypair, x86, "npz", val=str(d / "val.npz"))
    v = r.report["validation"]
    assert v["samples"] == 30 and v["accuracy_fp32"] == 1.0  # the labels are the fp32 argmax
    assert r.report["gate"]["metric"] == "accuracy_ratio"
    assert r.report["calibration"]["count"] == 40  # all of --calib calibrates
    assert "30 samples from" in r.report["calibration"]["validation_source"]
    assert not any("validation split" in n for n in r.report["notes"])


def test_val_csv_with_a_label_column_and_an_npy_calib(mlp: tuple[Path, Path], keypair: tuple[Path, Path],
                                                      x86: Profile) -> None:
    model, d = mlp
    x, y = _labelled(model, 12, 6)
    rows = ["label," + ",".join(f"f{i}" for i in range(16))]
    rows += [f"{lab}," + ",".join(f"{v:.6f}" for v in row[0]) for lab, row in zip(y, x, strict=True)]
    (d / "val.csv").write_text("\n".join(rows) + "\n")
    r = _convert(model, d, keypair, x86, "csv", val=str(d / "val.csv"), label_column="label")
    assert r.report["validation"]["samples"] == 12 and r.report["validation"]["accuracy_fp32"] == 1.0
    assert "labels from column 0 'label'" in r.report["calibration"]["validation_source"]


def test_val_folder_of_npy_without_labels_uses_fp32_as_reference(
        mlp: tuple[Path, Path], keypair: tuple[Path, Path], x86: Profile) -> None:
    model, d = mlp
    (d / "valdir").mkdir()
    for i, s in enumerate(np.random.default_rng(7).normal(size=(9, 16)).astype(np.float32)):
        np.save(d / "valdir" / f"{i}.npy", s)
    r = _convert(model, d, keypair, x86, "dir", val=str(d / "valdir"))
    assert r.report["validation"]["samples"] == 9 and r.report["validation"]["accuracy_fp32"] is None
    assert r.report["gate"]["metric"] == "top1_agreement"
    assert any("has no labels: the fp32 model's outputs are the reference" in n for n in r.report["notes"])


def test_val_images_in_class_folders(tmp_path: Path, keypair: tuple[Path, Path], x86: Profile) -> None:
    model = tiny_cnn(tmp_path / "cnn.onnx", classes=3)
    rng = np.random.default_rng(5)
    for root, n in (("calib", 4), ("val", 3)):
        for name in ("a", "b", "c"):
            (tmp_path / root / name).mkdir(parents=True)
            for i in range(n):
                assert cv2.imwrite(str(tmp_path / root / name / f"{i}.png"),
                                   rng.integers(0, 256, (8, 8), dtype=np.uint8))
    r = convert(model, x86, str(tmp_path / "calib"), tmp_path / "out", keypair[0], latency_runs=RUNS,
                val=str(tmp_path / "val"), overrides=Overrides(gate_accuracy=0.0))
    v = r.report["validation"]
    assert v["samples"] == 9 and v["accuracy_fp32"] is not None
    assert "labels from 3 class subfolders" in r.report["calibration"]["validation_source"]
    assert r.report["calibration"]["count"] == 12


def test_val_of_the_wrong_shape_is_an_input_error(mlp: tuple[Path, Path], keypair: tuple[Path, Path],
                                                  x86: Profile) -> None:
    model, d = mlp
    np.save(d / "bad.npy", np.zeros((4, 3, 3), np.float32))
    with pytest.raises(InputError) as info:
        _convert(model, d, keypair, x86, "bad", val=str(d / "bad.npy"))
    assert "bad.npy" in info.value.message


# --------------------------------------------------------------------------------------------------
# command-line options


def test_cli_options_reach_the_quantizer(outlier: tuple[Path, Path], tmp_path: Path, keypair: tuple[Path, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    model, calib = outlier
    code = main(["convert", str(model), "--profile", "x86-64", "--calib", str(calib), "--out", str(tmp_path),
                 "--key", str(keypair[0]), "--threads", "1", "--per-tensor", "--calib-method", "percentile",
                 "--exclude-nodes", "relu2,fc2_matmul/MatMulAddFusion,fc3_matmul/MatMulAddFusion",
                 "--exclude-op-types", "Softmax", "--gate-agreement", "0.95", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    summary = json.loads(out)
    assert summary["ladder"]["ran"] is False  # the user's float nodes already fix it
    assert summary["validation"]["gate"]["threshold"] == 0.95 and summary["validation"]["gate"]["passed"]
    report = json.loads((unpack_bundle(Path(summary["bundle"]), tmp_path / "u", keypair[1]).root
                         / "report.json").read_text())
    q = report["quantization"]
    assert (q["per_channel"], q["method"], set(q["float_nodes"]), q["exclude_op_types"]) == (
        False, "percentile", OUTLIER_NODES, ["Softmax"])
    notes = " ".join(report["notes"])
    assert "--calib-method sets quantization.calibration_method = 'percentile'" in notes
    assert "--per-channel/--per-tensor sets quantization.per_channel = False" in notes


def test_cli_rejects_a_gate_outside_0_1(tmp_path: Path, keypair: tuple[Path, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_mlp(tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", np.zeros((8, 1, 16), np.float32))
    code = main(["convert", str(model), "--profile", "x86-64", "--calib", str(tmp_path / "c.npy"), "--out",
                 str(tmp_path / "o"), "--key", str(keypair[0]), "--gate-accuracy", "1.5"])
    assert code == 2 and "--gate-accuracy 1.5 must be between 0 and 1" in capsys.readouterr().err


def test_compare_outputs_unchanged_for_existing_keys(outlier: tuple[Path, Path]) -> None:
    model, calib = outlier
    x = np.load(calib)[:5]
    names, outs = onnx_outputs(model, x, 1, "fp32")
    r = compare_outputs(outs, outs, names)["logits"]
    assert set(r) == {"top1_agreement", "max_abs_error", "mean_abs_error", "fp32_abs_max", "snr_db"}
