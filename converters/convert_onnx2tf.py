"""`edgekit convert` for an ONNX model and a TFLite profile: onnx2tf as an isolated tool, then the TFLite checks.

Steps: inspect (the ONNX model, with onnx/onnxruntime of this host) -> tool env (``onnx2tf_tool.ensure_env``:
the onnx2tf environment, built on first use with progress, never when offline) -> calibration (samples in
the ONNX model's own, channel-first layout) -> quantize (``onnx2tf_tool.onnx_to_tflite``: onnx2tf writes a
float32 and, for int8, a full-integer .tflite, channel-last) -> validate -> [ladder] -> golden -> [edgetpu]
-> package.

Validation:

* **fp32 parity.** onnx2tf rewrites the graph (NCHW -> NHWC transposes, op substitutions), so before any
  quantization figure is trusted, its float32 model is run in LiteRT on ``PARITY_SAMPLES`` validation
  samples (made channel-last) and compared with the ONNX model in onnxruntime: every output must agree
  within ``PARITY_ATOL`` x max(1, |largest fp32 output|). A larger difference is a ``ConversionError``
  saying onnx2tf changed the model's meaning. Channel-first outputs that onnx2tf made channel-last are
  compared transposed and noted.
* **quantized vs fp32.** The same as a Keras/SavedModel conversion (``converters.validate_tflite``), with
  onnx2tf's float32 model as the reference, on the validation samples made channel-last.
* **the written model** gets the checks ``convert_tflite_model`` makes: no op left computing in float unless
  ``--allow-float-ops``, and one run in LiteRT on this host (``tflite_int8.check_written_model``); Flex and
  custom ops were already refused by ``onnx_to_tflite``.

The recovery ladder: the per-tensor/per-channel rung re-runs onnx2tf with the other weight granularity; the
calibration-method rungs are skipped (TensorFlow's quantizer has min/max only), and so is the rung that keeps
the worst layers in float (onnx2tf has no option to keep chosen nodes in float); each skip is recorded with
its reason in the report's ladder table. ``exclude_nodes`` / ``exclude_op_types`` are refused up front for
the same reason.

The bundle's preprocessing layout is the TFLite model's (NHWC for images), not the ONNX model's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration import Samples
from converters.convert import (
    CPU_MODEL,
    EDGETPU,
    EDGETPU_VALIDATION_NOTE,
    REPORT_SCHEMA,
    ConvertResult,
    _calibration,
    _check_label_count,
    _edgetpu_step,
    _finite,
    _fixed,
    _gate_and_ladder,
    _golden_tflite,
    _initial_settings,
    _Job,
    _judge,
    _package,
    _sha256,
    _single_float_input,
    _speed_note,
    tflite_report_tail,
)
from converters.ladder import INITIAL, Attempt, LayerError, QuantSettings
from converters.onnx_int8 import inspect_onnx
from edge_agent import __version__ as EDGEKIT_VERSION
from edge_agent.errors import ConversionError, InputError

PARITY_SAMPLES = 8
PARITY_ATOL = 1e-4
_NOT_IN_FLOAT = ("onnx2tf has no option to keep chosen nodes in float, so keeping layers in float is not "
                 "available for ONNX -> TFLite conversion")


def fp32_parity(onnx_model: Path, tflite_fp32: Path, onnx_arrays: np.ndarray, tflite_arrays: np.ndarray,
                threads: int) -> dict[str, Any]:
    """onnx2tf's float32 .tflite (LiteRT) vs the ONNX model (onnxruntime) on the first ``PARITY_SAMPLES``
    samples; the figures per output, or a ``ConversionError`` when an output differs beyond the tolerance."""
    from converters.onnx2tf_tool import samples_to_tflite_layout
    from converters.validate import onnx_outputs
    from converters.validate_tflite import tflite_outputs

    n = min(PARITY_SAMPLES, len(onnx_arrays))
    onnx_names, ref = onnx_outputs(onnx_model, onnx_arrays[:n], threads, "fp32 ONNX")
    tfl_names, got = tflite_outputs(tflite_fp32, tflite_arrays[:n], threads, "onnx2tf float32")
    if len(ref) != len(got):
        raise ConversionError(f"onnx2tf's float32 model has {len(got)} outputs and the ONNX model {len(ref)} "
                              "(step: validate)", hint="report the model to the edgekit issue tracker")
    outputs: dict[str, Any] = {}
    notes: list[str] = []
    for onnx_name, tfl_name, a, b in zip(onnx_names, tfl_names, ref, got, strict=True):
        if a.shape != b.shape:
            moved = samples_to_tflite_layout(a) if a.ndim >= 4 else a
            if moved.shape != b.shape:
                raise ConversionError(
                    f"onnx2tf's float32 model gives output {tfl_name!r} the shape {list(b.shape[1:])}; the ONNX "
                    f"output {onnx_name!r} is {list(a.shape[1:])} (step: validate)",
                    hint="onnx2tf changed the model's outputs; report the model to the edgekit issue tracker")
            notes.append(f"onnx2tf made the output {onnx_name!r} channel-last ({list(b.shape[1:])}, was "
                         f"{list(a.shape[1:])}): a consumer of the bundle's output must read it in that layout")
            a = moved
        err = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        tol = PARITY_ATOL * max(1.0, float(np.max(np.abs(a))) if a.size else 0.0)
        outputs[onnx_name] = {"tflite_name": tfl_name, "max_abs_error": err, "tolerance": tol}
        if not err <= tol:  # NaN fails too
            raise ConversionError(
                f"onnx2tf changed the model's meaning: its float32 TFLite model differs from the ONNX model "
                f"(onnxruntime) by up to {err:.3g} on output {onnx_name!r} (tolerance {tol:.3g}, {n} validation "
                "samples), before any quantization (step: validate)",
                hint="onnx2tf converts one of the model's ops wrongly: simplify or re-export the ONNX model (e.g. "
                     "another opset), convert the model's Keras/SavedModel source instead, or report the model to "
                     "PINTO0309/onnx2tf")
    return {"samples": n, "atol": PARITY_ATOL, "outputs": outputs, "notes": notes,
            "note": "onnx2tf's float32 .tflite in LiteRT vs the ONNX model in onnxruntime; tolerance = atol x "
                    "max(1, largest |fp32 output|)"}


class _Onnx2TFLadder:
    """Runs onnx2tf for the first attempt and for the ladder's rungs (per-channel / per-tensor only)."""

    methods = ("minmax",)

    def __init__(self, job: _Job, python: Path, cal: Samples, val_t: Samples, work: Path) -> None:
        self.job, self.python, self.cal, self.val_t, self.work = job, python, cal, val_t, work
        self.node_count = 0
        self.reference: tuple[list[str], list[np.ndarray]] = ([], [])
        self.results: dict[Path, tuple[Any, list[Any]]] = {}
        self.runs = 0

    def run(self, per_channel: bool, dst: Path) -> tuple[Any, list[str]]:
        """onnx2tf once: the model for the job's mode moved to ``dst`` after the checks; (result, notes)."""
        from converters.onnx2tf_tool import onnx_to_tflite
        from converters.tflite_int8 import check_written_model

        q, steps = self.job.q, self.job.steps
        self.runs += 1
        out = self.work / f"onnx2tf-{self.runs}"
        result = onnx_to_tflite(self.job.model, out, calib=self.cal.arrays, env_python=self.python, mode=q.mode,
                                io_dtype=q.io_dtype if q.mode == "int8" else "float32", per_channel=per_channel,
                                progress=steps.detail)
        float_ops, notes = check_written_model(result.model, self.val_t.arrays[0], q.mode,
                                               allow_float_ops=self.job.allow_float_ops,
                                               edgetpu=EDGETPU in self.job.profile.runtime.delegates,
                                               writer="onnx2tf")
        if result.model == result.float32:  # mode none: the float32 model is the model
            shutil.copyfile(result.model, dst)
        else:
            os.replace(result.model, dst)
        self.results[Path(dst)] = (result, float_ops)
        return result, [*result.notes, *notes]

    def quantize(self, settings: QuantSettings, dst: Path) -> list[str]:
        if settings.float_nodes or settings.exclude_op_types:
            raise ConversionError(_NOT_IN_FLOAT)
        return self.run(settings.per_channel, dst)[1]

    def evaluate(self, model: Path) -> dict[str, Any]:
        from converters.validate_tflite import quality_tflite

        return quality_tflite(model, self.val_t, self.reference, self.job.threads)

    def layer_errors(self, model: Path, settings: QuantSettings) -> list[LayerError]:
        raise ConversionError(_NOT_IN_FLOAT)


def _tools(result: Any) -> dict[str, str]:
    import onnx
    import onnxruntime

    from converters.tflite_int8 import litert_version

    tools = {"edgekit": EDGEKIT_VERSION, "onnx2tf": result.version}
    tools.update({f"onnx2tf-env:{k}": v for k, v in sorted(result.tools.items()) if k != "onnx2tf"})
    tools.update({"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                  "ai-edge-litert": litert_version(), "numpy": np.__version__})
    return tools


def convert_onnx2tf(job: _Job) -> ConvertResult:
    """ONNX -> TFLite for ``job`` (see the module docstring)."""
    from converters.onnx2tf_tool import default_env_dir, ensure_env, samples_to_tflite_layout
    from converters.tflite_int8 import op_counts, tflite_io
    from converters.validate_tflite import compare_tflite, quality_tflite, tflite_outputs

    model, q, steps, notes, profile = job.model, job.q, job.steps, job.notes, job.profile
    if q.exclude_nodes or q.exclude_op_types:
        raise InputError(f"exclude_nodes / exclude_op_types cannot be applied to {model.name}: {_NOT_IN_FLOAT}",
                         hint="drop --exclude-nodes / --exclude-op-types (or the profile's lists), or convert the "
                              "model's Keras/SavedModel source, where they apply")
    with steps.step("inspect"):
        inputs, outputs, opset = inspect_onnx(model)
        spec = _fixed(_single_float_input(model, inputs))
        _check_label_count(job.label_names, outputs, job.labels)

    with steps.step("tool env"):
        env_dir = job.onnx2tf_env or default_env_dir()
        python = ensure_env(env_dir, offline=job.offline,
                            progress=lambda message, fraction: steps.detail(f"onnx2tf env: {message}", fraction))

    with steps.step("calibration"):
        samples, cal, val, cal_info = _calibration(job, spec, q, notes)
    val_t = dataclasses.replace(val, arrays=samples_to_tflite_layout(val.arrays))
    int8 = q.mode == "int8"

    with tempfile.TemporaryDirectory(prefix="edgekit-convert-") as tmp:
        work = Path(tmp)
        backend = _Onnx2TFLadder(job, python, cal, val_t, work)
        settings = _initial_settings(q)
        first_model, fp32 = work / "attempt0.tflite", work / "fp32.tflite"
        with steps.step("quantize"):
            t0 = time.perf_counter()
            first_result, first_notes = backend.run(q.per_channel, first_model)
            shutil.copyfile(first_result.float32, fp32)
            quantize_s = time.perf_counter() - t0

        with steps.step("validate"):
            t0 = time.perf_counter()
            parity = fp32_parity(model, fp32, val.arrays, val_t.arrays, job.threads)
            notes.extend(parity.pop("notes"))
            reference = tflite_outputs(fp32, val_t.arrays, job.threads, "fp32")
            backend.reference = reference
            backend.node_count = sum(n for op, n in op_counts(first_model).items()
                                     if op not in ("QUANTIZE", "DEQUANTIZE"))
            quality = quality_tflite(first_model, val_t, reference, job.threads)
            first = Attempt(INITIAL, settings, _judge(q)(quality), quantize_s + time.perf_counter() - t0,
                            first_model, quality, first_notes)
        chosen, ladder = _gate_and_ladder(job, first, backend if int8 else None, work)
        assert chosen.model is not None
        result, float_ops = backend.results[Path(chosen.model)]
        notes.extend(chosen.notes)
        quant = work / CPU_MODEL
        with steps.step("ladder" if ladder["ran"] else "validate"):  # latency: of the model packaged only
            os.replace(chosen.model, quant)
            q_inputs, q_outputs = tflite_io(quant)
            validation = compare_tflite(fp32, quant, val_t, job.threads, runs=job.latency_runs)
            validation["fp32_parity"] = parity
            _speed_note(validation, q.mode, notes)
            xnn = validation["xnnpack"]
            if xnn["delegated_nodes"] < xnn["total_nodes"]:
                notes.append(f"on this host LiteRT's XNNPACK delegate took {xnn['delegated_nodes']} of "
                             f"{xnn['total_nodes']} nodes; the others run on LiteRT's built-in kernels")
            if EDGETPU in profile.runtime.delegates:
                notes.append(EDGETPU_VALIDATION_NOTE)

        with steps.step("golden"):
            golden_in, golden_out, atol = _golden_tflite(quant, val_t)
        tpu = _edgetpu_step(job, quant, work, q_inputs, q_outputs)

        pre = samples.preprocessing or val.preprocessing or job.preprocessing
        if pre is not None and result.input_layout in ("NHWC", "NCHW") and pre.layout != result.input_layout:
            notes.append(f"the bundle's preprocessing layout is {result.input_layout} (the TFLite model's input), "
                         f"not {pre.layout} (the ONNX model's); the device hands the model "
                         f"{result.input_layout} tensors")
            pre = dataclasses.replace(pre, layout=result.input_layout)
        io_dtype = q_inputs[0].dtype if int8 else "float32"
        cs = chosen.settings
        quantization = {"mode": q.mode, "per_channel": cs.per_channel, "method": "minmax",
                        "format": "tflite-" + ("full-integer" if int8 else q.mode), "converter": "onnx2tf",
                        "io_dtype": io_dtype, "allow_float_ops": job.allow_float_ops,
                        "float_ops": [op.op for op in float_ops], "float_nodes": [], "exclude_op_types": [],
                        "kept_float_ops": [],
                        "calibration": {"count": cal_info["count"], "seed": job.seed, "sha256": cal_info["sha256"],
                                        "layout": result.input_layout}}
        validation["gate"] = chosen.gate.to_dict() if chosen.gate else None
        validation["ladder_rung"] = chosen.rung
        report: dict[str, Any] = _finite({
            "schema": REPORT_SCHEMA,
            "name": job.name,
            "version": job.version,
            "profile": profile.name,
            "source_model": {"file": model.name, "kind": "onnx", "sha256": _sha256(model), "opset": opset,
                             "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]},
            "onnx2tf": {"version": result.version, "tools": result.tools, "env_dir": str(env_dir),
                        "arguments": [Path(a).name if os.path.isabs(a) else a for a in result.command[3:]],
                        "runs": backend.runs, "seconds": result.seconds, "input_layout": result.input_layout,
                        "onnx_input_shape": list(result.onnx_input_shape), "inputs": result.inputs,
                        "outputs": result.outputs, "ops": result.ops, "notes": result.notes},
            **tflite_report_tail(quantization, float_ops, [], cal_info, validation, ladder, golden_in, golden_out,
                                 atol, notes, steps.timings,
                                 inputs_note=", inputs channel-last as the model takes them"),
        })
        return _package(job, CPU_MODEL, quant, "tflite", "litert", _tools(result), report, q_inputs, q_outputs,
                        (golden_in, golden_out, atol), pre, quantization, validation, tpu)
