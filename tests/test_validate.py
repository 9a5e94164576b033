"""fp32 vs quantized validation with real onnxruntime sessions on tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from converters.calibration import Samples
from converters.onnx_int8 import quantize_onnx, session
from converters.validate import compare_onnx, compare_outputs, host_cpu, interleaved_latency
from tests.models import tiny_cnn


@pytest.fixture(scope="session")
def cnn_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Samples]:
    """A tiny CNN, its int8 QDQ model, and 30 labelled validation samples (labels = fp32 argmax)."""
    d = tmp_path_factory.mktemp("validate")
    fp32 = tiny_cnn(d / "cnn.onnx")
    rng = np.random.default_rng(3)
    calib = rng.random((40, 1, 1, 8, 8), dtype=np.float32)
    work = d / "work"
    work.mkdir()
    quantize_onnx(fp32, d / "cnn_int8.onnx", calib, "image", per_channel=True, method="minmax", workdir=work)
    x = rng.random((30, 1, 1, 8, 8), dtype=np.float32)
    sess = session(fp32)
    labels = np.array([int(sess.run(None, {"image": s})[0].argmax()) for s in x])
    return fp32, d / "cnn_int8.onnx", Samples(x, labels, "30 random images", None)


def test_compare_reports_every_figure(cnn_pair: tuple[Path, Path, Samples]) -> None:
    fp32, quant, val = cnn_pair
    r = compare_onnx(fp32, quant, val, threads=1, warmup=2, runs=30)
    assert r["fp32_size_bytes"] == fp32.stat().st_size > 0
    assert r["quant_size_bytes"] == quant.stat().st_size > 0
    assert r["size_ratio"] == pytest.approx(r["quant_size_bytes"] / r["fp32_size_bytes"])
    assert r["samples"] == 30
    out = r["outputs"]["logits"]
    assert 0.0 <= out["top1_agreement"] <= 1.0
    assert 0.0 < out["mean_abs_error"] <= out["max_abs_error"]
    # labels are the fp32 argmax, so fp32 accuracy is exactly 1 and int8 accuracy equals the agreement
    assert r["accuracy_fp32"] == 1.0
    assert r["accuracy_quant"] == pytest.approx(out["top1_agreement"])
    assert r["fp32_p50_ms"] > 0 and r["quant_p50_ms"] > 0
    assert r["speedup"] == pytest.approx(r["fp32_p50_ms"] / r["quant_p50_ms"])
    assert r["latency"]["runs"] == 30 and r["latency"]["warmup"] == 2
    assert r["host"]["threads"] == 1
    assert r["host"]["onnxruntime"] == onnxruntime.__version__
    assert r["host"]["cpu"]


def test_same_model_agrees_exactly(cnn_pair: tuple[Path, Path, Samples]) -> None:
    fp32, _, val = cnn_pair
    unlabelled = Samples(val.arrays[:5], None, "5 images", None)
    r = compare_onnx(fp32, fp32, unlabelled, threads=1, warmup=0, runs=4)
    out = r["outputs"]["logits"]
    assert out["top1_agreement"] == 1.0 and out["max_abs_error"] == 0.0
    assert r["accuracy_fp32"] is None and r["accuracy_quant"] is None
    assert r["size_ratio"] == 1.0


def test_compare_outputs_agreement_only_for_score_vectors() -> None:
    a = np.array([[[0.1, 0.9]], [[0.8, 0.2]], [[0.3, 0.7]], [[0.6, 0.4]]], np.float32)  # (4, 1, 2)
    b = np.array([[[0.2, 0.8]], [[0.1, 0.9]], [[0.3, 0.7]], [[0.6, 0.5]]], np.float32)
    image_a = np.zeros((4, 1, 3, 3), np.float32)
    image_b = image_a + 0.5
    r = compare_outputs([a, image_a], [b, image_b], ["scores", "image"])
    assert r["scores"]["top1_agreement"] == 0.75
    assert r["scores"]["max_abs_error"] == pytest.approx(0.7)
    assert r["scores"]["fp32_abs_max"] == pytest.approx(0.9)
    assert r["image"]["top1_agreement"] is None  # argmax over an image row is meaningless
    assert r["image"]["mean_abs_error"] == pytest.approx(0.5)


class _Recorder:
    """Stands in for an onnxruntime session to record the call order of the interleaved run."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def run(self, outputs: None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.log.append(self.name)
        return [feed["x"]]


def test_interleaved_latency_excludes_warmup_and_alternates_blocks() -> None:
    log: list[str] = []
    a, b = _Recorder("a", log), _Recorder("b", log)
    samples = interleaved_latency([a, b], "x", np.zeros((3, 1, 2), np.float32), warmup=5, runs=50)
    assert [len(s) for s in samples] == [50, 50]
    assert all(isinstance(v, int) and v >= 0 for v in samples[0])
    timed = log[10:]
    assert log[:10] == ["a"] * 5 + ["b"] * 5
    assert timed[:40] == ["a"] * 20 + ["b"] * 20  # block 1: a first
    assert timed[40:80] == ["b"] * 20 + ["a"] * 20  # block 2: b first
    assert timed[80:] == ["a"] * 10 + ["b"] * 10  # last, shorter block


def test_host_cpu_reads_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 1.00GHz\n")
    assert host_cpu(info) == "Test CPU @ 1.00GHz"
    assert host_cpu(tmp_path / "missing")  # falls back to the platform module, never empty
