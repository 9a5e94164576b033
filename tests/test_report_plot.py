"""converters/report_plot.py: the report's PNG next to the bundle, labelled (per-class accuracy) and unlabelled
(error histogram), and the figures converters/validate.py keeps for it."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from converters.cli import main
from converters.report_plot import DPI, SIZE_IN, plot_report, title
from converters.validate import error_histogram, per_class_accuracy
from edge_agent.errors import ConversionError
from tests.models import tiny_mlp

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path: Path) -> None:
    from matplotlib import image

    assert path.read_bytes()[:8] == PNG_MAGIC
    pixels = image.imread(str(path))
    assert pixels.shape[:2] == (round(SIZE_IN[1] * DPI), round(SIZE_IN[0] * DPI))
    assert float(pixels[..., :3].std()) > 0.01  # something was drawn


def test_error_histogram_is_small_and_counts_every_value() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 1, 10)).astype(np.float32)
    b = a + rng.normal(scale=0.01, size=a.shape).astype(np.float32)
    b[0, 0, :3] = a[0, 0, :3]  # three exact values
    h = error_histogram(a, b)
    assert len(h["edges"]) == 31 and len(h["counts"]) == 30
    assert h["zero"] == 3 and h["non_finite"] == 0 and h["total"] == 500
    assert sum(h["counts"]) + h["zero"] == 500
    assert all(x < y for x, y in zip(h["edges"], h["edges"][1:], strict=False))
    same = error_histogram(a, a)
    assert same["edges"] == [] and same["zero"] == 500


def test_per_class_accuracy() -> None:
    fp32 = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]][:, None]  # predicts 0, 1, 2, 2
    quant = np.eye(3, dtype=np.float32)[[0, 2, 2, 1]][:, None]  # predicts 0, 2, 2, 1
    pc = per_class_accuracy(fp32, quant, np.array([0, 1, 2, 2]))
    assert pc == {"classes": 3, "count": [1, 1, 2], "accuracy_fp32": [1.0, 1.0, 1.0],
                  "accuracy_quant": [1.0, 0.0, 0.5]}
    assert per_class_accuracy(fp32, quant, np.array([0, 0, 2, 2]))["accuracy_fp32"][1] is None


def _report(**validation: object) -> dict:
    return {"name": "m", "version": "1.2.3", "profile": "rpi5",
            "gate": {"passed": True, "metric": "top1_agreement", "value": 0.995, "threshold": 0.99},
            "validation": {"samples": 40, **validation}}


def test_unlabelled_report_plots_error_histograms(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 1, 8)).astype(np.float32)
    hists = {"logits": error_histogram(a, a + rng.normal(scale=0.02, size=a.shape)),
             "exact": error_histogram(a, a)}
    png = plot_report(_report(error_histograms=hists, per_class=None), tmp_path / "m-1.2.3-rpi5.png")
    assert png == tmp_path / "m-1.2.3-rpi5.png"
    _check_png(png)
    assert [p.name for p in tmp_path.iterdir()] == [png.name]  # no temporary file left


def test_labelled_report_plots_per_class_accuracy(tmp_path: Path) -> None:
    pc = {"classes": 60, "count": [3] * 60, "accuracy_fp32": [1.0] * 60,
          "accuracy_quant": [1.0 - (i % 7) / 10 for i in range(60)]}  # more classes than are shown
    png = plot_report(_report(per_class=pc, error_histograms={}), tmp_path / "p.png",
                      labels=[f"class{i}" for i in range(60)])
    _check_png(png)


def test_title_and_nothing_to_plot(tmp_path: Path) -> None:
    assert title(_report()) == "m 1.2.3 for rpi5: gate passed (top1_agreement 0.995 vs 0.99)"
    failed = {**_report(), "gate": {"passed": False, "metric": "snr_db", "value": 3.0, "threshold": 20}}
    assert "gate FAILED (snr_db 3 vs 20)" in title(failed)
    with pytest.raises(ConversionError, match="neither per-class accuracies nor error histograms"):
        plot_report(_report(), tmp_path / "x.png")


def test_cli_writes_the_png_next_to_the_bundle_not_inside(tmp_path: Path, keypair: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_mlp(tmp_path / "mlp.onnx", in_features=16, classes=4)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=rng.integers(0, 4, size=120))
    (tmp_path / "labels.txt").write_text("a\nb\nc\nd\n")
    code = main(["convert", str(model), "--profile", "x86-64", "--calib", str(tmp_path / "data.npz"), "--labels",
                 str(tmp_path / "labels.txt"), "--out", str(tmp_path / "out"), "--key", str(keypair[0]),
                 "--threads", "1", "--gate-accuracy", "0.5", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    bundle, png = Path(summary["bundle"]), Path(summary["plot"])
    assert png == bundle.with_suffix(".png") == tmp_path / "out" / "mlp-1.0.0-x86-64.png"
    _check_png(png)
    with tarfile.open(bundle) as tar:
        assert not [n for n in tar.getnames() if n.endswith(".png")]
        member = tar.extractfile("report.json")
        assert member is not None
        report = json.loads(member.read())
    pc = report["validation"]["per_class"]
    assert pc["classes"] == 4 and sum(pc["count"]) == report["validation"]["samples"]
    assert len(report["validation"]["error_histograms"]["logits"]["counts"]) == 30

    code = main(["convert", str(model), "--profile", "x86-64", "--calib", str(tmp_path / "data.npz"), "--out",
                 str(tmp_path / "out2"), "--key", str(keypair[0]), "--threads", "1", "--gate-agreement", "0.5",
                 "--no-plot", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["plot"] is None
    assert not list((tmp_path / "out2").glob("*.png"))
