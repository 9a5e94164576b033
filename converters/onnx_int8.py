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
from dataclasses import dataclass
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
    """onnxruntime CalibrationDataReader over an array of samples (each with its batch axis).

    It hands out one sample at a time. ``set_range`` and ``__len__`` let onnxruntime's strided calibration
    (``CalibStridedMinMax``) feed the calibrator one chunk at a time, so the calibrator never holds more
    than one chunk of activations.
    """

    def __init__(self, name: str, samples: np.ndarray) -> None:
        self.name = name
        self.samples = samples
        self.start, self.end = 0, len(samples)
        self.index = 0
        self.handed = 0  # samples handed out since the last set_range / rewind
        self.most_held = 0  # the most samples one calibrator pass was handed (for tests and reports)

    def __len__(self) -> int:
        return len(self.samples)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, min(end_index, len(self.samples))
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.index >= self.end:
            return None
        sample = self.samples[self.index]
        self.index += 1
        self.handed += 1
        self.most_held = max(self.most_held, self.handed)
        return {self.name: np.ascontiguousarray(sample, dtype=np.float32)}

    def rewind(self) -> None:
        self.index = self.start
        self.handed = 0


def make_reader(name: str, samples: np.ndarray) -> _Reader:
    """A ``_Reader`` that is also onnxruntime's ``CalibrationDataReader`` (iterable, as its tools expect)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(_Reader, CalibrationDataReader):
        pass

    return Reader(name, samples)


def calibration_chunk(per_sample_bytes: int, bound_bytes: int, count: int) -> int:
    """Samples per calibrator pass so that one pass holds at most ``bound_bytes`` of activations.

    onnxruntime's strided calibration needs the chunk to divide ``count``: this is the largest divisor of
    ``count`` whose activations fit the bound, at least 1 (one sample at a time when even one does not fit).
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    fit = count if per_sample_bytes <= 0 else max(1, bound_bytes // per_sample_bytes)
    if fit >= count:
        return count
    best = 1
    i = 1
    while i * i <= count:
        if count % i == 0:
            for d in (i, count // i):
                if d <= fit:
                    best = max(best, d)
        i += 1
    return best


def activation_bytes(model_path: Path | Any) -> tuple[int, int]:
    """(bytes of every float activation of one sample, tensors whose size is unknown) from shape inference
    (of a model file or a loaded ModelProto)."""
    onnx = _onnx()
    model = load_model(model_path) if isinstance(model_path, (str, Path)) else model_path
    weights = {t.name for t in model.graph.initializer}
    seen: set[str] = set()
    total = unknown = 0
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if value.name in weights or value.name in seen:
            continue
        seen.add(value.name)
        tensor = value.type.tensor_type
        if tensor.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else -1 for d in tensor.shape.dim]
        if not tensor.HasField("shape") or any(d < 0 for d in dims):
            unknown += 1
            continue
        total += int(np.prod(dims, dtype=np.int64)) * (2 if tensor.elem_type == onnx.TensorProto.FLOAT16 else 4)
    return total, unknown


# what one calibrator pass keeps per sample: MinMax reduces every tensor to a min and a max in the graph;
# the histogram methods (entropy, percentile) keep every activation of every sample of the pass
_MINMAX_PER_TENSOR_BYTES = 2 * 4


def _calibration_plan(prepared: PreparedOnnx, method: str, count: int, max_memory_mb: int,
                      notes: list[str]) -> int | None:
    """The CalibStridedMinMax chunk (None = one pass) that keeps a calibrator pass within the bound."""
    unknown = prepared.unknown_tensors
    if method == "minmax":
        per_sample = prepared.tensor_count * _MINMAX_PER_TENSOR_BYTES
    else:
        per_sample = prepared.activation_bytes
    bound = max_memory_mb * 1024 * 1024
    chunk = calibration_chunk(per_sample, bound, count)
    if chunk >= count:
        return None
    mb = per_sample * chunk / 2**20
    text = (f"calibration ({method}) streamed {count} samples to onnxruntime's calibrator in {count // chunk} "
            f"passes of {chunk} (about {mb:.1f} MB of activations held per pass; "
            f"max_calibration_memory_mb = {max_memory_mb})")
    if unknown:
        text += f"; {unknown} activation tensor(s) of unknown size are not in that estimate"
    if method != "minmax":
        text += ("; histograms are merged across passes, so the ranges can differ slightly from a single pass "
                 "over all samples")
    notes.append(text)
    return chunk


def _quiet_stdout() -> Any:
    """onnxruntime's histogram calibrators print progress to stdout; keep stdout clean for `--json`."""
    import contextlib
    import sys

    return contextlib.redirect_stdout(sys.stderr)


def _quantize_static(src: Path, dst: Path, calib: np.ndarray, input_name: str, per_channel: bool,
                     method: str, symmetric_activations: bool, notes: list[str], *,
                     exclude_nodes: tuple[str, ...] = (), exclude_op_types: tuple[str, ...] = (),
                     chunk: int | None = None) -> _Reader:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}

    extra: dict[str, Any] = {}
    if symmetric_activations:
        extra["ActivationSymmetric"] = True
    if chunk is not None:
        # despite its name, onnxruntime applies CalibStridedMinMax to every calibration method: it calls the
        # calibrator once per chunk (set_range) and merges the results. Not CalibMaxIntermediateOutputs:
        # onnxruntime 1.31's MinMax calibrator drops the ranges of every full chunk with it
        # (microsoft/onnxruntime#18893), and the histogram calibrators ignore it.
        extra["CalibStridedMinMax"] = chunk
    op_types = _quantized_op_types(src, exclude_op_types)
    last: list[_Reader] = []

    def run(options: dict[str, Any]) -> None:
        reader = make_reader(input_name, calib)
        last[:] = [reader]
        with _quiet_stdout():
            ort_quantize_static(
                str(src), str(dst), reader, quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=per_channel,
                calibrate_method=methods[method], extra_options=options or None,
                nodes_to_exclude=list(exclude_nodes) or None, op_types_to_quantize=op_types,
            )

    try:
        run(extra)
        return last[0]
    except Exception as first:  # onnxruntime's quantizer raises plain Python errors from deep inside
        if _GEMM_BIAS_BUG not in str(first):
            raise ConversionError(
                f"onnxruntime static quantization failed (step: quantize, "
                f"{'per-channel' if per_channel else 'per-tensor'}, {method}): {type(first).__name__}: "
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
    return last[0]


def _quantized_op_types(model_path: Path, exclude_op_types: tuple[str, ...]) -> list[str] | None:
    """op_types_to_quantize for onnxruntime: None (its default: all) unless some op types are kept in float."""
    if not exclude_op_types:
        return None
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    default = set(QLinearOpsRegistry) | set(QDQRegistry)  # what quantize_static quantizes when given None
    return sorted(default - set(exclude_op_types))


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


def _name_nodes(model: Any) -> list[str]:
    """Give every unnamed node a unique name (``<op type>_<index>``): exclusions and reports need names."""
    names = {n.name for n in model.graph.node if n.name}
    given: list[str] = []
    for i, node in enumerate(model.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{i}"
        while name in names:
            name += "_"
        node.name = name
        names.add(name)
        given.append(name)
    return given


@dataclass(frozen=True)
class PreparedOnnx:
    """A float model ready for static quantization (batch fixed, opset >= 13, pre-processed, nodes named).

    Quantizing it again with other settings (the recovery ladder) skips the preparation.
    """

    path: Path
    nodes: dict[str, str]  # node name -> op type, in graph order
    notes: tuple[str, ...]
    activation_bytes: int = 0  # float activations of one sample (shape inference), see activation_bytes()
    unknown_tensors: int = 0  # activations of unknown size, not in activation_bytes
    tensor_count: int = 0  # activations onnxruntime's MinMax calibrator reduces to a min and a max


def prepare_static(src: Path, workdir: Path) -> PreparedOnnx:
    """Prepare ``src`` for static QDQ quantization in ``workdir`` (see ``PreparedOnnx``)."""
    src, workdir = Path(src), Path(workdir)
    notes: list[str] = []
    prepared = _prepared(src, workdir, notes, "QDQ quantization needs opset 13: per-channel "
                                              "DequantizeLinear takes an axis attribute")
    pre = workdir / "preprocessed.onnx"
    _preprocess(prepared, pre, notes)
    model = load_model(pre)
    named = _name_nodes(model)
    if named:
        _save(model, pre, "name nodes")
        notes.append(f"{len(named)} unnamed node(s) of the pre-processed model were named <op type>_<index> "
                     f"(e.g. {named[0]!r}) so they can be kept in float and named in reports")
    act, unknown = activation_bytes(model)
    tensors = len({*(v.name for v in model.graph.value_info), *(o.name for o in model.graph.output),
                   *(i.name for i in model.graph.input)})
    return PreparedOnnx(pre, {n.name: n.op_type for n in model.graph.node}, tuple(notes), act, unknown, tensors)


def _check_exclusions(src: Path, prepared: PreparedOnnx, exclude_nodes: tuple[str, ...],
                      exclude_op_types: tuple[str, ...], notes: list[str]) -> None:
    missing = [n for n in exclude_nodes if n not in prepared.nodes]
    if missing:
        original = {n.name for n in load_model(src).graph.node if n.name}
        fused = [n for n in missing if n in original]
        shown = ", ".join(repr(n) for n in list(prepared.nodes)[:20])
        shown += ", ..." if len(prepared.nodes) > 20 else ""
        why = (f"node {fused[0]!r} is in {src.name} but onnxruntime's pre-processing fused or renamed it"
               if fused else f"there is no node named {missing[0]!r} in {src.name}")
        raise InputError(f"cannot keep node(s) {', '.join(repr(n) for n in missing)} in float: {why}",
                         hint=f"name nodes of the pre-processed model: {shown}; or keep whole op types in float "
                              "with exclude_op_types / --exclude-op-types")
    if exclude_nodes:
        notes.append(f"nodes kept in float: {', '.join(exclude_nodes)}")
    if exclude_op_types:
        present = set(prepared.nodes.values())
        absent = [t for t in exclude_op_types if t not in present]
        kept = [t for t in exclude_op_types if t in present]
        if kept:
            notes.append(f"op types kept in float (exclude_op_types): {', '.join(kept)}")
        if absent:
            notes.append(f"exclude_op_types names {', '.join(absent)}, which the model does not use after "
                         "pre-processing (nothing to keep in float for them)")


def quantize_prepared(prepared: PreparedOnnx, src: Path, dst: Path, calib: np.ndarray, input_name: str, *,
                      per_channel: bool, method: str, workdir: Path, symmetric_activations: bool = False,
                      exclude_nodes: tuple[str, ...] = (), exclude_op_types: tuple[str, ...] = (),
                      max_memory_mb: int = 512) -> list[str]:
    """Static INT8 QDQ quantization of a prepared model into dst (checked to run); returns the notes."""
    if method not in METHODS:
        raise InputError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if len(calib) == 0:
        raise InputError("static quantization needs at least one calibration sample")
    notes: list[str] = []
    _check_exclusions(Path(src), prepared, tuple(exclude_nodes), tuple(exclude_op_types), notes)
    chunk = _calibration_plan(prepared, method, len(calib), max_memory_mb, notes)
    quant = Path(workdir) / "quantized.onnx"
    _quantize_static(prepared.path, quant, calib, input_name, per_channel, method, symmetric_activations, notes,
                     exclude_nodes=tuple(exclude_nodes), exclude_op_types=tuple(exclude_op_types), chunk=chunk)
    ops = count_ops(quant)
    if not ops.get("QuantizeLinear"):
        notes.append("onnxruntime inserted no QuantizeLinear nodes: the model has no operators it quantizes, "
                     "so the bundle's model stays float")
    _prove_runs(quant, calib[0], input_name, "quantized")
    _install(quant, Path(dst))
    return notes


def quantize_onnx(src: Path, dst: Path, calib: np.ndarray, input_name: str, *, per_channel: bool,
                  method: str, workdir: Path, symmetric_activations: bool = False,
                  exclude_nodes: tuple[str, ...] = (), exclude_op_types: tuple[str, ...] = (),
                  max_memory_mb: int = 512) -> list[str]:
    """Static INT8 QDQ quantization (int8 activations and weights) of src into dst; returns the notes.

    ``exclude_nodes`` (node names of the pre-processed model) and ``exclude_op_types`` stay in float;
    ``max_memory_mb`` bounds the activations onnxruntime's calibrator holds at once.
    """
    if method not in METHODS:
        raise InputError(f"calibration method {method!r} is not one of {', '.join(METHODS)}")
    if len(calib) == 0:
        raise InputError("static quantization needs at least one calibration sample")
    prepared = prepare_static(Path(src), Path(workdir))
    notes = list(prepared.notes)
    notes.extend(quantize_prepared(prepared, Path(src), Path(dst), calib, input_name, per_channel=per_channel,
                                   method=method, workdir=Path(workdir),
                                   symmetric_activations=symmetric_activations, exclude_nodes=exclude_nodes,
                                   exclude_op_types=exclude_op_types, max_memory_mb=max_memory_mb))
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


# --------------------------------------------------------------------------------------------------
# per-layer quantization error (for the recovery ladder)

DEBUG_SAMPLES = 32  # at most this many validation samples feed the per-layer error ranking


def _neighbours(model: Any) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(tensor -> producing node name, tensor -> consuming node names) of a graph."""
    producer: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for t in node.output:
            producer[t] = node.name
        for t in node.input:
            consumers.setdefault(t, []).append(node.name)
    return producer, consumers


def _layer_nodes(tensor: str, float_model: Any, qdq_model: Any, names: set[str]) -> tuple[str, ...]:
    """The nodes that must stay in float for ``tensor`` to stay float: its producer and consumers in the float
    model, and in the QDQ model its producer (the quantizer folds e.g. a Relu into the op before it) and the
    consumers of its DequantizeLinear outputs. Only nodes of the float model count."""
    found: list[str] = []
    f_prod, f_cons = _neighbours(float_model)
    q_prod, q_cons = _neighbours(qdq_model)
    q_nodes = {n.name: n for n in qdq_model.graph.node}
    found += [f_prod[tensor]] if tensor in f_prod else []
    found += f_cons.get(tensor, [])
    if tensor in q_prod:
        found.append(q_prod[tensor])
    for q_name in q_cons.get(tensor, []):
        q_node = q_nodes[q_name]
        if q_node.op_type != "QuantizeLinear":
            found.append(q_name)
            continue
        for dq_name in q_cons.get(q_node.output[0], []):
            if q_nodes[dq_name].op_type == "DequantizeLinear":
                found += q_cons.get(q_nodes[dq_name].output[0], [])
    return tuple(dict.fromkeys(n for n in found if n in names))


def _fake_quant(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """What a QuantizeLinear + DequantizeLinear pair (per tensor) makes of ``x``."""
    info = np.iinfo(zero_point.dtype)
    zp = zero_point.astype(np.float64)
    q = np.clip(np.rint(x.astype(np.float64) / float(scale)) + zp, info.min, info.max)
    return ((q - zp) * float(scale)).astype(np.float32)


def _activation_qparams(qdq_model: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Quantized activation name -> (scale, zero point) of its per-tensor QuantizeLinear in the QDQ model."""
    onnx = _onnx()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qdq_model.graph.initializer}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for node in qdq_model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits or len(node.input) < 3:
            continue
        scale, zp = inits.get(node.input[1]), inits.get(node.input[2])
        if scale is None or zp is None or scale.size != 1:
            continue
        name = node.input[0].removesuffix("_QuantizeLinear_Input")
        found[name] = (scale.reshape(()), zp.reshape(()))
    return found


def layer_errors(prepared: PreparedOnnx, quant: Path, samples: np.ndarray, input_name: str, workdir: Path, *,
                 max_memory_mb: int = 512) -> list[Any]:
    """Every quantized activation of ``quant`` with its quantization error, worst first (``LayerError``).

    onnxruntime's ``qdq_loss_debug`` runs the float and the QDQ model with every activation as an extra
    output. ``error_db`` is the error that quantizing one activation adds: the float model's activation is
    put through that tensor's QuantizeLinear/DequantizeLinear (scale and zero point of the QDQ model) and
    compared with itself, per channel (``channel_sqnr_db``). ``detail`` adds onnxruntime's own figures:
    ``qdq_err`` (SQNR before vs after the QDQ pair inside the QDQ model; misleading where the quantizer
    folded a Relu into the pair, as it then compares pre-Relu with post-Relu values) and ``xmodel_err``
    (QDQ vs float activation: the error accumulated up to there). At most ``DEBUG_SAMPLES`` samples are
    used, fewer when their activations would exceed ``max_memory_mb``.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations,
        compute_signal_to_quantization_noice_ratio,
        create_activation_matching,
        modify_model_output_intermediate_tensors,
    )

    from converters.gate import channel_sqnr_db
    from converters.ladder import LayerError

    onnx = _onnx()
    workdir = Path(workdir)
    per_sample = prepared.activation_bytes
    # the QDQ model has about three activations (float, quantized, dequantized) for each float one
    count = calibration_chunk(4 * per_sample, max_memory_mb * 2**20, min(len(samples), DEBUG_SAMPLES))
    batch = samples[:count]
    aug_float, aug_qdq = workdir / "debug_float.onnx", workdir / "debug_qdq.onnx"
    try:
        with _quiet_stdout():
            modify_model_output_intermediate_tensors(str(prepared.path), str(aug_float))
            modify_model_output_intermediate_tensors(str(quant), str(aug_qdq))
            float_acts = collect_activations(str(aug_float), make_reader(input_name, batch))
            qdq_acts = collect_activations(str(aug_qdq), make_reader(input_name, batch))
        matching = create_activation_matching(qdq_acts, float_acts)
    except Exception as e:  # onnxruntime/onnx errors of many kinds from the debugging tools
        raise ConversionError(f"onnxruntime's QDQ debugging tools failed to compare the activations (step: "
                              f"ladder): {type(e).__name__}: {_first_line(e)}",
                              hint="keep layers in float yourself with --exclude-nodes, or skip the ladder with "
                                   "--no-ladder") from e
    float_model, qdq_model = onnx.load(str(prepared.path)), onnx.load(str(quant))
    names = set(prepared.nodes)
    result = []
    for tensor, (scale, zero_point) in _activation_qparams(qdq_model).items():
        values = float_acts.get(tensor)
        if not values:
            continue
        x = np.stack([np.asarray(v) for v in values])
        # collect_activations flattens each tensor; recover the channel axis from the float model's shape
        shape = _tensor_shape(float_model, tensor)
        if shape is not None and int(np.prod(shape)) == x[0].size:
            x = x.reshape(len(x), *shape)
        axis = 2 if x.ndim == 5 else x.ndim - 1  # (samples, N, C, H, W): C; otherwise the last axis
        error = channel_sqnr_db(x, _fake_quant(x, scale, zero_point), axis)
        detail = f"per-channel SQNR of quantizing the float activation {error:.1f} dB"
        match = matching.get(tensor)
        if match is not None:
            detail += (f"; onnxruntime qdq_err "
                       f"{compute_signal_to_quantization_noice_ratio(match['pre_qdq'], match['post_qdq']):.1f} dB")
            if match.get("float"):
                xmodel = compute_signal_to_quantization_noice_ratio(match["float"], match["post_qdq"])
                detail += f", xmodel_err {xmodel:.1f} dB"
        result.append(LayerError(tensor, error, _layer_nodes(tensor, float_model, qdq_model, names), detail))
    result.sort(key=lambda layer: (layer.error_db, layer.name))
    return result


def _tensor_shape(model: Any, name: str) -> tuple[int, ...] | None:
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        if value.name == name:
            dims = value.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
                return tuple(int(d.dim_value) for d in dims)
            return None
    return None
