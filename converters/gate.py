"""The accuracy gate: does the quantized model behave like the fp32 model on the validation samples?

``gate`` is a pure function of the validation figures (``converters.validate``) and the thresholds of the
profile (``quantization.gate_*``) or the command line. It picks one metric, in this order:

1. **labels** (the validation samples carry class labels and the first output is a score vector):
   ``accuracy_ratio`` = int8 accuracy / fp32 accuracy, which must be at least ``min_accuracy_ratio``
   (default 0.99: int8 keeps 99% of the fp32 accuracy). When the fp32 model scores 0 on the labels the
   ratio means nothing (the labels are probably not in the model's class order): the gate then uses
   the top-1 agreement, and says why.
2. **no labels, class-score outputs**: ``top1_agreement`` with the fp32 model (the lowest over the
   score-vector outputs) must be at least ``min_agreement`` (default 0.99).
3. **no class-score output** (regression, images, embeddings): ``snr_db``, the signal-to-quantization-noise
   ratio 10 log10(sum fp32^2 / sum (fp32 - int8)^2) of the worst output, must be at least ``min_snr_db``
   (default 20 dB: the error's energy is at most 1% of the signal's). Identical outputs have an infinite
   SNR and pass.

Thresholds are inclusive (a value equal to the threshold passes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

METRICS = ("accuracy_ratio", "top1_agreement", "snr_db")
_EPS = 1e-9  # float slack on inclusive comparisons (e.g. 0.99 x 0.3 vs 0.297)


@dataclass(frozen=True)
class GateResult:
    """The verdict of the gate: which metric decided, its value, the threshold, and why (plain English)."""

    passed: bool
    metric: str  # one of METRICS
    value: float | None  # None only when the metric could not be computed
    threshold: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "metric": self.metric, "value": json_number(self.value),
                "threshold": self.threshold, "reason": self.reason}


def json_number(value: float | None) -> float | str | None:
    """A float for JSON: +inf -> "inf", -inf -> "-inf", NaN -> None, others unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return None
        return "inf" if value > 0 else "-inf"
    return value


def snr_db(fp32_sq_sum: float, noise_sq_sum: float) -> float:
    """10 log10(signal energy / noise energy): inf when there is no noise, -inf when there is no signal."""
    if noise_sq_sum <= 0:
        return math.inf
    if fp32_sq_sum <= 0:
        return -math.inf
    return 10.0 * math.log10(fp32_sq_sum / noise_sq_sum)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else ("inf" if v > 0 else "-inf")


def _agreement(outputs: dict[str, dict[str, Any]], min_agreement: float, why: str) -> GateResult | None:
    values = [(o["top1_agreement"], name) for name, o in outputs.items() if o.get("top1_agreement") is not None]
    if not values:
        return None
    value, name = min(values)
    passed = value >= min_agreement - _EPS
    reason = (f"{why}top-1 agreement with fp32 on output {name!r} is {_fmt(value)} "
              f"({'>=' if passed else '<'} {min_agreement})")
    return GateResult(passed, "top1_agreement", float(value), min_agreement, reason)


def gate(validation: dict[str, Any], *, min_accuracy_ratio: float, min_agreement: float,
         min_snr_db: float = 20.0) -> GateResult:
    """Judge the validation figures (see the module doc for which metric applies)."""
    outputs: dict[str, dict[str, Any]] = validation.get("outputs") or {}
    if not outputs:
        raise ValueError("the validation figures have no outputs to judge")
    acc_fp32, acc_quant = validation.get("accuracy_fp32"), validation.get("accuracy_quant")
    prefix = ""
    if acc_fp32 is not None and acc_quant is not None:
        if acc_fp32 > 0:
            value = acc_quant / acc_fp32
            passed = acc_quant >= min_accuracy_ratio * acc_fp32 - _EPS
            reason = (f"quantized accuracy {_fmt(acc_quant)} is {_fmt(value)} x the fp32 accuracy "
                      f"{_fmt(acc_fp32)} ({'>=' if passed else '<'} {min_accuracy_ratio})")
            return GateResult(passed, "accuracy_ratio", value, min_accuracy_ratio, reason)
        prefix = ("the fp32 model scores 0 on the validation labels (are they in the model's class order?), so "
                  "the accuracy ratio means nothing; ")
    by_agreement = _agreement(outputs, min_agreement, prefix)
    if by_agreement is not None:
        return by_agreement
    values = [(float(o["snr_db"]), name) for name, o in outputs.items() if o.get("snr_db") is not None]
    if not values:
        return GateResult(False, "snr_db", None, min_snr_db, prefix + "no output has an SNR figure to judge")
    value, name = min(values)
    passed = value >= min_snr_db - _EPS
    reason = (f"{prefix}no output is a class-score vector; the SNR of output {name!r} against fp32 is "
              f"{_fmt(value)} dB ({'>=' if passed else '<'} {min_snr_db} dB)")
    return GateResult(passed, "snr_db", value, min_snr_db, reason)


def channel_sqnr_db(x: np.ndarray, dq: np.ndarray, axis: int) -> float:
    """Mean over channels of 10 log10(sum x^2 / sum (x - dq)^2); ``x`` and ``dq`` stack samples on axis 0.

    For ranking layers by quantization error. Channels that are zero in float are skipped; a channel (or a
    tensor) without error counts as 100 dB, and no channel scores above that. A whole-tensor SQNR would
    hide channels rounded to zero behind one large channel (the activation-outlier case); the mean over
    channels does not.
    """
    x64, d64 = np.moveaxis(x.astype(np.float64), axis, -1), np.moveaxis(dq.astype(np.float64), axis, -1)
    channels = x64.shape[-1] if x64.ndim else 1
    signal = np.square(x64).reshape(-1, channels).sum(0)
    noise = np.square(x64 - d64).reshape(-1, channels).sum(0)
    keep = signal > 0
    if not keep.any():
        return 100.0
    with np.errstate(divide="ignore"):
        db = np.where(noise[keep] > 0, 10 * np.log10(signal[keep] / np.where(noise[keep] > 0, noise[keep], 1.0)),
                      100.0)
    return float(np.mean(np.minimum(db, 100.0)))
