"""fp32 vs quantized comparison on held-out validation samples, on this host.

Figures: file sizes, per-output agreement and errors, accuracy when the samples carry labels, and latency
with onnxruntime on the host CPU. Latency is measured with both models interleaved in alternating blocks
(after a warm-up that is not counted), so machine noise hits both alike. The figures are reported as
measured: int8 is not assumed to be faster (on tiny models it often is slower), and host latency is not
device latency.

For the report's plot (``converters/report_plot.py``) the comparison also keeps, small enough for
``report.json``: per output, a histogram of |fp32 - quantized| over every output element (log-spaced bin
edges and counts, not the raw errors), and with labels the per-class top-1 accuracy of both models.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration import Samples
from converters.gate import snr_db
from converters.onnx_int8 import session
from edge_agent.errors import ConversionError
from edge_agent.stats import latency_summary_ms, ratio

BLOCK = 20  # inferences per model per block of the interleaved latency run
HIST_BINS = 30  # bins of the |fp32 - quantized| error histogram kept in the report


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model name from /proc/cpuinfo, else what the platform module says."""
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass  # not Linux or not readable: fall back to the platform module's answer below
    return platform.processor() or platform.machine() or "unknown"


def _outputs(sess: Any, input_name: str, arrays: np.ndarray, which: str) -> list[np.ndarray]:
    """Run every sample; returns one (N, *output shape) array per output."""
    per_sample = []
    for i, x in enumerate(arrays):
        try:
            per_sample.append(sess.run(None, {input_name: x}))
        except Exception as e:  # onnxruntime's own exception classes
            raise ConversionError(f"the {which} model failed on validation sample {i} (step: validate): "
                                  f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}",
                                  hint="check the validation samples' shape and range") from e
    return [np.stack([np.asarray(s[k], dtype=np.float32) for s in per_sample])
            for k in range(len(per_sample[0]))]


def _is_class_vector(per_sample_shape: tuple[int, ...]) -> bool:
    """argmax makes sense for a vector of scores: every axis but the last is 1, the last is > 1."""
    return bool(per_sample_shape) and per_sample_shape[-1] > 1 and all(d == 1 for d in per_sample_shape[:-1])


def compare_outputs(fp32: list[np.ndarray], quant: list[np.ndarray], names: list[str]) -> dict[str, dict]:
    """Per output: top1_agreement (score vectors only, else None), max/mean absolute error, fp32 range, and
    snr_db = 10 log10(sum fp32^2 / sum (fp32 - quant)^2) (``math.inf`` when the outputs are identical,
    ``-math.inf`` when the fp32 output is all zero and the quantized one is not; JSON writers turn these
    into the strings "inf" / "-inf", see ``converters.gate.json_number``)."""
    result: dict[str, dict] = {}
    for name, a, b in zip(names, fp32, quant, strict=True):
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        diff = np.abs(a64 - b64)
        agreement = None
        if _is_class_vector(a.shape[1:]):
            agreement = float(np.mean(a.reshape(len(a), -1).argmax(-1) == b.reshape(len(b), -1).argmax(-1)))
        result[name] = {
            "top1_agreement": agreement,
            "max_abs_error": float(diff.max()) if diff.size else 0.0,
            "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
            "fp32_abs_max": float(np.abs(a).max()) if a.size else 0.0,
            "snr_db": snr_db(float(np.square(a64).sum()), float(np.square(diff).sum())),
        }
    return result


def _accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(scores.reshape(len(scores), -1).argmax(-1) == labels))


def interleaved_latency(sessions: list[Any], input_name: str, arrays: np.ndarray, warmup: int,
                        runs: int) -> list[list[int]]:
    """Latency samples (ns) per session, run in alternating blocks; warm-up runs are not recorded.

    The order of the sessions flips every block so neither always runs right after the other.
    """
    feeds = [{input_name: x} for x in arrays]
    for sess in sessions:
        for i in range(warmup):
            sess.run(None, feeds[i % len(feeds)])
    samples: list[list[int]] = [[] for _ in sessions]
    done = 0
    block_no = 0
    while done < runs:
        size = min(BLOCK, runs - done)
        order = list(range(len(sessions)))
        if block_no % 2:
            order.reverse()
        for k in order:
            sess, out = sessions[k], samples[k]
            for j in range(size):
                feed = feeds[(done + j) % len(feeds)]
                t0 = time.perf_counter_ns()
                sess.run(None, feed)
                out.append(time.perf_counter_ns() - t0)
        done += size
        block_no += 1
    return samples



def quality_figures(val: Samples, names: list[str], out_fp32: list[np.ndarray],
                    out_quant: list[np.ndarray]) -> dict[str, Any]:
    """What the gate judges: sample count, per-output figures, and accuracy when the samples carry labels
    (on the first output, when it is a score vector)."""
    result: dict[str, Any] = {
        "samples": len(val),
        "outputs": compare_outputs(out_fp32, out_quant, names),
        "accuracy_fp32": None,
        "accuracy_quant": None,
    }
    if val.labels is not None and _is_class_vector(out_fp32[0].shape[1:]):
        result["accuracy_fp32"] = _accuracy(out_fp32[0], val.labels)
        result["accuracy_quant"] = _accuracy(out_quant[0], val.labels)
        result["accuracy_output"] = names[0]
    return result


def error_histogram(fp32: np.ndarray, quant: np.ndarray, bins: int = HIST_BINS) -> dict[str, Any]:
    """|fp32 - quantized| over every element of one output, for the report's plot, kept small: ``bins``
    log-spaced bins over the non-zero errors (``edges``, ``counts``), how many errors were exactly ``zero``
    and how many were not finite (``non_finite``), of ``total``."""
    err = np.abs(np.asarray(fp32, np.float64) - np.asarray(quant, np.float64)).ravel()
    finite = err[np.isfinite(err)]
    nonzero = finite[finite > 0]
    out: dict[str, Any] = {"edges": [], "counts": [], "zero": int(finite.size - nonzero.size),
                           "non_finite": int(err.size - finite.size), "total": int(err.size)}
    if nonzero.size:
        lo, hi = float(nonzero.min()), float(nonzero.max())
        if hi <= lo:
            lo, hi = lo / 1.5, hi * 1.5
        edges = np.geomspace(lo, hi, bins + 1)
        counts, _ = np.histogram(nonzero, edges)
        out.update(edges=[float(f"{e:.6g}") for e in edges], counts=[int(c) for c in counts])
    return out


def per_class_accuracy(fp32: np.ndarray, quant: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Per class (index = label): how many validation samples it has, and the top-1 accuracy of the fp32 and
    the quantized model on them (None for a class without samples)."""
    classes = int(fp32.reshape(len(fp32), -1).shape[1])
    pred_fp32 = fp32.reshape(len(fp32), -1).argmax(-1)
    pred_quant = quant.reshape(len(quant), -1).argmax(-1)
    labels = np.asarray(labels).astype(np.int64)
    count, acc_fp32, acc_quant = [], [], []
    for c in range(classes):
        mask = labels == c
        n = int(mask.sum())
        count.append(n)
        acc_fp32.append(float(np.mean(pred_fp32[mask] == c)) if n else None)
        acc_quant.append(float(np.mean(pred_quant[mask] == c)) if n else None)
    return {"classes": classes, "count": count, "accuracy_fp32": acc_fp32, "accuracy_quant": acc_quant}


def comparison_figures(fp32: Path, quant: Path, val: Samples, names: list[str], out_fp32: list[np.ndarray],
                       out_quant: list[np.ndarray], lat_fp32: list[int], lat_quant: list[int], *, runs: int,
                       warmup: int, where: str) -> dict[str, Any]:
    """The figures every validator reports: sizes, per-output error, accuracy, interleaved latency."""
    size_fp32, size_quant = fp32.stat().st_size, quant.stat().st_size
    result: dict[str, Any] = {
        "fp32_size_bytes": size_fp32,
        "quant_size_bytes": size_quant,
        "size_ratio": ratio(size_quant, size_fp32),
        **quality_figures(val, names, out_fp32, out_quant),
    }
    sum_fp32, sum_quant = latency_summary_ms(lat_fp32), latency_summary_ms(lat_quant)
    p50_fp32, p50_quant = sum_fp32["p50"], sum_quant["p50"]
    result.update({
        "fp32_p50_ms": p50_fp32,
        "quant_p50_ms": p50_quant,
        "speedup": ratio(p50_fp32, p50_quant) if p50_fp32 is not None and p50_quant is not None else None,
        "latency": {"fp32": sum_fp32, "quant": sum_quant, "runs": runs, "warmup": warmup, "block": BLOCK,
                    "note": f"measured {where}, not on the device"},
        "error_histograms": {n: error_histogram(a, b) for n, a, b in zip(names, out_fp32, out_quant, strict=True)},
        "per_class": None,
    })
    if result.get("accuracy_output") is not None and val.labels is not None:
        result["per_class"] = per_class_accuracy(out_fp32[0], out_quant[0], val.labels)
    return result

def compare_onnx(fp32: Path, quant: Path, val: Samples, threads: int, warmup: int = 10,
                 runs: int = 200) -> dict:
    """fp32 vs quantized on the validation samples: sizes, agreement, errors, accuracy, host latency."""
    import onnxruntime

    fp32, quant = Path(fp32), Path(quant)
    if len(val) == 0:
        raise ConversionError("no validation samples (step: validate)", hint="give more calibration samples")
    try:
        s_fp32 = session(fp32, threads)
        s_quant = session(quant, threads)
    except Exception as e:  # onnxruntime's own exception classes
        raise ConversionError(f"cannot load the models for validation (step: validate): {e}") from e
    input_name = s_fp32.get_inputs()[0].name
    names = [o.name for o in s_fp32.get_outputs()]
    out_fp32 = _outputs(s_fp32, input_name, val.arrays, "fp32")
    out_quant = _outputs(s_quant, input_name, val.arrays, "quantized")
    lat_fp32, lat_quant = interleaved_latency([s_fp32, s_quant], input_name, val.arrays, warmup, runs)
    result = comparison_figures(fp32, quant, val, names, out_fp32, out_quant, lat_fp32, lat_quant, runs=runs,
                                warmup=warmup, where="on the host that converted the model")
    result.update({
        "host": {"cpu": host_cpu(), "threads": threads, "onnxruntime": onnxruntime.__version__,
                 "machine": platform.machine()},
    })
    return result


def onnx_outputs(path: Path, arrays: np.ndarray, threads: int, which: str) -> tuple[list[str], list[np.ndarray]]:
    """(output names, one (N, *shape) array per output) of an ONNX model run on every sample."""
    try:
        sess = session(Path(path), threads)
    except Exception as e:  # onnxruntime's own exception classes
        raise ConversionError(f"cannot load the {which} model for validation (step: validate): {e}") from e
    input_name = sess.get_inputs()[0].name
    return [o.name for o in sess.get_outputs()], _outputs(sess, input_name, arrays, which)


def quality_onnx(quant: Path, val: Samples, reference: tuple[list[str], list[np.ndarray]],
                 threads: int) -> dict[str, Any]:
    """The gate's figures (``quality_figures``) of a quantized ONNX model against fp32 outputs computed once
    (``reference`` = ``onnx_outputs`` of the fp32 model on the same samples): no sizes, no latency."""
    if len(val) == 0:
        raise ConversionError("no validation samples (step: validate)", hint="give more calibration samples")
    names, out_fp32 = reference
    _, out_quant = onnx_outputs(quant, val.arrays, threads, "quantized")
    return quality_figures(val, names, out_fp32, out_quant)
