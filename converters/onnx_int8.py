"""ONNX models: inspection and quantization with onnxruntime (QDQ static INT8, dynamic, or none).

Every change the converter makes to a model (a dynamic batch fixed to 1, an opset upgrade, a retry with a
workaround for a known onnxruntime bug) is returned as a plain-English note that goes into the bundle's
report. The quantized model is always loaded and run once in onnxruntime before it is written, because
onnxruntime's quantizer can write models that onnxruntime itself refuses (e.g. per-channel
DequantizeLinear below opset 13).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ConversionError, InputError, ModelError, missing_extra
from edge_agent.manifest import TensorSpec

MIN_QDQ_OPSET = 13  # per-channel DequantizeLinear needs the `axis` attribute of opset 13
METHODS = ("minmax", "entropy", "percentile")
MODES = ("int8", "dynamic", "fp16", "none")
_REEXPORT_HINT = "re-export the model at opset 13 or newer (e.g. torch.onnx.export(..., opset_version=17))"
# onnxruntime 1.31 crash on a Gemm with a 2-D bias (microsoft/onnxruntime#24815)
_GEMM_BIAS_BUG = "truth value of an array with more than one element is ambiguous"


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise missing_extra("onnx", "host", "converting ONNX models") from e
    return onnx


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise missing_extra("onnxruntime", "onnx", "converting ONNX models") from e
    return onnxruntime


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def session(path: Path, threads: int | None = None) -> Any:
    """A CPU onnxruntime session with default graph optimisations and quiet logging."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _dtype_name(elem_type: int) -> str:
    onnx = _onnx()
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _spec(value_info: Any) -> TensorSpec:
    tensor = value_info.type.tensor_type
    shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim)
    return TensorSpec(value_info.name, shape, _dtype_name(tensor.elem_type))


def _opset(model: Any) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _graph_inputs(model: Any) -> list[Any]:
    """Graph inputs that are real inputs (old exporters also list the initializers as inputs)."""
    weights = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in weights]


def load_model(path: Path) -> Any:
    """onnx.load with the project's errors: missing file or not an ONNX model -> ModelError."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist", hint="check the path to the .onnx file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, onnx's own errors, OSError: all mean "not a model"
        raise ModelError(f"{path} is not an ONNX model ({_first_line(e)})",
                         hint="give a .onnx file exported by torch.onnx.export, tf2onnx or similar") from e


def inspect_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """(inputs, outputs, opset) of a float ONNX model that onnx checks and onnxruntime loads."""
    onnx = _onnx()
    path = Path(path)
    model = load_model(path)
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ModelError(f"{path} is not a valid ONNX model: onnx.checker says: {_first_line(e)}",
                         hint="re-export the model; check the exporter's warnings") from e
    opset = _opset(model)
    if not model.graph.output or not _graph_inputs(model):
        raise ModelError(f"{path} has no inputs or no outputs", hint="re-export the model")
    try:
        session(path)
    except Exception as e:  # onnxruntime raises its own Exception subclasses (NotImplemented, Fail, ...)
        if "NOT_IMPLEMENTED" in str(e) or type(e).__name__ == "NotImplemented":
            raise ModelError(
                f"{path} uses opset {opset}, which onnxruntime {_ort().__version__} cannot run "
                f"({_first_line(e)})",
                hint=_REEXPORT_HINT,
            ) from e
        raise ModelError(f"onnxruntime cannot load {path}: {_first_line(e)}",
                         hint="check that the model runs in onnxruntime; re-export it if not") from e
    inputs = [_spec(i) for i in _graph_inputs(model)]
    outputs = [_spec(o) for o in model.graph.output]
    return inputs, outputs, opset


# --------------------------------------------------------------------------------------------------
# graph preparation


def _fix_batch(model: Any, notes: list[str]) -> None:
    """Dynamic first dims of the inputs (and of outputs sharing their symbol) -> 1."""
    symbols: set[str] = set()
    fixed: list[str] = []
    for value in _graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if dims and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            if dims[0].HasField("dim_param"):
                symbols.add(dims[0].dim_param)
            dims[0].Clear()
            dims[0].dim_value = 1
            fixed.append(value.name)
    if not fixed:
        return
    for value in model.graph.output:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param") and dims[0].dim_param in symbols:
            dims[0].Clear()
            dims[0].dim_value = 1
    del model.graph.value_info[:]  # shape inference recomputes them with the fixed batch
    notes.append(f"the dynamic batch axis of input {', '.join(repr(n) for n in fixed)} was fixed to 1 "
                 "(edge devices run one sample at a time; static shapes let runtimes plan memory and kernels)")


def _drop_initializer_inputs(model: Any, notes: list[str]) -> None:
    weights = {t.name for t in model.graph.initializer}
    listed = [i for i in model.graph.input if i.name in weights]
    if not listed or model.ir_version < 4:
        return
    keep = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    notes.append(f"{len(listed)} weights that the exporter also listed as graph inputs were made constants "
                 "(otherwise onnxruntime treats them as overridable and does not quantize or fold them)")


def _upgrade_opset(model: Any, opset: int, notes: list[str], why: str) -> Any:
    onnx = _onnx()
    try:
        upgraded = onnx.version_converter.convert_version(model, MIN_QDQ_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as e:  # the version converter raises RuntimeError/ValidationError/IndexError
        raise ConversionError(
            f"upgrading the model from opset {opset} to {MIN_QDQ_OPSET} failed (step: opset upgrade): "
            f"{_first_line(e)}",
            hint=_REEXPORT_HINT,
        ) from e
    notes.append(f"the model was upgraded from opset {opset} to {MIN_QDQ_OPSET} with "
                 f"onnx.version_converter ({why})")
    return upgraded


def _save(model: Any, path: Path, step: str) -> None:
    onnx = _onnx()
    try:
        onnx.save(model, str(path))
    except (OSError, ValueError) as e:
        raise ConversionError(f"writing the model failed (step: {step}): {_first_line(e)}") from e


def _preprocess(src: Path, dst: Path, notes: list[str]) -> None:
    """onnxruntime's quant_pre_process (symbolic shape inference + graph optimisation)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst))
        return
    except Exception as first:  # symbolic shape inference fails on many exotic graphs
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        except Exception as e:
            raise ConversionError(
                f"onnxruntime's quantization pre-processing failed (step: pre-process): {_first_line(e)}",
                hint="check that the model's shapes are static and that it runs in onnxruntime",
            ) from e
        notes.append("onnxruntime's symbolic shape inference failed during pre-processing "
                     f"({_first_line(first)}); pre-processing was redone without it (ONNX shape inference only)")


class _Reader:
    """onnxruntime CalibrationDataReader over an array of samples (each with its batch axis)."""

    def __init__(self, name: str, samples: np.ndarray) -> None:
        self.name = name
        self.samples = samples
        self.index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= len(self.samples):
            return None
        sample = self.samples[self.index]
        self.index += 1
        return {self.name: np.ascontiguousarray(sample, dtype=np.float32)}

    def rewind(self) -> None:
        self.index = 0


def _quantize_static(src: Path, dst: Path, calib: np.ndarray, input_name: str, per_channel: bool,
                     method: str, symmetric_activations: bool, notes: list[str]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    class Reader(_Reader, CalibrationDataReader):
        pass

    extra: dict[str, Any] = {}
    if symmetric_activations:
        extra["ActivationSymmetric"] = True

    def run(options: dict[str, Any]) -> None:
        ort_quantize_static(
            str(src), str(dst), Reader(input_name, calib), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
            calibrate_method=methods[method], extra_options=options or None,
        )

    try:
        run(extra)
        return
    except Exception as first:  # onnxruntime's quantizer raises plain Python errors from deep inside
        if _GEMM_BIAS_BUG not in str(first):
            raise ConversionError(
                f"onnxruntime static quantization failed (step: quantize): {type(first).__name__}: "
                f"{_first_line(first)}",
                hint="try quantization.per_channel = false or calibration_method = 'minmax' in a copy of "
                     "the profile, and report the model to the edgekit issue tracker",
            ) from first
    retry = {**extra, "QDQDisableWeightAdjustForInt32Bias": True}
    try:
        run(retry)
    except Exception as e:
        raise ConversionError(
            f"onnxruntime static quantization failed (step: quantize, retry without int32 bias weight "
            f"adjustment): {type(e).__name__}: {_first_line(e)}",
            hint="try quantization.per_channel = false in a copy of the profile",
        ) from e
    notes.append("onnxruntime's quantizer crashed on a Gemm with a 2-D bias (known bug "
                 "microsoft/onnxruntime#24815); quantization was redone with "
                 "QDQDisableWeightAdjustForInt32Bias = true, so weight scales are not enlarged for very small "
                 "int32 bias scales")


def _quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    except Exception as e:  # plain Python errors from onnxruntime's quantizer
        raise ConversionError(f"onnxruntime dynamic quantization failed (step: quantize): {type(e).__name__}: "
                              f"{_first_line(e)}", hint="use quantization mode int8 or none") from e


def count_ops(path: Path) -> dict[str, int]:
    """Node count per op type of an ONNX model (for reports and tests)."""
    counts: dict[str, int] = {}
    for node in load_model(path).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _prove_runs(path: Path, sample: np.ndarray, input_name: str, what: str) -> None:
    try:
        sess = session(path)
        sess.run(None, {input_name: np.ascontiguousarray(sample, dtype=np.float32)})
    except Exception as e:  # onnxruntime's own exception classes
        raise ConversionError(
            f"the {what} model does not run in onnxruntime (step: load check): {_first_line(e)}",
            hint="this is a converter bug or an upstream onnxruntime bug; try another quantization mode "
                 "or calibration method in a copy of the profile, and report it",
        ) from e


def _install(tmp_model: Path, dst: Path) -> None:
    """Copy the checked model next to dst, then rename it into place."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.partial")
    try:
        shutil.copyfile(tmp_model, partial)
        os.replace(partial, dst)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {dst}: {e.strerror}", hint="check the output folder") from e


def _prepared(src: Path, workdir: Path, notes: list[str], upgrade_reason: str | None) -> Path:
    """src with the batch fixed, weights not listed as inputs, opset upgraded if asked -> workdir file."""
    model = load_model(src)
    _fix_batch(model, notes)
    _drop_initializer_inputs(model, notes)
    opset = _opset(model)
    if upgrade_reason and opset < MIN_QDQ_OPSET:
        model = _upgrade_opset(model, opset, notes, upgrade_reason)
    out = workdir / "prepared.onnx"
    _save(model, out, "prepare")
    return out


def quantize_onnx(src: Path, dst: Path, calib: np.ndarray, input_name: str, *, per_channel: bool,
                  method: str, workdir: Path, symmetric_activations: bool = False) -> list[str]:
    """Static INT8 QDQ quantization (int8 activations and weights) of src into dst; returns the notes."""
    if method not in METHODS:
        raise InputError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if len(calib) == 0:
        raise InputError("static quantization needs at least one calibration sample")
    src, dst, workdir = Path(src), Path(dst), Path(workdir)
    notes: list[str] = []
    prepared = _prepared(src, workdir, notes, "QDQ quantization needs opset 13: per-channel "
                                              "DequantizeLinear takes an axis attribute")
    pre = workdir / "preprocessed.onnx"
    _preprocess(prepared, pre, notes)
    quant = workdir / "quantized.onnx"
    _quantize_static(pre, quant, calib, input_name, per_channel, method, symmetric_activations, notes)
    ops = count_ops(quant)
    if not ops.get("QuantizeLinear"):
        notes.append("onnxruntime inserted no QuantizeLinear nodes: the model has no operators it quantizes, "
                     "so the bundle's model stays float")
    _prove_runs(quant, calib[0], input_name, "quantized")
    _install(quant, dst)
    return notes


def convert_onnx_model(src: Path, dst: Path, mode: str, calib: np.ndarray, input_name: str, *,
                       per_channel: bool, method: str, workdir: Path,
                       symmetric_activations: bool = False) -> list[str]:
    """The model for a profile's quantization.mode: int8 (static QDQ), dynamic, or none (float)."""
    if mode == "fp16":
        raise InputError("fp16 for ONNX is not supported yet",
                         hint="use mode int8 or none; on Jetson TensorRT builds fp16 engines from an fp32 "
                              "model with trt_fp16 = true")
    if mode == "int8":
        return quantize_onnx(src, dst, calib, input_name, per_channel=per_channel, method=method,
                             workdir=workdir, symmetric_activations=symmetric_activations)
    if mode not in MODES:
        raise InputError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}")
    notes: list[str] = []
    workdir = Path(workdir)
    if mode == "none":
        prepared = _prepared(Path(src), workdir, notes, None)
        notes.append("quantization mode none: the model is packaged as float32, not quantized")
        _prove_runs(prepared, calib[0], input_name, "float")
        _install(prepared, Path(dst))
        return notes
    prepared = _prepared(Path(src), workdir, notes, None)
    out = workdir / "dynamic.onnx"
    _quantize_dynamic(prepared, out, per_channel)
    notes.append("quantization mode dynamic: weights are int8, activations are quantized at run time per "
                 "inference (no calibration; calibration samples are used for validation only)")
    _prove_runs(out, calib[0], input_name, "dynamically quantized")
    _install(out, Path(dst))
    return notes
