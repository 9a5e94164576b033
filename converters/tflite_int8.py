"""TFLite models for LiteRT: Keras / SavedModel / float .tflite -> int8, dynamic, fp16 or float .tflite.

Sources:

* Keras 3 ``.keras`` files and Keras 2/3 HDF5 files (``.h5``, ``.hdf5``), loaded with
  ``keras.models.load_model(compile=False)``;
* SavedModel folders (``saved_model.pb`` inside), their ``serving_default`` signature (or the only one);
* float ``.tflite`` files, quantized with ai-edge-quantizer (``pip install 'edgekit[host]'``); a ``.tflite``
  with mode ``none`` is packaged as it is.

Keras and SavedModel sources are first re-traced into a SavedModel with a **fixed batch size of 1**
(``training=False``): with a dynamic batch the TFLite graph gains SHAPE/STRIDED_SLICE/PACK ops and the
XNNPACK delegate takes nothing. That SavedModel is converted with ``tf.lite.TFLiteConverter``:

* ``int8``: full-integer; a representative dataset from the calibration samples; ``TFLITE_BUILTINS_INT8``;
  int8 or uint8 inputs/outputs as the profile's ``io_dtype`` says (float32 keeps float I/O with
  QUANTIZE/DEQUANTIZE at the graph edges);
* ``dynamic``: int8 weights, activations quantized at run time (no calibration);
* ``fp16``: float16 weights (dequantized to float32 when the model loads on a CPU);
* ``none``: float32.

TensorFlow 2.21's quantizer does not fail on an op that has no int8 kernel (SIN, COS, CUMSUM, RFFT2D, ...):
it silently keeps that op in float between DEQUANTIZE and QUANTIZE. So every int8 model is inspected
after conversion: an op that still computes in float is a ``ConversionError`` naming the op and where it
is, unless ``allow_float_ops`` is set, in which case the ops are listed in the report. Ops that TFLite has
no builtin kernel for at all (tf.Cumprod, tf.Erf, ...) fail the conversion in every mode; they would need
TensorFlow Select ops (Flex), which LiteRT on a device does not ship.

TensorFlow and LiteRT are imported inside functions: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ConversionError, InputError, MissingDependencyError, ModelError, missing_extra
from edge_agent.manifest import TensorSpec
from edge_agent.preprocess import quantize

MODES = ("int8", "dynamic", "fp16", "none")
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
BATCH = 1
FLOAT_OPS_HINT = "--allow-float-ops keeps them in float (slower on XNNPACK, impossible on the Edge TPU)"
_FLOAT_KINDS = "fc"  # numpy dtype kinds of float and complex tensors
_EDGE_OPS = ("QUANTIZE", "DEQUANTIZE")
_SIGNATURE = "serving_default"
# 'tf.Cumprod' op is neither a custom op nor a flex op
_NO_BUILTIN = re.compile(r"'tf\.(\w+)' op is neither a custom op nor a flex op")
# loc(callsite(fused["Cumprod:", "functional_1/lambda_1/Cumprod@__inference_function_102"] at ...
_LOCATION = re.compile(r'fused\["(\w+):", "([^"@]+)(?:@[^"]*)?"\]')
# the legacy quantizer: Quantization not yet supported for op: 'SIN'.
_NO_INT8 = re.compile(r"Quantization not yet supported for op: '(\w+)'")


@dataclass(frozen=True)
class FloatOp:
    """An op of a converted model that computes in float."""

    index: int  # node index in the model's main subgraph
    op: str  # TFLite op name, e.g. SIN
    location: str  # the names of its output tensors, which carry the source layer path

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "op": self.op, "location": self.location}

    def __str__(self) -> str:
        return f"{self.op} (node {self.index}, at {self.location!r})"


@dataclass
class TFLiteSource:
    """A model prepared for conversion: a fixed-batch SavedModel, or the bytes of a .tflite file."""

    kind: str  # "keras" | "savedmodel" | "tflite"
    path: Path
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    saved_model: Path | None = None
    tflite: bytes | None = None
    notes: list[str] = field(default_factory=list)
    quantized: bool = False  # a .tflite that is already integer-quantized


@dataclass(frozen=True)
class TFLiteConversion:
    """What convert_tflite_model did: notes for the report, ops left in float, tools used.

    ``kept_float`` are the float ops asked for (``float_nodes`` / ``float_op_types``: the user's exclusions
    and the recovery ladder's layers); they are not in ``float_ops`` and never fail the no-float-ops check.
    """

    notes: list[str]
    float_ops: list[FloatOp]
    tools: dict[str, str]
    kept_float: list[FloatOp] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# imports


def _tf() -> Any:
    try:
        import tensorflow as tf
    except ImportError as e:
        raise missing_extra("tensorflow-cpu", "host", "converting models to TFLite") from e
    return tf


def _keras() -> Any:
    try:
        import keras
    except ImportError as e:
        raise missing_extra("keras", "host", "loading Keras models") from e
    return keras


def litert() -> tuple[Any, Any]:
    """(Interpreter, OpResolverType) from ai_edge_litert."""
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as e:
        raise missing_extra("ai-edge-litert", "tflite", "running TFLite models") from e
    return Interpreter, OpResolverType


def litert_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-litert")
    except PackageNotFoundError:
        return "unknown"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Keras and TensorFlow print progress to stdout; keep stdout clean for `--json` output."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


# --------------------------------------------------------------------------------------------------
# LiteRT helpers


def interpreter(model: Path | bytes, threads: int | None = None, *, delegates: bool = True) -> Any:
    """A LiteRT interpreter with tensors allocated.

    ``delegates=True`` lets LiteRT apply its default delegate (XNNPACK), as the device does;
    ``delegates=False`` uses BUILTIN_WITHOUT_DEFAULT_DELEGATES (the plain reference graph).
    """
    Interpreter, OpResolverType = litert()
    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    kwargs: dict[str, Any] = {"num_threads": threads, "experimental_op_resolver_type": resolver}
    if isinstance(model, (bytes, bytearray)):
        kwargs["model_content"] = bytes(model)
    else:
        kwargs["model_path"] = str(model)
    it = Interpreter(**kwargs)
    it.allocate_tensors()
    return it


def _dtype_name(dtype: Any) -> str:
    return np.dtype(dtype).name


def spec_from_detail(detail: dict[str, Any]) -> TensorSpec:
    """A manifest TensorSpec from LiteRT's get_input_details()/get_output_details() entry.

    The batch axis is recorded as 1 (the interpreter runs one sample); other dynamic axes stay -1.
    """
    signature = [int(d) for d in detail.get("shape_signature", [])] or [int(d) for d in detail["shape"]]
    if signature and signature[0] == -1:
        signature[0] = BATCH
    scale, zero_point = detail.get("quantization", (0.0, 0))
    quantized = bool(scale) and _dtype_name(detail["dtype"]) in ("int8", "uint8", "int16")
    return TensorSpec(detail["name"], tuple(signature), _dtype_name(detail["dtype"]),
                      float(scale) if quantized else None, int(zero_point) if quantized else None)


def tflite_io(model: Path | bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) of a .tflite with dtype and quantization scale/zero point, read with LiteRT."""
    it = interpreter(model, delegates=False)
    return ([spec_from_detail(d) for d in it.get_input_details()],
            [spec_from_detail(d) for d in it.get_output_details()])


def to_model_input(x: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A float sample -> the model's input dtype (quantized with the input's scale/zero point)."""
    if spec.dtype in ("int8", "uint8", "int16") and spec.scale:
        return quantize(x, spec.scale, int(spec.zero_point or 0), spec.dtype)
    return np.ascontiguousarray(x, dtype=np.dtype(spec.dtype))


def find_float_ops(model: Path | bytes) -> list[FloatOp]:
    """Ops (other than QUANTIZE/DEQUANTIZE at float edges) whose inputs or outputs are float or complex."""
    it = interpreter(model, delegates=False)
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    found: list[FloatOp] = []
    for op in it._get_ops_details():
        if op["op_name"] in _EDGE_OPS or op["op_name"] == "DELEGATE":
            continue
        indices = [int(i) for i in (*op["inputs"], *op["outputs"]) if int(i) >= 0 and int(i) in tensors]
        if any(np.dtype(tensors[i]["dtype"]).kind in _FLOAT_KINDS for i in indices):
            names = [tensors[int(i)]["name"] for i in op["outputs"] if int(i) in tensors]
            found.append(FloatOp(int(op["index"]), op["op_name"], ", ".join(names)))
    return found


def op_counts(model: Path | bytes) -> dict[str, int]:
    """Node count per TFLite op of the model's main subgraph (without delegates)."""
    counts: dict[str, int] = {}
    for op in interpreter(model, delegates=False)._get_ops_details():
        counts[op["op_name"]] = counts.get(op["op_name"], 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------
# sources


def source_kind(path: Path) -> str | None:
    """'keras', 'savedmodel', 'tflite', or None when the path is none of these."""
    path = Path(path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return "savedmodel"
        return None
    suffix = path.suffix.lower()
    if suffix in KERAS_SUFFIXES:
        return "keras"
    if suffix == ".tflite":
        return "tflite"
    return None


def _fixed_spec(name: str, shape: Any, dtype: str, where: str, notes: list[str]) -> TensorSpec:
    dims = [None if d is None else int(d) for d in shape]
    if not dims:
        raise ModelError(f"{where}: input {name!r} is a scalar; edgekit converts models whose input has a "
                         "batch axis", hint="give the model an input of shape (batch, ...)")
    if any(d is None or d < 1 for d in dims[1:]):
        raise ModelError(
            f"{where}: input {name!r} has shape {tuple(dims)}: only the batch axis may be dynamic; TFLite "
            "models for edge devices need fixed input sizes",
            hint="build the model with a fixed input shape, e.g. keras.Input(shape=(224, 224, 3))",
        )
    if dims[0] != BATCH:
        was = "dynamic" if dims[0] is None or dims[0] < 1 else str(dims[0])
        notes.append(f"the batch axis of input {name!r} ({was}) was fixed to {BATCH} by re-tracing the model: "
                     "a dynamic batch adds SHAPE/STRIDED_SLICE/PACK ops to the TFLite graph and the XNNPACK "
                     "delegate then takes nothing")
    return TensorSpec(name, (BATCH, *dims[1:]), dtype)


def _out_spec(name: str, shape: Any, dtype: str) -> TensorSpec:
    dims = [-1 if d is None else int(d) for d in shape]
    if dims:
        dims[0] = BATCH
    return TensorSpec(name, tuple(dims), dtype)


def _load_keras(path: Path) -> Any:
    keras = _keras()
    try:
        with _quiet_stdout():
            return keras.models.load_model(str(path), compile=False)
    except Exception as e:  # Keras raises ValueError/OSError/TypeError and h5py errors for non-models
        text = str(e)
        if "safe_mode" in text:
            raise ModelError(
                f"{path}: Keras refuses to load a Lambda layer's Python code in safe mode ({_first_line(e)})",
                hint="if you trust the file, export it as a SavedModel (model.export(DIR)) and convert that "
                     "folder; or replace the Lambda layer with a registered custom layer",
            ) from e
        raise ModelError(f"{path} is not a Keras model that Keras {keras.__version__} can load "
                         f"({type(e).__name__}: {_first_line(e)})",
                         hint="give a .keras file saved by model.save(), a full-model .h5/.hdf5 (not weights "
                              "only), or a SavedModel folder") from e


def _prepare_keras(path: Path, workdir: Path, notes: list[str]) -> TFLiteSource:
    tf, keras = _tf(), _keras()
    model = _load_keras(path)
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ModelError(f"{path}: the Keras model has no known inputs (a subclassed model that was never "
                         "built)", hint="save a functional or Sequential model, or export a SavedModel with "
                                        "a fixed input signature")
    where = str(path)
    specs = [_fixed_spec(t.name, t.shape, _dtype_name(t.dtype), where, notes) for t in inputs]
    signature: Any = [tf.TensorSpec(s.shape, s.dtype, name=s.name) for s in specs]
    if len(signature) > 1:
        signature = [signature]  # a multi-input functional model takes its inputs as one list
    outputs = [_out_spec(t.name, t.shape, _dtype_name(t.dtype)) for t in model.outputs]
    out_dir = workdir / "saved_model"
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint("serve", functools.partial(model.__call__, training=False), signature)
        with _quiet_stdout():
            archive.write_out(str(out_dir), verbose=False)
    except Exception as e:  # Keras/TF tracing errors of many types
        raise ConversionError(f"tracing the Keras model {path} with a batch size of {BATCH} failed (step: "
                              f"export): {type(e).__name__}: {_first_line(e)}",
                              hint="check that the model runs on one sample: model(x[:1])") from e
    notes.append(f"the Keras model was loaded with Keras {keras.__version__} (compile=False) and traced for "
                 "inference (training=False: dropout off, batch norm in inference mode)")
    return TFLiteSource("keras", path, specs, outputs, saved_model=out_dir)


def _prepare_saved_model(path: Path, workdir: Path, notes: list[str]) -> TFLiteSource:
    tf = _tf()
    try:
        with _quiet_stdout():
            loaded = tf.saved_model.load(str(path))
    except Exception as e:  # TF raises OSError, ValueError, and its own errors for broken SavedModels
        raise ModelError(f"{path} is not a SavedModel TensorFlow can load ({type(e).__name__}: "
                         f"{_first_line(e)})", hint="export it again with tf.saved_model.save or "
                                                    "model.export(DIR)") from e
    signatures = dict(loaded.signatures)
    if _SIGNATURE in signatures:
        key = _SIGNATURE
    elif len(signatures) == 1:
        key = next(iter(signatures))
    else:
        raise ModelError(f"SavedModel {path} has signatures {sorted(signatures) or 'none'}; edgekit converts the "
                         f"{_SIGNATURE!r} signature (or the only one)",
                         hint="export it with signatures={'serving_default': fn}")
    fn = signatures[key]
    args, kwargs = fn.structured_input_signature
    if args or len(kwargs) != 1:
        raise ModelError(f"SavedModel {path} signature {key!r} takes {len(args) + len(kwargs)} inputs; this "
                         "version converts models with one input", hint="export a model with a single input")
    (name, tspec), = kwargs.items()
    where = f"SavedModel {path}"
    spec = _fixed_spec(name, tspec.shape, tspec.dtype.name, where, notes)
    structured = fn.structured_outputs
    outs = structured.items() if isinstance(structured, dict) else [("output_0", structured)]
    outputs = [_out_spec(n, t.shape, t.dtype.name) for n, t in outs]
    if key != _SIGNATURE:
        notes.append(f"the SavedModel's only signature {key!r} was converted")
    if tuple(tspec.shape) == spec.shape and key == _SIGNATURE:
        return TFLiteSource("savedmodel", path, [spec], outputs, saved_model=path)
    out_dir = workdir / "saved_model"
    try:
        module = tf.Module()
        module.inner = loaded

        @tf.function(input_signature=[tf.TensorSpec(spec.shape, tspec.dtype, name=name)])
        def serve(x: Any) -> Any:
            return fn(**{name: x})

        with _quiet_stdout():
            tf.saved_model.save(module, str(out_dir), signatures={_SIGNATURE: serve})
    except Exception as e:  # TF tracing errors of many types
        raise ConversionError(f"re-tracing SavedModel {path} with a batch size of {BATCH} failed (step: "
                              f"export): {type(e).__name__}: {_first_line(e)}",
                              hint="export the SavedModel with a fixed input signature of batch 1") from e
    return TFLiteSource("savedmodel", path, [spec], outputs, saved_model=out_dir)


def _prepare_tflite(path: Path, notes: list[str]) -> TFLiteSource:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror}") from e
    try:
        it = interpreter(raw, delegates=False)
    except MissingDependencyError:
        raise
    except Exception as e:  # LiteRT raises ValueError/RuntimeError for bad flatbuffers and unknown ops
        text = str(e)
        if "custom op" in text.lower() or "unresolved" in text.lower():
            raise ModelError(f"{path} uses custom ops that stock LiteRT cannot run ({_first_line(e)})",
                             hint="convert the model without custom ops, or register the ops' kernels on the "
                                  "device (tflite-micro-only ops such as Signal* never run in LiteRT)") from e
        raise ModelError(f"{path} is not a TFLite model LiteRT can load ({_first_line(e)})",
                         hint="give a .tflite flatbuffer written by the TFLite converter") from e
    inputs = [spec_from_detail(d) for d in it.get_input_details()]
    outputs = [spec_from_detail(d) for d in it.get_output_details()]
    dynamic = [d["name"] for d in it.get_input_details()
               if len(d.get("shape_signature", [])) and int(d["shape_signature"][0]) == -1]
    if dynamic:
        notes.append(f"the .tflite declares a dynamic batch axis for input {', '.join(map(repr, dynamic))}; a "
                     ".tflite cannot be re-traced, so it runs at batch 1 as it is (convert from the source model "
                     "for a graph traced at batch 1)")
    ops = {op["op_name"] for op in it._get_ops_details()}
    quantized = any(s.dtype in ("int8", "uint8", "int16") for s in (*inputs, *outputs)) or "QUANTIZE" in ops
    return TFLiteSource("tflite", path, inputs, outputs, tflite=raw, quantized=quantized)


def prepare_source(path: Path, workdir: Path) -> TFLiteSource:
    """Load ``path`` and make it ready for conversion (a fixed-batch SavedModel in ``workdir``)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist",
                         hint="check the path to the .keras/.h5/.hdf5/.tflite file or SavedModel folder")
    kind = source_kind(path)
    notes: list[str] = []
    if kind == "keras":
        source = _prepare_keras(path, Path(workdir), notes)
    elif kind == "savedmodel":
        source = _prepare_saved_model(path, Path(workdir), notes)
    elif kind == "tflite":
        source = _prepare_tflite(path, notes)
    else:
        raise InputError(f"{path} is not a model edgekit converts for TFLite",
                         hint="give a .keras/.h5/.hdf5 Keras model, a SavedModel folder (with saved_model.pb) "
                              "or a float .tflite")
    source.notes[:0] = notes
    return source


# --------------------------------------------------------------------------------------------------
# TFLiteConverter


def representative_dataset(calib: np.ndarray) -> Callable[[], Iterator[list[np.ndarray]]]:
    """The representative dataset of an int8 conversion: each sample (with its batch axis) in turn."""
    samples = np.ascontiguousarray(calib, dtype=np.float32)

    def gen() -> Iterator[list[np.ndarray]]:
        for sample in samples:
            yield [sample]

    return gen


def _converter_failure(e: BaseException, mode: str) -> ConversionError:
    """A ConversionError naming the ops the converter could not handle, and where they are."""
    text = str(e)
    missing = sorted(set(_NO_BUILTIN.findall(text)))
    if missing:
        places = sorted({f"{op} at {node!r}" for op, node in _LOCATION.findall(text) if op in missing})
        where = f" ({'; '.join(places)})" if places else ""
        return ConversionError(
            f"TFLite has no builtin kernel for op {', '.join(missing)}{where} (step: convert, mode {mode}); "
            "such ops need TensorFlow Select ops (Flex), which LiteRT on the device does not ship",
            hint="replace those layers with ops TFLite supports "
                 "(https://ai.google.dev/edge/litert/models/ops_compatibility); --allow-float-ops does not help "
                 "here: the ops have no TFLite kernel at all",
        )
    no_int8 = sorted(set(_NO_INT8.findall(text)))
    if no_int8:
        return ConversionError(f"full-integer int8 conversion failed: op {', '.join(no_int8)} has no int8 kernel "
                               "(step: convert)", hint=FLOAT_OPS_HINT)
    return ConversionError(f"the TFLite converter failed (step: convert, mode {mode}): {type(e).__name__}: "
                           f"{_first_line(e)}",
                           hint="check that the model runs in TensorFlow on one sample; report the model to the "
                                "edgekit issue tracker if it does")


def _int8_converter(saved_model: Path, calib: np.ndarray, *, io_dtype: str, per_channel: bool,
                    allow_float_ops: bool) -> Any:
    """A TFLiteConverter set up for full-integer conversion (what ``_tf_convert`` uses for mode int8)."""
    return _converter(saved_model, "int8", calib, io_dtype=io_dtype, per_channel=per_channel,
                      allow_float_ops=allow_float_ops)


def _converter(saved_model: Path, mode: str, calib: np.ndarray, *, io_dtype: str, per_channel: bool,
               allow_float_ops: bool) -> Any:
    tf = _tf()
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[_SIGNATURE])
    if mode == "int8":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative_dataset(calib)
        ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if allow_float_ops:
            ops.append(tf.lite.OpsSet.TFLITE_BUILTINS)
        converter.target_spec.supported_ops = ops
        if io_dtype != "float32":
            io_type = {"int8": tf.int8, "uint8": tf.uint8}[io_dtype]
            converter.inference_input_type = io_type
            converter.inference_output_type = io_type
        if not per_channel:
            converter._experimental_disable_per_channel = True
    elif mode == "dynamic":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    elif mode == "fp16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    return converter


def _tf_convert(saved_model: Path, mode: str, calib: np.ndarray, *, io_dtype: str, per_channel: bool,
                allow_float_ops: bool) -> bytes:
    converter = _converter(saved_model, mode, calib, io_dtype=io_dtype, per_channel=per_channel,
                           allow_float_ops=allow_float_ops)
    try:
        with _quiet_stdout():
            return bytes(converter.convert())
    except Exception as e:  # ConverterError, RuntimeError, ValueError from the MLIR converter and calibrator
        raise _converter_failure(e, mode) from e


def calibrate_tflite(saved_model: Path, calib: np.ndarray) -> bytes:
    """The calibrated (not yet quantized) model: every activation range recorded from the calibration samples.

    ``quantize_calibrated`` then quantizes it with any settings in milliseconds, so the recovery ladder
    calibrates once. Uses the converter's private ``_experimental_calibrate_only`` switch, as TF's own
    QuantizationDebugger does.
    """
    converter = _int8_converter(saved_model, calib, io_dtype="float32", per_channel=True, allow_float_ops=False)
    converter._experimental_calibrate_only = True
    try:
        with _quiet_stdout():
            return bytes(converter.convert())
    except Exception as e:  # ConverterError, RuntimeError, ValueError from the MLIR converter and calibrator
        raise _converter_failure(e, "int8") from e


def quantize_calibrated(calibrated: bytes, *, io_dtype: str, per_channel: bool,
                        float_nodes: tuple[str, ...] = (), float_op_types: tuple[str, ...] = ()) -> bytes:
    """Full-integer quantization of a calibrated model, keeping ``float_nodes`` (output tensor names of ops)
    and ``float_op_types`` (TFLite op names, e.g. SOFTMAX) in float.

    This is the call TFLiteConverter makes after calibrating (``tensorflow.lite.python.convert.mlir_quantize``,
    TF's internal module) plus the denylists that ``tf.lite.experimental.QuantizationDebugger`` passes; the
    debugger's public ``get_nondebug_quantized_model`` would give float32 inputs and outputs, not the
    profile's int8/uint8. Without denylists the model computes exactly what TFLiteConverter's does.
    """
    tf = _tf()
    from tensorflow.lite.python.convert import mlir_quantize

    io_type = {"int8": tf.int8, "uint8": tf.uint8, "float32": tf.float32}[io_dtype]
    try:
        with _quiet_stdout():
            return bytes(mlir_quantize(calibrated, disable_per_channel=not per_channel, fully_quantize=False,
                                       input_data_type=io_type, output_data_type=io_type,
                                       denylisted_nodes=list(float_nodes) or None,
                                       denylisted_ops=[t.upper() for t in float_op_types] or None))
    except Exception as e:  # ConverterError/RuntimeError from the MLIR quantizer
        raise ConversionError(f"TFLite's quantizer failed (step: quantize, "
                              f"{'per-channel' if per_channel else 'per-tensor'}, {len(float_nodes)} node(s) and "
                              f"{len(float_op_types)} op type(s) in float): {type(e).__name__}: {_first_line(e)}",
                              hint="check the node names (output tensor names of the ops) and op names") from e


# --------------------------------------------------------------------------------------------------
# ai-edge-quantizer for float .tflite sources


def _aeq() -> Any:
    try:
        import ai_edge_quantizer
    except ImportError as e:
        raise MissingDependencyError(
            "quantizing a float .tflite file needs the Python package 'ai-edge-quantizer', which is not "
            "installed; full-integer and dynamic quantization of a .tflite otherwise need the source model",
            hint="pip install 'edgekit[host]'; or convert the source model (.keras/.h5/.hdf5 or a SavedModel "
                 "folder); or package the .tflite as it is with --mode none",
        ) from e
    return ai_edge_quantizer


def _aeq_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ai-edge-quantizer")
    except PackageNotFoundError:
        return "unknown"


def _normalise_for_aeq(raw: bytes, notes: list[str]) -> tuple[bytes, str]:
    """Fix what ai-edge-quantizer 0.10 misreads in older .tflite files; returns (model, input name).

    * Files from TF < 2.4 set only ``deprecated_builtin_code`` (``builtin_code`` stays 0 = ADD): the
      quantizer then treats every FULLY_CONNECTED as ADD and writes a model LiteRT refuses
      ("is_optional_bias_int != true"). The schema says the real code is the larger of the two.
    * The quantizer feeds data through a signature; files without one get ``serving_default``.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(raw))
    fixed = 0
    for code in model.operatorCodes:
        real = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        if real != code.builtinCode:
            code.builtinCode = real
            fixed += 1
    if fixed:
        notes.append(f"{fixed} operator code(s) of the .tflite set only the deprecated builtin code (a file "
                     "from TensorFlow < 2.4); they were normalised before ai-edge-quantizer read the model, "
                     "which otherwise misreads them (e.g. FULLY_CONNECTED as ADD) and writes a model LiteRT "
                     "refuses")
    if len(model.subgraphs) != 1:
        raise InputError(f"the .tflite has {len(model.subgraphs)} subgraphs; edgekit quantizes single-graph "
                         ".tflite files", hint="convert from the source model instead")
    graph = model.subgraphs[0]
    if not model.signatureDefs:
        def tensor_map(index: int) -> Any:
            entry = schema.TensorMapT()
            name = graph.tensors[index].name
            entry.name = name.decode() if isinstance(name, bytes) else str(name)
            entry.tensorIndex = int(index)
            return entry

        signature = schema.SignatureDefT()
        signature.signatureKey = _SIGNATURE
        signature.subgraphIndex = 0
        signature.inputs = [tensor_map(i) for i in graph.inputs]
        signature.outputs = [tensor_map(i) for i in graph.outputs]
        model.signatureDefs = [signature]
        notes.append(f"the .tflite has no signature; a {_SIGNATURE!r} signature over its inputs and outputs "
                     "was added so ai-edge-quantizer can feed it calibration data")
    out = bytes(flatbuffer_utils.convert_object_to_bytearray(model))
    it = interpreter(out, delegates=False)
    signatures = it.get_signature_list()
    key = _SIGNATURE if _SIGNATURE in signatures else next(iter(signatures))
    return out, signatures[key]["inputs"][0]


def _aeq_quantize(raw: bytes, mode: str, calib: np.ndarray, *, io_dtype: str, per_channel: bool,
                  notes: list[str]) -> bytes:
    _aeq()
    from ai_edge_quantizer import calibrator, qtyping, quantizer, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName
    from ai_edge_quantizer.utils import qsv_utils

    if mode == "int8" and io_dtype != "int8":
        raise InputError(
            f"the profile asks for {io_dtype} inputs and outputs; ai-edge-quantizer writes a full-integer "
            ".tflite with int8 inputs and outputs only",
            hint="convert from the source model (.keras/.h5/.hdf5 or a SavedModel folder), which gives any I/O "
                 "dtype, or use a copy of the profile with quantization.io_dtype = 'int8'",
        )
    model, input_name = _normalise_for_aeq(raw, notes)
    every = qtyping.TFLOperationName.ALL_SUPPORTED
    granularity = (qtyping.QuantGranularity.CHANNELWISE if per_channel
                   else qtyping.QuantGranularity.TENSORWISE)
    try:
        qt = quantizer.Quantizer(model)
        if mode == "int8":
            qt.add_static_config(regex=".*", operation_name=every, activation_num_bits=8, weight_num_bits=8,
                                 weight_granularity=granularity)
        elif mode == "dynamic":
            qt.add_dynamic_config(regex=".*", operation_name=every, num_bits=8, granularity=granularity)
        else:  # fp16
            qt.add_weight_only_config(regex=".*", operation_name=every, num_bits=16,
                                      algorithm_key=AlgorithmName.FLOAT_CASTING)
        with _quiet_stdout(), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            # progress bars go to stderr; the calibrator's interpreter keeps all tensors on purpose
            warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors.*")
            calibration = None
            if qt.need_calibration:
                # Quantizer.calibrate keeps a moving average (0.95) of each sample's min/max, which clips
                # the ranges of batch-1 samples (hand_gesture: 88% instead of 96% accuracy); the profiles'
                # "minmax" means the true min/max over all samples, which AEQ offers as min_max_update.
                recipe = recipe_manager.RecipeManager()
                recipe.load_quantization_recipe(qt.get_quantization_recipe())
                calib_run = calibrator.Calibrator(model, num_threads=os.cpu_count() or 1,
                                                  qsv_update_func=qsv_utils.min_max_update)
                data = [{input_name: np.ascontiguousarray(s, dtype=np.float32)} for s in calib]
                calib_run.calibrate({_SIGNATURE: data}, recipe)
                calibration = calib_run.get_model_qsvs()
            result = qt.quantize(calibration, enable_progress_report=False)
    except Exception as e:  # ai-edge-quantizer raises ValueError/RuntimeError/KeyError from deep inside
        raise ConversionError(f"ai-edge-quantizer {_aeq_version()} failed (step: quantize, mode {mode}): "
                              f"{type(e).__name__}: {_first_line(e)}",
                              hint="convert from the source model (.keras/.h5/.hdf5 or SavedModel) instead, "
                                   "and report the model to the edgekit issue tracker") from e
    what = {"int8": "static int8 weights and activations, activation ranges from the true min/max over the "
                    "calibration samples (not the quantizer's default moving average of per-sample ranges)",
            "dynamic": "int8 weights, activations quantized at run time",
            "fp16": "float16 weights of FULLY_CONNECTED/CONV_2D/CONV_2D_TRANSPOSE/EMBEDDING_LOOKUP (other "
                    "constants stay float32)"}[mode]
    notes.append(f"the float .tflite was quantized with ai-edge-quantizer {_aeq_version()}: {what}")
    return bytes(result.quantized_model)


# --------------------------------------------------------------------------------------------------
# the conversion


def _check_loads(model: bytes, sample: np.ndarray, what: str) -> None:
    """Load the model in LiteRT and run one sample: a model the converter wrote but LiteRT refuses is a bug."""
    try:
        it = interpreter(model)
        detail = it.get_input_details()[0]
        it.set_tensor(detail["index"], to_model_input(sample, spec_from_detail(detail)))
        it.invoke()
    except Exception as e:  # LiteRT raises RuntimeError/ValueError
        raise ConversionError(
            f"the {what} model does not run in LiteRT {litert_version()} (step: load check): {_first_line(e)}",
            hint="this is a converter bug or an upstream bug; try another quantization mode with --mode, and "
                 "report the model to the edgekit issue tracker",
        ) from e


def write_atomic(data: bytes, dst: Path) -> None:
    """Write ``data`` next to ``dst``, then rename it into place."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(f".{dst.name}.partial")
    try:
        with partial.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, dst)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {dst}: {e.strerror}", hint="check the output folder") from e


def _float_op_error(ops: list[FloatOp], how: str) -> ConversionError:
    listed = "; ".join(str(op) for op in ops[:12]) + ("; ..." if len(ops) > 12 else "")
    names = ", ".join(sorted({op.op for op in ops}))
    return ConversionError(
        f"full-integer int8 conversion {how} {len(ops)} op(s) without an int8 kernel in float: {names} "
        f"[{listed}] (step: convert)",
        hint=f"{FLOAT_OPS_HINT}; or replace those layers with ops that have int8 kernels",
    )


def _split_float_ops(ops: list[FloatOp], float_nodes: tuple[str, ...],
                     float_op_types: tuple[str, ...]) -> tuple[list[FloatOp], list[FloatOp]]:
    """(ops kept in float on purpose, the others)."""
    nodes, types = set(float_nodes), {t.upper() for t in float_op_types}
    kept, other = [], []
    for op in ops:
        names = {n.strip() for n in op.location.split(", ")}
        (kept if op.op in types or names & nodes else other).append(op)
    return kept, other


def convert_tflite_model(source: TFLiteSource, dst: Path, mode: str, calib: np.ndarray, *, io_dtype: str,
                         per_channel: bool = True, method: str = "minmax", allow_float_ops: bool = False,
                         edgetpu: bool = False, float_nodes: tuple[str, ...] = (),
                         float_op_types: tuple[str, ...] = (),
                         calibrated: bytes | None = None) -> TFLiteConversion:
    """Convert ``source`` to a .tflite at ``dst`` for ``mode``; ``calib`` is (N, *input shape) float32.

    ``io_dtype`` applies to mode int8 (int8, uint8, or float32 to keep float I/O). ``float_nodes`` (output
    tensor names of ops) and ``float_op_types`` (TFLite op names) stay in float in an int8 model (Keras and
    SavedModel sources); ``calibrated`` is a model from ``calibrate_tflite`` to reuse. The written model
    has been loaded and run once in LiteRT.
    """
    if mode not in MODES:
        raise InputError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "int8" and len(calib) == 0:
        raise InputError("full-integer quantization needs at least one calibration sample")
    if (float_nodes or float_op_types) and (mode != "int8" or source.kind == "tflite"):
        raise InputError("keeping nodes or op types in float (exclude_nodes / exclude_op_types) is available for "
                         "full-integer conversion of Keras and SavedModel sources only",
                         hint="convert from the source model, or drop --exclude-nodes / --exclude-op-types")
    notes: list[str] = []
    tools: dict[str, str] = {}
    if mode == "int8" and method != "minmax":
        notes.append(f"the profile's calibration_method {method!r} is not available for TFLite: activation "
                     "ranges were calibrated with min/max, the only method of the TFLite converter and "
                     "ai-edge-quantizer")
    if mode == "int8" and not per_channel and source.kind != "tflite":
        notes.append("weights were quantized per tensor (quantization.per_channel = false) through the "
                     "converter's private _experimental_disable_per_channel switch")
    if allow_float_ops and mode != "int8":
        notes.append(f"--allow-float-ops has no effect in mode {mode}: only full-integer int8 refuses float ops")
    if source.kind == "tflite":
        assert source.tflite is not None
        if mode == "none":
            model = source.tflite
            notes.append("quantization mode none: the .tflite was packaged as it is (not converted)")
        elif source.quantized:
            raise InputError(f"{source.path} is already quantized (integer inputs, outputs or QUANTIZE ops); "
                             f"it cannot be quantized again for mode {mode}",
                             hint="package it as it is with --mode none, or convert from the float source model")
        else:
            model = _aeq_quantize(source.tflite, mode, calib, io_dtype=io_dtype, per_channel=per_channel,
                                  notes=notes)
            tools["ai-edge-quantizer"] = _aeq_version()
    else:
        assert source.saved_model is not None
        if mode == "int8" and (float_nodes or float_op_types or calibrated is not None):
            if calibrated is None:
                calibrated = calibrate_tflite(source.saved_model, calib)
            model = quantize_calibrated(calibrated, io_dtype=io_dtype, per_channel=per_channel,
                                        float_nodes=float_nodes, float_op_types=float_op_types)
        else:
            model = _tf_convert(source.saved_model, mode, calib, io_dtype=io_dtype, per_channel=per_channel,
                                allow_float_ops=allow_float_ops)
        if mode == "dynamic":
            notes.append("quantization mode dynamic: weights are int8 (the converter leaves tensors under 1024 "
                         "elements in float), activations are quantized at run time; calibration samples are "
                         "used for validation only")
        elif mode == "fp16":
            notes.append("quantization mode fp16: weights are stored as float16 and dequantized to float32 when "
                         "the model loads on a CPU (half the size, float32 speed); calibration samples are used "
                         "for validation only")
        elif mode == "none":
            notes.append("quantization mode none: the model is packaged as float32, not quantized")
    float_ops: list[FloatOp] = []
    kept: list[FloatOp] = []
    if mode == "int8":
        kept, float_ops = _split_float_ops(find_float_ops(model), float_nodes, float_op_types)
        if float_nodes or float_op_types:
            found = {n.strip() for op in kept for n in op.location.split(", ")}
            missing = [n for n in float_nodes if n not in found]
            notes.append(f"{len(kept)} op(s) kept in float on purpose: "
                         f"{'; '.join(str(op) for op in kept[:8]) or 'none'}")
            if missing:
                notes.append(f"no op with output {', '.join(repr(n) for n in missing)} stayed in float: TFLite's "
                             "quantizer found no node of that name (names are the ops' output tensor names)")
        if float_ops and not allow_float_ops:
            raise _float_op_error(float_ops, "left")
        if float_ops:
            notes.append(f"--allow-float-ops: {len(float_ops)} op(s) without an int8 kernel stay in float "
                         f"({', '.join(sorted({op.op for op in float_ops}))}), between DEQUANTIZE and QUANTIZE "
                         "ops; they are listed in the report under float_ops")
            if edgetpu:
                notes.append("the Edge TPU runs integer ops only: the float ops, and every op after the first "
                             "of them, will run on the CPU")
        elif allow_float_ops:
            notes.append("--allow-float-ops was given, but every op got an int8 kernel")
    if edgetpu and mode != "int8":
        notes.append(f"the Edge TPU runs only full-integer int8 models: a {mode} model runs on the CPU only")
    _check_loads(model, calib[0], {"int8": "full-integer", "none": "float"}.get(mode, mode))
    write_atomic(model, Path(dst))
    return TFLiteConversion(notes, float_ops, tools, kept)


def check_written_model(model: Path, sample: np.ndarray, mode: str, *, allow_float_ops: bool, edgetpu: bool,
                        writer: str) -> tuple[list[FloatOp], list[str]]:
    """The checks ``convert_tflite_model`` makes, for a .tflite another converter wrote (``writer``, e.g.
    "onnx2tf"): an int8 model with ops still computing in float is a ``ConversionError`` unless
    ``allow_float_ops`` (then they are returned and noted), and the model must load and run ``sample`` (a
    float sample with its batch axis, in the model's layout) in LiteRT. Returns (float ops, notes)."""
    data = Path(model).read_bytes()
    notes: list[str] = []
    float_ops: list[FloatOp] = []
    if mode == "int8":
        float_ops = find_float_ops(data)
        if float_ops and not allow_float_ops:
            raise _float_op_error(float_ops, f"by {writer} left")
        if float_ops:
            notes.append(f"--allow-float-ops: {len(float_ops)} op(s) of the model {writer} wrote stay in float "
                         f"({', '.join(sorted({op.op for op in float_ops}))}); they are listed in the report "
                         "under float_ops")
            if edgetpu:
                notes.append("the Edge TPU runs integer ops only: the float ops, and every op after the first "
                             "of them, will run on the CPU")
        elif allow_float_ops:
            notes.append("--allow-float-ops was given, but every op got an int8 kernel")
    if edgetpu and mode != "int8":
        notes.append(f"the Edge TPU runs only full-integer int8 models: a {mode} model runs on the CPU only")
    _check_loads(data, sample, {"int8": "full-integer", "none": "float"}.get(mode, mode))
    return float_ops, notes


def float_reference(source: TFLiteSource, dst: Path) -> None:
    """The float32 .tflite of ``source`` (mode none, batch 1) at ``dst``: the reference for validation."""
    if source.kind == "tflite":
        assert source.tflite is not None
        write_atomic(source.tflite, Path(dst))
        return
    assert source.saved_model is not None
    write_atomic(_tf_convert(source.saved_model, "none", np.zeros((0,)), io_dtype="float32", per_channel=True,
                             allow_float_ops=False), Path(dst))


def tf_versions() -> dict[str, str]:
    """Versions of the conversion tools (imported only when already loaded)."""
    out: dict[str, str] = {"ai-edge-litert": litert_version()}
    for module, name in (("tensorflow", "tensorflow"), ("keras", "keras")):
        mod = sys.modules.get(module)
        if mod is not None:
            out[name] = str(getattr(mod, "__version__", "unknown"))
    return out




# --------------------------------------------------------------------------------------------------
# per-layer quantization error (for the recovery ladder)

DEBUG_SAMPLES = 32  # at most this many validation samples feed the per-layer error ranking


def _channel_sqnr_metric(float_values: np.ndarray, quant_values: np.ndarray, scale: float,
                         zero_point: int) -> float:
    """QuantizationDebugger layer_direct_compare_metric: per-channel SQNR (dB) of one op's int8 output
    against the same op computed in float on the same (dequantized) inputs."""
    from converters.gate import channel_sqnr_db

    f = np.asarray(float_values, dtype=np.float64)
    dq = (np.asarray(quant_values, dtype=np.float64) - zero_point) * scale
    return channel_sqnr_db(f[None], dq[None], f.ndim)


def _tensor_graph(model: bytes) -> tuple[dict[str, list[str]], set[str]]:
    """(output tensor name of each op -> output tensor names of the ops reading it, through DEQUANTIZE
    and QUANTIZE; every op output name) of a .tflite."""
    it = interpreter(model, delegates=False)
    names = {t["index"]: t["name"] for t in it.get_tensor_details()}
    ops = it._get_ops_details()
    readers: dict[int, list[dict[str, Any]]] = {}
    for op in ops:
        for t in op["inputs"]:
            readers.setdefault(int(t), []).append(op)

    def consumers(tensor: int, seen: set[int]) -> list[str]:
        found: list[str] = []
        for op in readers.get(tensor, []):
            outs = [int(t) for t in op["outputs"]]
            if op["op_name"] in _EDGE_OPS:
                for o in outs:
                    if o not in seen:
                        seen.add(o)
                        found += consumers(o, seen)
            else:
                found += [names[o] for o in outs if o in names]
        return found

    graph: dict[str, list[str]] = {}
    outputs: set[str] = set()
    for op in ops:
        if op["op_name"] in _EDGE_OPS or op["op_name"] == "DELEGATE":
            continue
        for t in op["outputs"]:
            name = names.get(int(t))
            if name is not None:
                outputs.add(name)
                graph[name] = consumers(int(t), {int(t)})
    return graph, outputs


def tflite_layer_errors(source: TFLiteSource, quant_model: bytes, calib: np.ndarray, samples: np.ndarray, *,
                        io_dtype: str, per_channel: bool, float_nodes: tuple[str, ...] = (),
                        float_op_types: tuple[str, ...] = ()) -> list[Any]:
    """The quantized ops of the model with their quantization error, worst first (``LayerError``).

    TF's ``tf.lite.experimental.QuantizationDebugger`` runs the model with a NumericVerify op after every
    quantized op, which computes the op in float on the same inputs; the error of a layer is the
    per-channel SQNR of its int8 output against that (``gate.channel_sqnr_db``, mean over samples), and
    ``detail`` adds TF's own ``rmse/scale``. A layer's nodes are its op and the ops reading its output: both
    must stay in float for the activation to stay float.
    """
    from converters.ladder import LayerError

    tf = _tf()
    if source.saved_model is None:
        raise ConversionError("per-layer errors need the Keras/SavedModel source (step: ladder)")
    converter = _int8_converter(source.saved_model, calib, io_dtype=io_dtype, per_channel=per_channel,
                                allow_float_ops=False)
    batch = np.ascontiguousarray(samples[:DEBUG_SAMPLES], dtype=np.float32)
    options = tf.lite.experimental.QuantizationDebugOptions(
        layer_direct_compare_metrics={"channel_sqnr_db": _channel_sqnr_metric},
        denylisted_nodes=list(float_nodes) or None, denylisted_ops=[t.upper() for t in float_op_types] or None)
    try:
        with _quiet_stdout(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=lambda: ([s] for s in batch), debug_options=options)
            debugger.run()
            table = io.StringIO()
            debugger.layer_statistics_dump(table)
    except Exception as e:  # TF raises ValueError/RuntimeError from the debugger and its interpreter
        raise ConversionError(f"TF's QuantizationDebugger failed (step: ladder): {type(e).__name__}: "
                              f"{_first_line(e)}",
                              hint="keep layers in float yourself with --exclude-nodes, or skip the ladder with "
                                   "--no-ladder") from e
    import csv

    graph, _ = _tensor_graph(quant_model)
    result = []
    for row in csv.DictReader(io.StringIO(table.getvalue())):
        name = row["tensor_name"]
        error = float(row["channel_sqnr_db"])
        scale = float(row["scale"]) or 1.0
        rmse_scale = float(np.sqrt(max(float(row["mean_squared_error"]), 0.0))) / scale
        nodes = tuple(dict.fromkeys([name, *graph.get(name, [])]))
        result.append(LayerError(name, error, nodes, f"{row['op_name']}: per-channel SQNR against the op in float "
                                                      f"{error:.1f} dB; rmse/scale {rmse_scale:.3g}"))
    result.sort(key=lambda layer: (layer.error_db, layer.name))
    return result
