"""The accuracy gate and its math: pure functions, tested exhaustively."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from converters.gate import GateResult, channel_sqnr_db, gate, json_number, snr_db
from converters.validate import compare_outputs

THRESHOLDS = {"min_accuracy_ratio": 0.99, "min_agreement": 0.99, "min_snr_db": 20.0}


def _out(agreement: float | None = None, snr: float = 30.0) -> dict:
    return {"top1_agreement": agreement, "max_abs_error": 0.1, "mean_abs_error": 0.01, "fp32_abs_max": 1.0,
            "snr_db": snr}


def _validation(outputs: dict, acc_fp32: float | None = None, acc_quant: float | None = None) -> dict:
    return {"samples": 100, "outputs": outputs, "accuracy_fp32": acc_fp32, "accuracy_quant": acc_quant}


# --------------------------------------------------------------------------------------------------
# which metric decides


@pytest.mark.parametrize(("acc_fp32", "acc_quant", "passed"), [
    (0.90, 0.90, True),
    (0.90, 0.891, True),  # exactly 0.99 x 0.90: the threshold is inclusive
    (0.90, 0.8909, False),
    (0.90, 0.95, True),  # int8 better than fp32
    (0.30, 0.297, True),  # 0.99 x 0.3 = 0.297 despite float rounding
    (1.00, 0.98, False),
])
def test_labelled_gate_is_the_accuracy_ratio(acc_fp32: float, acc_quant: float, passed: bool) -> None:
    r = gate(_validation({"logits": _out(0.5)}, acc_fp32, acc_quant), **THRESHOLDS)
    assert (r.metric, r.passed, r.threshold) == ("accuracy_ratio", passed, 0.99)
    assert r.value == pytest.approx(acc_quant / acc_fp32)
    assert ("x the fp32 accuracy" in r.reason) and ((">=" in r.reason) == passed)


def test_labelled_gate_ignores_the_agreement() -> None:
    # agreement 0.5 would fail, but with labels the accuracy ratio decides
    r = gate(_validation({"logits": _out(0.5)}, 0.8, 0.8), **THRESHOLDS)
    assert r.passed and r.metric == "accuracy_ratio"


def test_fp32_accuracy_zero_falls_back_to_agreement_and_says_why() -> None:
    r = gate(_validation({"logits": _out(1.0)}, 0.0, 0.0), **THRESHOLDS)
    assert (r.metric, r.passed) == ("top1_agreement", True)
    assert "scores 0 on the validation labels" in r.reason and "class order" in r.reason
    r = gate(_validation({"logits": _out(0.9)}, 0.0, 0.1), **THRESHOLDS)
    assert (r.metric, r.passed) == ("top1_agreement", False)


@pytest.mark.parametrize(("agreement", "passed"), [(1.0, True), (0.99, True), (0.9899, False), (0.0, False)])
def test_unlabelled_classifier_gate_is_the_agreement(agreement: float, passed: bool) -> None:
    r = gate(_validation({"logits": _out(agreement)}), **THRESHOLDS)
    assert (r.metric, r.passed, r.value, r.threshold) == ("top1_agreement", passed, agreement, 0.99)
    assert "'logits'" in r.reason


def test_agreement_is_the_worst_classifier_output_and_ignores_others() -> None:
    outputs = {"a": _out(1.0), "boxes": _out(None, snr=-5.0), "b": _out(0.95)}
    r = gate(_validation(outputs), **THRESHOLDS)
    assert (r.metric, r.value, r.passed) == ("top1_agreement", 0.95, False)
    assert "'b'" in r.reason


@pytest.mark.parametrize(("snrs", "value", "passed"), [
    ((35.0,), 35.0, True),
    ((20.0,), 20.0, True),  # inclusive
    ((19.99,), 19.99, False),
    ((40.0, 12.0), 12.0, False),  # the worst output decides
    ((math.inf,), math.inf, True),  # identical outputs
    ((-math.inf,), -math.inf, False),  # fp32 all zero, int8 not
])
def test_regression_gate_is_the_snr(snrs: tuple[float, ...], value: float, passed: bool) -> None:
    outputs = {f"o{i}": _out(None, snr=s) for i, s in enumerate(snrs)}
    r = gate(_validation(outputs), **THRESHOLDS)
    assert (r.metric, r.value, r.passed, r.threshold) == ("snr_db", value, passed, 20.0)
    assert "no output is a class-score vector" in r.reason and " dB" in r.reason


def test_snr_read_back_from_json_strings() -> None:
    r = gate(_validation({"image": _out(None, snr="inf")}), **THRESHOLDS)  # type: ignore[arg-type]
    assert r.passed and r.value == math.inf


def test_thresholds_are_configurable() -> None:
    v = _validation({"logits": _out(0.95)})
    assert not gate(v, **THRESHOLDS).passed
    assert gate(v, min_accuracy_ratio=0.99, min_agreement=0.95).passed
    v = _validation({"y": _out(None, snr=15.0)})
    assert gate(v, min_accuracy_ratio=0.99, min_agreement=0.99, min_snr_db=10.0).passed


def test_no_figures_at_all() -> None:
    r = gate(_validation({"y": {"top1_agreement": None, "snr_db": None}}), **THRESHOLDS)
    assert not r.passed and r.value is None and "no output has an SNR" in r.reason
    with pytest.raises(ValueError):
        gate(_validation({}), **THRESHOLDS)


def test_result_to_dict_is_json_safe() -> None:
    d = GateResult(True, "snr_db", math.inf, 20.0, "identical").to_dict()
    assert json.loads(json.dumps(d)) == {"passed": True, "metric": "snr_db", "value": "inf", "threshold": 20.0,
                                         "reason": "identical"}


# --------------------------------------------------------------------------------------------------
# the math


def test_json_number() -> None:
    assert json_number(math.inf) == "inf" and json_number(-math.inf) == "-inf"
    assert json_number(math.nan) is None
    assert json_number(1.5) == 1.5 and json_number(None) is None


def test_snr_db() -> None:
    assert snr_db(100.0, 1.0) == pytest.approx(20.0)
    assert snr_db(1.0, 1.0) == 0.0
    assert snr_db(1.0, 0.0) == math.inf and snr_db(0.0, 0.0) == math.inf
    assert snr_db(0.0, 1.0) == -math.inf


def test_compare_outputs_reports_snr_per_output() -> None:
    a = np.array([[[3.0, 4.0]], [[0.0, 0.0]]], np.float32)  # energy 25
    b = a + np.array([[[0.3, 0.4]], [[0.0, 0.0]]], np.float32)  # noise energy 0.25
    r = compare_outputs([a, a], [b, a.copy()], ["noisy", "same"])
    assert r["noisy"]["snr_db"] == pytest.approx(20.0, abs=1e-4)
    assert r["same"]["snr_db"] == math.inf


def test_channel_sqnr_sees_channels_rounded_to_zero() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 1, 8)).astype(np.float32)
    x[..., 0] *= 1e4  # one huge channel
    crushed = x.copy()
    crushed[..., 1:] = 0.0  # what a per-tensor int8 scale set by channel 0 does to the others
    whole = 10 * np.log10(np.square(x.astype(np.float64)).sum() / np.square(x - crushed).sum())
    assert whole > 60  # the whole-tensor SQNR looks excellent
    assert channel_sqnr_db(x, crushed, 2) == pytest.approx(100 / 8, abs=0.5)  # 7 channels at 0 dB, 1 perfect
    assert channel_sqnr_db(x, x, 2) == 100.0
    assert channel_sqnr_db(np.zeros((3, 4)), np.ones((3, 4)), 1) == 100.0  # silent channels are skipped
    half = channel_sqnr_db(np.ones((4, 2)), np.full((4, 2), 0.9), 1)
    assert half == pytest.approx(20.0)
