"""`edgekit convert`: model + device profile + calibration data -> a signed, validated bundle.

Steps (each reported through ``progress`` and timed in the report):
inspect -> calibration -> quantize -> validate [-> ladder] -> golden [-> edgetpu] -> package [-> plot].

The profile's ``target.format`` and the model pick the path: ``onnx`` (a .onnx model, onnxruntime QDQ
quantization, ``converters/onnx_int8.py``); ``tflite`` with a .keras/.h5/.hdf5 Keras model, a SavedModel
folder or a float .tflite (TFLite conversion with LiteRT validation, ``converters/tflite_int8.py``); or
``tflite`` with a .onnx model (onnx2tf, run as an isolated tool in its own environment:
``converters/convert_onnx2tf.py``, with a "tool env" step after inspect). A Keras/SavedModel/.tflite model
for an ONNX profile is an ``InputError``.

Edge TPU profiles (``runtime.delegates`` holds ``edgetpu``) get an ``edgetpu`` step after the golden files:
with ``edgetpu_compiler`` (``converters/edgetpu.py``) the full-int8 model is compiled and the bundle ships
both ``model_edgetpu.tflite`` (``manifest.model``) and the uncompiled ``model.tflite`` (``manifest.cpu_model``,
what the agent runs when the Edge TPU delegate cannot load); without it the bundle is CPU-only and says so
(its runtime delegates lose ``edgetpu``, ``validation.edgetpu.compiled`` is false), unless
``require_edgetpu`` (then an ``InputError`` before any work).

``progress`` is called as ``progress(step)`` when a step starts and as ``progress(message, fraction)`` for
the onnx2tf tool's own progress (building its environment, converting), ``fraction`` in 0..1 or None: a
callback for ONNX -> TFLite conversions must accept an optional second argument.

With ``plot`` a PNG (``converters/report_plot.py``) is written next to the bundle: ``<bundle stem>.png``.

Every change made on the way (batch fixed, opset upgraded, a workaround retried, fewer samples than
asked for) is a plain-English note in ``report.json`` and in ``ConvertResult.report``.

Golden files (for the on-device smoke test): ``golden/inputs.npz`` holds one array per model input and
``golden/outputs.npz`` one array per output, keyed by tensor name; the first axis counts the samples, the
rest is the tensor's shape (batch axis of 1 included). The outputs are the quantized model's, computed on
this host; the device must match them within ``golden.atol``. For TFLite bundles both are stored in the
model's own I/O dtype (int8/uint8 raw values for a full-integer model), so ``atol`` is then in quantized
steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration import Samples, draw, fixed_shape, load_samples, sha256_of, split
from converters.gate import GateResult, gate, json_number
from converters.ladder import INITIAL, METHODS, Attempt, LadderBackend, LayerError, QuantSettings, attempts_table
from converters.ladder import run_ladder as climb_ladder
from converters.onnx_int8 import convert_onnx_model, inspect_onnx, session
from converters.tflite_int8 import source_kind
from converters.validate import compare_onnx
from edge_agent import __version__ as EDGEKIT_VERSION
from edge_agent.errors import BundleError, CalibrationError, ConversionError, GateError, InputError, ModelError
from edge_agent.manifest import Manifest, TensorSpec, parse_manifest
from edge_agent.preprocess import Preprocessing
from edge_agent.profiles import QUANT_MODES, Profile, QuantizationSection

GOLDEN_COUNT = 4
EDGETPU_VALIDATION_NOTE = ("validated on this host's CPU with LiteRT + XNNPACK (the uncompiled full-int8 model): "
                           "the Edge TPU and its delegate (libedgetpu) are not used on this host")
REPORT_SCHEMA = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SEMVER = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")


Progress = Callable[..., None]
"""progress(step) when a step starts; progress(message, fraction) for a tool's own progress (see above)."""
EDGETPU = "edgetpu"
CPU_MODEL = "model.tflite"


@dataclass(frozen=True)
class ConvertResult:
    bundle: Path
    manifest: Manifest
    report: dict[str, Any]
    plot: Path | None = None  # the report's PNG next to the bundle (convert(plot=True))


class _Steps:
    """Calls progress(step) and records how long each step took."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}

    def detail(self, message: str, fraction: float | None) -> None:
        """A tool's own progress inside the current step: progress(message, fraction)."""
        if self.progress is not None:
            self.progress(message, fraction)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step; a step entered again adds to its time (progress is told the first time only)."""
        if self.progress is not None and name not in self.timings:
            self.progress(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 3)


def _check_args(model: Path, profile: Profile, name: str, version: str) -> str:
    """The conversion path ("onnx", "tflite" or "onnx2tf") for this model and profile, or an InputError."""
    fmt = profile.target.format
    if fmt == "onnx" and model.suffix.lower() != ".onnx":
        raise InputError(
            f"model {model} is not a .onnx file; profile {profile.name!r} (format {profile.target.format!r}) "
            "needs an ONNX model",
            hint="export the model to ONNX (e.g. torch.onnx.export(..., opset_version=17)), or pick a TFLite "
                 "profile (rpi4, rpi5, coral-usb, coral-devboard) for a Keras/SavedModel/.tflite model",
        )
    if fmt == "tflite" and model.suffix.lower() == ".onnx":
        fmt = "onnx2tf"
    elif fmt == "tflite":
        if not model.exists():
            raise ModelError(f"model file {model} does not exist",
                             hint="check the path to the .keras/.h5/.hdf5/.tflite file or SavedModel folder")
        if source_kind(model) is None:
            raise InputError(
                f"model {model} is not a Keras model (.keras/.h5/.hdf5), a SavedModel folder (with "
                f"saved_model.pb) or a .tflite; profile {profile.name!r} (format 'tflite') needs one of those",
                hint="save the model with model.save('m.keras') or model.export(DIR)",
            )
    if not _NAME.fullmatch(name):
        raise InputError(f"bundle name {name!r} is not a plain name",
                         hint="use letters, digits, '_', '.', '-' (pass --name)")
    if not _SEMVER.fullmatch(version):
        raise InputError(f"version {version!r} is not a semantic version", hint="e.g. 1.0.0 or 1.2.0-rc.1")
    return fmt


def _quantization(profile: Profile, mode: str | None, notes: list[str]) -> QuantizationSection:
    """The profile's quantization section, with ``mode`` (from --mode) overriding its mode."""
    q = profile.quantization
    if mode is None or mode == q.mode:
        return q
    if mode not in QUANT_MODES:
        raise InputError(f"quantization mode {mode!r} is not one of {', '.join(QUANT_MODES)}",
                         hint="pass --mode int8, dynamic, fp16 or none")
    io_dtype = q.io_dtype if mode == "int8" else "float32"
    text = f"quantization mode {mode!r} (--mode) overrides the profile's {q.mode!r}"
    if io_dtype != q.io_dtype:
        text += f"; inputs and outputs are float32 (the profile's {q.io_dtype} I/O needs mode int8)"
    notes.append(text)
    return dataclasses.replace(q, mode=mode, io_dtype=io_dtype)


@dataclass(frozen=True)
class Overrides:
    """Command-line overrides of the profile's quantization section (None = keep the profile's)."""

    calib_method: str | None = None
    per_channel: bool | None = None
    exclude_nodes: tuple[str, ...] | None = None
    exclude_op_types: tuple[str, ...] | None = None
    gate_accuracy: float | None = None
    gate_agreement: float | None = None
    gate_snr_db: float | None = None
    ladder: bool | None = None


_OVERRIDES = {  # Overrides field -> (QuantizationSection field, option)
    "calib_method": ("calibration_method", "--calib-method"),
    "per_channel": ("per_channel", "--per-channel/--per-tensor"),
    "exclude_nodes": ("exclude_nodes", "--exclude-nodes"),
    "exclude_op_types": ("exclude_op_types", "--exclude-op-types"),
    "gate_accuracy": ("gate_min_accuracy_ratio", "--gate-accuracy"),
    "gate_agreement": ("gate_min_agreement", "--gate-agreement"),
    "gate_snr_db": ("gate_min_snr_db", "--gate-snr"),
    "ladder": ("ladder", "--no-ladder"),
}


def _apply_overrides(q: QuantizationSection, o: Overrides, notes: list[str]) -> QuantizationSection:
    if o.calib_method is not None and o.calib_method not in METHODS:
        raise InputError(f"calibration method {o.calib_method!r} is not one of {', '.join(METHODS)}",
                         hint="pass --calib-method minmax, entropy or percentile")
    for name, value in (("--gate-accuracy", o.gate_accuracy), ("--gate-agreement", o.gate_agreement)):
        if value is not None and not 0 <= value <= 1:
            raise InputError(f"{name} {value} must be between 0 and 1", hint=f"e.g. {name} 0.99")
    changes: dict[str, Any] = {}
    for attr, (field_name, option) in _OVERRIDES.items():
        value = getattr(o, attr)
        if value is None:
            continue
        if isinstance(value, list):
            value = tuple(value)
        if value != getattr(q, field_name):
            shown = list(value) if isinstance(value, tuple) else value
            notes.append(f"{option} sets quantization.{field_name} = {shown!r} (the profile has "
                         f"{_shown(getattr(q, field_name))!r})")
        changes[field_name] = value
    return dataclasses.replace(q, **changes) if changes else q


def _shown(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _single_float_input(model: Path, inputs: list[TensorSpec]) -> TensorSpec:
    if len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs)
        raise InputError(f"model {model} has {len(inputs)} inputs ({names}); this version converts models "
                         "with one input", hint="export a model with a single input tensor")
    spec = inputs[0]
    if spec.dtype != "float32":
        raise InputError(f"model {model} input {spec.name!r} is {spec.dtype}; this version converts models "
                         "with a float32 input", hint="export the model with a float32 input")
    return spec


def _fixed(spec: TensorSpec) -> TensorSpec:
    return dataclasses.replace(spec, shape=fixed_shape(spec))


def _read_labels(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"labels file {path} does not exist",
                         hint="give a text file, one class per line") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read labels file {path}: {e}", hint="save it as UTF-8 text") from e
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    if not labels:
        raise InputError(f"labels file {path} is empty", hint="one class name per line")
    return labels


def _relabel(samples: Samples, labels: list[str] | None, notes: list[str]) -> Samples:
    """Class subfolder names -> indices in the labels file (when given)."""
    if samples.class_names is None or samples.labels is None:
        return samples
    if labels is None:
        notes.append("labels come from the class subfolder names in sorted order "
                     f"({', '.join(samples.class_names[:10])}{', ...' if len(samples.class_names) > 10 else ''}); "
                     "accuracy assumes that order is the model's class order (give --labels to map names)")
        return samples
    index = {name: i for i, name in enumerate(labels)}
    unknown = [n for n in samples.class_names if n not in index]
    if unknown:
        raise CalibrationError(f"class subfolder {unknown[0]!r} is not a line of the labels file",
                               hint="name each class subfolder after a line of the labels file")
    mapping = np.asarray([index[n] for n in samples.class_names], dtype=np.int64)
    return dataclasses.replace(samples, labels=mapping[samples.labels])


def _check_label_count(labels: list[str] | None, outputs: list[TensorSpec], path: Path | None) -> None:
    if labels is None:
        return
    shape = outputs[0].shape
    classes = shape[-1] if shape else -1
    if classes > 1 and classes != len(labels):
        raise InputError(f"labels file {path} has {len(labels)} classes but output {outputs[0].name!r} "
                         f"has {classes} scores", hint="give one line per class, in the model's order")


def _finite(value: Any) -> Any:
    """JSON-safe, recursively: +inf -> "inf", -inf -> "-inf", NaN -> None (``gate.json_number``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return json_number(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _summary(v: dict[str, Any]) -> dict[str, Any]:
    """The compact validation figures for the manifest."""
    outputs = list(v["outputs"].values())
    agreement = next((o["top1_agreement"] for o in outputs if o["top1_agreement"] is not None), None)
    return _finite({
        "samples": v["samples"],
        "top1_agreement": agreement,
        "max_abs_error": max(o["max_abs_error"] for o in outputs),
        "mean_abs_error": max(o["mean_abs_error"] for o in outputs),
        "snr_db": min(o["snr_db"] for o in outputs),
        "accuracy_fp32": v["accuracy_fp32"],
        "accuracy_quant": v["accuracy_quant"],
        "fp32_p50_ms": v["fp32_p50_ms"],
        "quant_p50_ms": v["quant_p50_ms"],
        "speedup": v["speedup"],
        "fp32_size_bytes": v["fp32_size_bytes"],
        "quant_size_bytes": v["quant_size_bytes"],
        "size_ratio": v["size_ratio"],
    })


def _golden(quant: Path, val: Samples, input_name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                                  float]:
    x = val.arrays[:GOLDEN_COUNT]
    sess = session(quant)
    names = [o.name for o in sess.get_outputs()]
    results = [sess.run(None, {input_name: sample}) for sample in x]
    outputs = {n: np.stack([np.asarray(r[k], dtype=np.float32) for r in results]) for k, n in enumerate(names)}
    peak = max(float(np.abs(a).max()) if a.size else 0.0 for a in outputs.values())
    atol = max(1e-4, 0.02 * peak)
    return {input_name: np.ascontiguousarray(x)}, outputs, atol


def _tools() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"edgekit": EDGEKIT_VERSION, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def _runtime(profile: Profile) -> dict[str, Any]:
    def lists(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {k: lists(v) for k, v in dataclasses.asdict(profile.runtime).items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_bundle_manifest(path: Path) -> Manifest:
    """The manifest of a bundle this process just built (no signature check: use verify_bundle for that)."""
    try:
        with tarfile.open(path, "r:") as tar:
            member = tar.extractfile("manifest.json")
            if member is None:
                raise BundleError(f"{path} has no manifest.json", reason="missing_member")
            return parse_manifest(json.loads(member.read().decode("utf-8")))
    except (tarfile.TarError, KeyError, OSError, ValueError) as e:
        raise BundleError(f"cannot read the manifest of {path}: {e}", reason="malformed") from e


def _quant_notes(profile: Profile, q: QuantizationSection) -> tuple[bool, list[str]]:
    """Profile-driven choices that change the model: symmetric activations for TensorRT, float I/O."""
    notes: list[str] = []
    symmetric = q.mode == "int8" and "TensorrtExecutionProvider" in profile.runtime.providers
    if symmetric:
        notes.append("activations were quantized symmetrically (zero point 0) because TensorRT reads QDQ "
                     "models only with symmetric int8 scales")
    if q.mode == "int8" and q.io_dtype != "float32":
        notes.append(f"the profile asks for {q.io_dtype} inputs and outputs; ONNX QDQ models keep float32 "
                     "inputs and outputs (the runtime quantizes at the graph edges)")
    return symmetric, notes


def _derived_note(samples: Samples, spec: TensorSpec, preprocessing: Preprocessing | None,
                  notes: list[str]) -> None:
    if preprocessing is None and samples.preprocessing is not None:
        pre = samples.preprocessing
        notes.append(f"image preprocessing was derived from the input shape {list(spec.shape)}: "
                     f"{pre.layout}, {pre.color}, {pre.size[0]}x{pre.size[1]}, pixel x {pre.scale:.6g}, "
                     f"mean {list(pre.mean)}, std {list(pre.std)}; give the preprocessing explicitly "
                     "if the model was trained otherwise")


def _within_memory(cal: Samples, bound_mb: int, seed: int, notes: list[str]) -> Samples:
    """The calibration samples, fewer (a seeded draw) when they alone would exceed the memory bound."""
    per_sample = int(cal.arrays[0].nbytes) if len(cal) else 0
    fit = max(1, (bound_mb * 2**20) // max(per_sample, 1))
    if len(cal) <= fit:
        return cal
    kept, _ = draw(cal, fit, seed, "calibration")
    notes.append(f"calibration used {fit} of the {len(cal)} samples drawn: {len(cal)} samples of "
                 f"{per_sample / 2**20:.2f} MB would exceed quantization.max_calibration_memory_mb = {bound_mb}")
    return kept


def _calibration(job: _Job, spec: TensorSpec, q: QuantizationSection,
                 notes: list[str]) -> tuple[Samples, Samples, Samples, dict[str, Any]]:
    """(all samples of --calib, calibration subset, validation samples, calibration info).

    Without ``--val`` the validation samples are split from the calibration source (seeded, disjoint); with
    it they are drawn from that source and calibration uses the calibration source alone.
    """
    calib_is_csv = Path(job.calib).suffix.lower() == ".csv"
    val_is_csv = job.val is not None and Path(job.val).suffix.lower() == ".csv"
    calib_column = job.label_column if calib_is_csv or not val_is_csv else None
    samples = load_samples(job.calib, spec, job.preprocessing, label_column=calib_column)
    _derived_note(samples, spec, job.preprocessing, notes)
    samples = _relabel(samples, job.label_names, notes)
    if job.val is None:
        cal, val, cal_info = split(samples, q.calibration_samples, q.validation_samples, job.seed)
        notes.extend(cal_info.pop("notes"))
        labelled = " (labelled)" if samples.labels is not None else ""
        notes.append(f"validation split from the calibration source (seed {job.seed}): {len(val)} of its "
                     f"{len(samples)} samples{labelled} validate, {len(cal)} calibrate, none in both; give "
                     "--val SRC for a separate validation source")
        cal_info["validation_source"] = "split from the calibration source"
    else:
        val_column = job.label_column if val_is_csv else None
        vsamples = load_samples(job.val, spec, samples.preprocessing or job.preprocessing, label_column=val_column)
        vsamples = _relabel(vsamples, job.label_names, notes if samples.class_names is None else [])
        cal, cal_notes = draw(samples, q.calibration_samples, job.seed, "calibration")
        val, val_notes = draw(vsamples, q.validation_samples, job.seed, "validation")
        notes.extend(cal_notes + val_notes)
        if vsamples.labels is None:
            notes.append(f"the validation source {job.val} has no labels: the fp32 model's outputs are the "
                         "reference (top-1 agreement, errors, SNR)")
        cal_info = {"count": len(cal), "validation_count": len(val), "available": len(samples),
                    "seed": job.seed, "sha256": sha256_of(cal), "source": samples.description,
                    "validation_source": vsamples.description}
    kept = _within_memory(cal, q.max_calibration_memory_mb, job.seed, notes)
    if kept is not cal:
        cal = kept
        cal_info.update(count=len(cal), sha256=sha256_of(cal))
    return samples, cal, val, cal_info


def _speed_note(validation: dict[str, Any], mode: str, notes: list[str]) -> None:
    if mode != "none" and validation["speedup"] is not None and validation["speedup"] < 1:
        notes.append(f"on this host the {mode} model ran slower than fp32 "
                     f"(speed-up {validation['speedup']:.2f}x); small models often do, and the device "
                     "may differ: measure there with the agent's bench")


@dataclass
class _Job:
    """Everything both conversion paths share."""

    model: Path
    profile: Profile
    q: QuantizationSection
    calib: str
    out_dir: Path
    key: Path
    name: str
    version: str
    preprocessing: Preprocessing | None
    labels: Path | None
    label_names: list[str] | None
    label_column: str | int | None
    seed: int
    threads: int
    steps: _Steps
    notes: list[str]
    latency_runs: int
    val: str | None = None
    edgetpu: _EdgeTpuPlan | None = None
    allow_float_ops: bool = False
    onnx2tf_env: Path | None = None
    offline: bool = False
    latency_budget_ms: float | None = None  # golden.latency_budget_ms: the device's smoke-test latency bound


# --------------------------------------------------------------------------------------------------
# the Edge TPU step (TFLite paths, profiles whose runtime.delegates hold "edgetpu")


@dataclass(frozen=True)
class _EdgeTpuPlan:
    """Decided before any work: compile with ``compiler``, or write a CPU-only bundle (``why``)."""

    decision: str  # "compile" | "cpu_only"
    compiler: Path | None
    why: str | None = None  # cpu_only for another reason than a missing compiler: that reason


@dataclass(frozen=True)
class _EdgeTpuOutcome:
    """What the edgetpu step hands to packaging."""

    model_member: str
    model_file: Path
    cpu_model_file: Path | None  # the uncompiled model, packaged as CPU_MODEL next to the compiled one
    runtime: dict[str, Any]
    report: dict[str, Any]  # report.json's "edgetpu" section
    summary: dict[str, Any]  # the manifest's validation.edgetpu


def _plan_edgetpu(profile: Profile, q: QuantizationSection, require: bool, compiler: str | Path | None,
                  notes: list[str]) -> _EdgeTpuPlan | None:
    """None for a profile without the edgetpu delegate; else compile or CPU-only (``edgetpu.decide``), or an
    InputError when ``require`` cannot be met."""
    from converters.edgetpu import decide, find_compiler

    if EDGETPU not in profile.runtime.delegates:
        if require or compiler is not None:
            notes.append(f"--require-edgetpu / --edgetpu-compiler apply to Edge TPU profiles (coral-usb, "
                         f"coral-devboard) only; profile {profile.name!r} has no edgetpu delegate")
        return None
    if profile.target.format != "tflite":
        raise InputError(f"profile {profile.name!r} lists the edgetpu delegate but targets format "
                         f"{profile.target.format!r}; the Edge TPU runs TFLite models only",
                         hint="set target.format = \"tflite\" in the profile")
    if q.mode != "int8":
        if require:
            raise InputError(f"--require-edgetpu: the Edge TPU runs only full-integer int8 models, and "
                             f"quantization mode {q.mode!r} cannot be compiled for it",
                             hint="drop --mode (the Coral profiles' mode is int8), or drop --require-edgetpu")
        return _EdgeTpuPlan("cpu_only", None, f"quantization mode {q.mode!r} is not full-integer int8, the only "
                                              "kind of model edgetpu_compiler compiles")
    found = find_compiler(compiler)
    return _EdgeTpuPlan(decide(found, require), found)


def _check_compiled_io(compiled: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """The compiled model must keep the uncompiled model's tensors (names, shapes, dtypes, quantization): the
    manifest describes both, and the agent matches them by name. It is read without allocating tensors (its
    edgetpu-custom-op runs only with libedgetpu)."""
    from converters.tflite_int8 import litert, spec_from_detail

    interpreter_cls, resolver = litert()
    try:
        it = interpreter_cls(model_path=str(compiled),
                             experimental_op_resolver_type=resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        got = ([spec_from_detail(d) for d in it.get_input_details()],
               [spec_from_detail(d) for d in it.get_output_details()])
    except (ValueError, RuntimeError) as e:
        raise ConversionError(f"LiteRT cannot read the compiled model {compiled.name}: {e} (step: edgetpu)",
                              hint="run edgetpu_compiler by hand on the model to see what it wrote") from e

    def same(a: TensorSpec, b: TensorSpec) -> bool:
        return (a.name, a.dtype, tuple(a.shape), a.zero_point) == (b.name, b.dtype, tuple(b.shape), b.zero_point) \
            and (a.scale is None) == (b.scale is None) and (a.scale is None or math.isclose(a.scale, b.scale or 0,
                                                                                         rel_tol=1e-6))

    for kind, want, have in (("inputs", inputs, got[0]), ("outputs", outputs, got[1])):
        if len(want) != len(have) or not all(same(a, b) for a, b in zip(want, have, strict=False)):
            raise ConversionError(
                f"the compiled model {compiled.name} has other {kind} than the model it was compiled from: "
                f"{[t.to_dict() for t in have]} instead of {[t.to_dict() for t in want]} (step: edgetpu)",
                hint="report it to the edgekit issue tracker with the edgetpu_compiler version")


def _edgetpu_step(job: _Job, quant: Path, work: Path, q_inputs: list[TensorSpec],
                  q_outputs: list[TensorSpec]) -> _EdgeTpuOutcome | None:
    """Compile ``quant`` for the Edge TPU, or make the bundle CPU-only, as ``job.edgetpu`` planned."""
    from converters.edgetpu import compile_for_edgetpu, cpu_only_note, missing_compiler_message

    plan = job.edgetpu
    if plan is None:
        return None
    runtime = _runtime(job.profile)
    with job.steps.step("edgetpu"):
        if plan.decision == "compile":
            assert plan.compiler is not None
            compiled, rep = compile_for_edgetpu(quant, work / "edgetpu", compiler=plan.compiler)
            _check_compiled_io(compiled, q_inputs, q_outputs)
            job.notes.append(rep.summary())
            job.notes.extend(rep.warnings)
            job.notes.append(f"the bundle holds the model compiled for the Edge TPU ({compiled.name}, manifest "
                             f"model) and the uncompiled full-int8 model ({CPU_MODEL}, manifest cpu_model), which "
                             "the agent runs on the CPU when the Edge TPU delegate cannot load")
            first = rep.first_unmapped_op
            return _EdgeTpuOutcome(
                model_member=compiled.name, model_file=compiled, cpu_model_file=quant, runtime=runtime,
                report={"status": "compiled", "compiler": str(plan.compiler), **rep.to_dict()},
                summary={"compiled": True, "mapped_ops": rep.mapped_ops, "cpu_ops": rep.cpu_ops,
                         "first_unmapped_op": first["op"] if first else None,
                         "on_chip_bytes": rep.on_chip_memory_used_bytes})
        if plan.why is None:
            note = cpu_only_note()
        else:
            note = (f"the model was not compiled for the Edge TPU ({plan.why}), so this bundle is CPU-only: on "
                    "the device it runs on the CPU with LiteRT, and the Edge TPU is not used")
        job.notes.append(note)
        delegates = [d for d in runtime["delegates"] if d != EDGETPU]
        if "xnnpack" not in delegates:
            delegates.append("xnnpack")
        job.notes.append(f"runtime.delegates of this CPU-only bundle: {delegates} (the profile's {EDGETPU!r} is "
                         "dropped, so the agent does not load libedgetpu for a model the Edge TPU cannot run)")
        runtime["delegates"] = delegates
        return _EdgeTpuOutcome(
            model_member=CPU_MODEL, model_file=quant, cpu_model_file=None, runtime=runtime,
            report={"status": "cpu_only", "reason": plan.why or "edgetpu_compiler is not installed", "note": note,
                    "install": missing_compiler_message()},
            summary={"compiled": False})


# --------------------------------------------------------------------------------------------------
# packaging


def _budget(given: float | None, profile: Profile) -> float | None:
    """The smoke-test latency budget: ``--latency-budget-ms``, else the profile's p99 SLO, else none."""
    if given is not None:
        if not given > 0:
            raise InputError(f"--latency-budget-ms must be greater than 0, not {given}")
        return float(given)
    return float(profile.telemetry.slo_p99_ms) if profile.telemetry.slo_p99_ms > 0 else None


def _package(job: _Job, model_member: str, model_file: Path, fmt: str, engine: str, tools: dict[str, str],
             report: dict[str, Any], q_inputs: list[TensorSpec], q_outputs: list[TensorSpec],
             golden: tuple[dict[str, np.ndarray], dict[str, np.ndarray], float], pre: Preprocessing | None,
             quantization: dict[str, Any], validation: dict[str, Any],
             edgetpu: _EdgeTpuOutcome | None = None) -> ConvertResult:
    from converters.package import build_bundle, golden_npz

    golden_in, golden_out, atol = golden
    if edgetpu is not None:
        model_member, model_file = edgetpu.model_member, edgetpu.model_file
        report["edgetpu"] = _finite(edgetpu.report)
    manifest_fields: dict[str, Any] = {
        "name": job.name,
        "version": job.version,
        "profile": job.profile.name,
        "format": fmt,
        "engine": engine,
        "model": model_member,
        "inputs": [_fixed(t).to_dict() for t in q_inputs],
        "outputs": [_fixed(t).to_dict() for t in q_outputs],
        "runtime": edgetpu.runtime if edgetpu is not None else _runtime(job.profile),
        "tools": tools,
        "preprocessing": pre.to_dict() if pre is not None else None,
        "labels": "labels.txt" if job.labels is not None else None,
        "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "atol": atol,
                   **({} if job.latency_budget_ms is None else {"latency_budget_ms": job.latency_budget_ms})},
        "report": "report.json",
        "quantization": quantization,
        "validation": {**_summary(validation), "gate": _compact_gate(validation.get("gate")),
                       "ladder_rung": validation.get("ladder_rung")},
    }
    if "xnnpack" in validation:  # TFLite: how much of the model XNNPACK took on the host
        manifest_fields["validation"]["xnnpack_delegated_nodes"] = validation["xnnpack"]["delegated_nodes"]
        manifest_fields["validation"]["xnnpack_total_nodes"] = validation["xnnpack"]["total_nodes"]
    members: dict[str, Path | bytes] = {
        model_member: model_file,
        "golden/inputs.npz": golden_npz(golden_in),
        "golden/outputs.npz": golden_npz(golden_out),
        "report.json": (json.dumps(report, indent=2) + "\n").encode("utf-8"),
    }
    if edgetpu is not None:
        manifest_fields["validation"]["edgetpu"] = _finite(edgetpu.summary)
        if edgetpu.cpu_model_file is not None:
            manifest_fields["cpu_model"] = CPU_MODEL
            members[CPU_MODEL] = edgetpu.cpu_model_file
    if job.label_names is not None:  # the text already read and checked, not a second read of the file
        members["labels.txt"] = ("\n".join(job.label_names) + "\n").encode("utf-8")
    with job.steps.step("package"):
        out_dir = Path(job.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        bundle = build_bundle(out_dir / f"{job.name}-{job.version}-{job.profile.name}.edgebundle",
                              manifest_fields, members, Path(job.key))
    report["timings_s"] = dict(job.steps.timings)  # now with the package step (report.json was written before it)
    return ConvertResult(bundle=bundle, manifest=read_bundle_manifest(bundle), report=report)



def tflite_report_tail(quantization: dict[str, Any], float_ops: Sequence[Any], kept_float: Sequence[Any],
                       cal_info: dict[str, Any], validation: dict[str, Any], ladder: Any,
                       golden_in: dict[str, np.ndarray], golden_out: dict[str, np.ndarray], atol: float,
                       notes: list[str], timings: dict[str, float], *, inputs_note: str = "") -> dict[str, Any]:
    """The part of report.json that both TFLite paths (Keras/SavedModel/.tflite and onnx2tf) share."""
    return {
        "quantization": quantization,
        "float_ops": [op.to_dict() for op in float_ops],
        "kept_float_ops": [op.to_dict() for op in kept_float],
        "calibration": cal_info,
        "validation": validation,
        "gate": validation["gate"],
        "ladder": ladder,
        "golden": {"count": len(next(iter(golden_in.values()))), "atol": atol,
                   "dtype": {k: str(v.dtype) for k, v in golden_out.items()},
                   "note": "raw outputs (the model's own dtype) of the quantized model with LiteRT on this "
                           f"host{inputs_note}; the device smoke test must match them within atol = 2% of "
                           "the largest golden output, at least 1 quantized step for integer outputs "
                           "(1e-4 for float)"},
        "notes": notes,
        "timings_s": dict(timings),
    }

def convert(model: Path, profile: Profile, calib: str, out_dir: Path, key: Path, *, name: str | None = None,
            version: str = "1.0.0", preprocessing: Preprocessing | None = None, labels: Path | None = None,
            seed: int = 0, threads: int | None = None, progress: Progress | None = None,
            latency_runs: int = 200, mode: str | None = None, allow_float_ops: bool = False,
            label_column: str | int | None = None, val: str | None = None,
            overrides: Overrides | None = None, require_edgetpu: bool = False,
            edgetpu_compiler: str | Path | None = None, onnx2tf_env: Path | None = None, offline: bool = False,
            plot: bool = False, latency_budget_ms: float | None = None) -> ConvertResult:
    """Quantize ``model`` for ``profile``, validate it against the float model, gate it, and write a signed bundle.

    The bundle is ``out_dir / f"{name}-{version}-{profile.name}.edgebundle"``. ``mode`` overrides the
    profile's quantization mode; ``allow_float_ops`` lets a full-integer TFLite model keep ops that have no
    int8 kernel in float (listed in the report); ``label_column`` names the label column of a CSV source;
    ``val`` is a validation source separate from ``calib`` (else validation samples are split from it);
    ``overrides`` replace quantization settings and gate thresholds of the profile.

    Edge TPU profiles: ``edgetpu_compiler`` is the compiler to run (default: ``edgetpu_compiler`` on PATH);
    without one the bundle is CPU-only, or with ``require_edgetpu`` an ``InputError`` is raised before any
    work. ONNX -> TFLite: ``onnx2tf_env`` is the onnx2tf tool environment's folder (default
    ``onnx2tf_tool.default_env_dir()``), built on first use unless ``offline`` (then a missing environment is
    an ``InputError``). ``plot`` writes the report's PNG next to the bundle (``ConvertResult.plot``).

    When the quantized model fails the accuracy gate (``converters.gate``), the recovery ladder
    (``converters.ladder``) runs unless it is turned off; when nothing passes, a ``GateError`` (exit 1)
    carries the table of what was tried and no bundle is written.
    """
    model = Path(model)
    name = name or model.stem
    fmt = _check_args(model, profile, name, version)
    notes: list[str] = []
    q = _quantization(profile, mode, notes)
    q = _apply_overrides(q, overrides or Overrides(), notes)
    plan = _plan_edgetpu(profile, q, require_edgetpu, edgetpu_compiler, notes)
    if fmt != "onnx2tf" and (offline or onnx2tf_env is not None):
        notes.append("--offline / --onnx2tf-env apply to ONNX -> TFLite conversion (onnx2tf) only")
    label_names = _read_labels(Path(labels)) if labels is not None else None
    steps = _Steps(progress)
    job = _Job(model=model, profile=profile, q=q, calib=calib, out_dir=Path(out_dir), key=Path(key), name=name,
               version=version, preprocessing=preprocessing, labels=Path(labels) if labels is not None else None,
               label_names=label_names, label_column=label_column, seed=seed,
               threads=threads or min(profile.runtime.threads, os.cpu_count() or 1), steps=steps,
               notes=notes, latency_runs=latency_runs, val=val, edgetpu=plan, allow_float_ops=allow_float_ops,
               onnx2tf_env=Path(onnx2tf_env) if onnx2tf_env is not None else None, offline=offline,
               latency_budget_ms=_budget(latency_budget_ms, profile))
    if fmt == "onnx":
        if allow_float_ops:
            notes.append("--allow-float-ops applies to TFLite conversion only; onnxruntime's QDQ models keep "
                         "unquantizable ops in float anyway")
        result = _convert_onnx(job)
    elif fmt == "onnx2tf":
        from converters.convert_onnx2tf import convert_onnx2tf

        result = convert_onnx2tf(job)
    else:
        result = _convert_tflite(job, allow_float_ops)
    if not plot:
        return result
    from converters.report_plot import plot_report

    with steps.step("plot"):
        png = plot_report(result.report, result.bundle.with_suffix(".png"), labels=label_names)
    result.report["timings_s"] = dict(steps.timings)
    return dataclasses.replace(result, plot=png)


# --------------------------------------------------------------------------------------------------
# the gate and the recovery ladder (both formats)


def _judge(q: QuantizationSection) -> Callable[[dict[str, Any]], GateResult]:
    def judge(quality: dict[str, Any]) -> GateResult:
        return gate(quality, min_accuracy_ratio=q.gate_min_accuracy_ratio, min_agreement=q.gate_min_agreement,
                    min_snr_db=q.gate_min_snr_db)

    return judge


def _initial_settings(q: QuantizationSection) -> QuantSettings:
    return QuantSettings(per_channel=q.per_channel, method=q.calibration_method,
                         exclude_nodes=tuple(q.exclude_nodes), exclude_op_types=tuple(q.exclude_op_types))


def _gate_error(job: _Job, attempts: list[Attempt], worst: list[LayerError], why: str) -> GateError:
    g = attempts[0].gate
    rule = f"{g.metric} >= {g.threshold}" if g is not None else "the gate"
    table = attempts_table(attempts, worst)
    hints = {
        "accuracy_ratio": "--gate-accuracy RATIO (or quantization.gate_min_accuracy_ratio)",
        "top1_agreement": "--gate-agreement A (or quantization.gate_min_agreement)",
        "snr_db": "--gate-snr DB (or quantization.gate_min_snr_db)",
    }
    lower = hints.get(g.metric if g is not None else "", "the gate thresholds")
    return GateError(
        f"the quantized model failed the accuracy gate ({rule}) {why}; no bundle was written\n{table}",
        hint=f"keep the worst layers in float with --exclude-nodes, try --mode dynamic or none, give more "
             f"representative calibration data, or lower the threshold with {lower} if the loss is acceptable",
        attempts=_finite([a.to_dict() for a in attempts]), worst_layers=_finite([w.to_dict() for w in worst[:10]]),
    )


def _gate_and_ladder(job: _Job, first: Attempt, backend: LadderBackend | None,
                     work: Path) -> tuple[Attempt, dict[str, Any]]:
    """The attempt to package and the report's ``ladder`` section; a GateError when nothing passes."""
    if first.passed:
        return first, {"ran": False, "passed_rung": INITIAL, "attempts": [first.to_dict()]}
    assert first.gate is not None
    if not job.q.ladder or backend is None:
        why = ("and the recovery ladder is off (--no-ladder or quantization.ladder = false)" if backend is not None
               else f"and the recovery ladder applies to static int8 quantization only (mode {job.q.mode!r})")
        worst: list[LayerError] = []
        if backend is not None and first.model is not None:
            try:
                worst = backend.layer_errors(first.model, first.settings)
            except ConversionError as e:  # the gate's verdict stands; say why the layers are not listed
                why += f" (the worst layers cannot be listed: {e.message})"
        raise _gate_error(job, [first], worst, why)
    with job.steps.step("ladder"):
        result = climb_ladder(backend, first, _judge(job.q), work, job.steps.progress)
    ladder = {"ran": True, "passed_rung": result.passed.rung if result.passed else None,
              "attempts": [a.to_dict() for a in result.attempts],
              "worst_layers": [w.to_dict() for w in result.worst_layers[:10]]}
    if result.passed is None:
        raise _gate_error(job, result.attempts, result.worst_layers,
                          "and no rung of the recovery ladder passed it")
    chosen = result.passed
    assert chosen.gate is not None
    job.notes.append(f"the model quantized with the first settings ({first.settings.describe()}) failed the "
                     f"accuracy gate: {first.gate.reason}; the recovery ladder's rung {chosen.rung!r} "
                     f"({chosen.settings.describe()}) passed it: {chosen.gate.reason}")
    if chosen.settings.float_layers:
        kept = set(chosen.settings.float_nodes)
        fixed = [w for w in result.worst_layers if w.nodes and set(w.nodes) <= kept]
        job.notes.append(f"the ladder keeps {len(chosen.settings.float_layers)} node(s) in float so that the "
                         f"activation(s) with the largest quantization error stay float: "
                         f"{', '.join(f'{w.name} ({w.error_db:.1f} dB)' for w in fixed) or '-'}")
    return chosen, ladder


def _compact_gate(g: dict[str, Any] | None) -> dict[str, Any] | None:
    """The gate's verdict for the manifest: passed, metric, value, threshold (the reason is in the report)."""
    if g is None:
        return None
    return _finite({k: g[k] for k in ("passed", "metric", "value", "threshold")})


class _OnnxLadder:
    """The recovery ladder's ONNX backend: onnxruntime QDQ quantization of the prepared model."""

    methods = METHODS

    def __init__(self, job: _Job, prepared: Any, cal: Samples, val: Samples, input_name: str, symmetric: bool,
                 reference: tuple[list[str], list[np.ndarray]], work: Path) -> None:
        self.job, self.prepared, self.cal, self.val = job, prepared, cal, val
        self.input_name, self.symmetric, self.reference, self.work = input_name, symmetric, reference, work
        self.node_count = len(prepared.nodes)

    def quantize(self, settings: QuantSettings, dst: Path) -> list[str]:
        from converters.onnx_int8 import quantize_prepared

        return quantize_prepared(self.prepared, self.job.model, dst, self.cal.arrays, self.input_name,
                                 per_channel=settings.per_channel, method=settings.method, workdir=self.work,
                                 symmetric_activations=self.symmetric, exclude_nodes=settings.float_nodes,
                                 exclude_op_types=settings.exclude_op_types,
                                 max_memory_mb=self.job.q.max_calibration_memory_mb)

    def evaluate(self, model: Path) -> dict[str, Any]:
        from converters.validate import quality_onnx

        return quality_onnx(model, self.val, self.reference, self.job.threads)

    def layer_errors(self, model: Path, settings: QuantSettings) -> list[LayerError]:
        from converters.onnx_int8 import layer_errors

        return layer_errors(self.prepared, model, self.val.arrays, self.input_name, self.work,
                            max_memory_mb=self.job.q.max_calibration_memory_mb)


def _convert_onnx(job: _Job) -> ConvertResult:
    from converters.onnx_int8 import prepare_static
    from converters.validate import onnx_outputs, quality_onnx

    model, q, steps, notes = job.model, job.q, job.steps, job.notes
    with steps.step("inspect"):
        inputs, outputs, opset = inspect_onnx(model)
        spec = _fixed(_single_float_input(model, inputs))
        _check_label_count(job.label_names, outputs, job.labels)

    with steps.step("calibration"):
        samples, cal, val, cal_info = _calibration(job, spec, q, notes)

    with tempfile.TemporaryDirectory(prefix="edgekit-convert-") as tmp:
        work = Path(tmp)
        backend: _OnnxLadder | None = None
        settings = _initial_settings(q)
        with steps.step("quantize"):
            t0 = time.perf_counter()
            symmetric, profile_notes = _quant_notes(job.profile, q)
            notes.extend(profile_notes)
            first_model = work / "attempt0.onnx"
            if q.mode == "int8":
                prepared = prepare_static(model, work)
                notes.extend(prepared.notes)
                backend = _OnnxLadder(job, prepared, cal, val, spec.name, symmetric, ([], []), work)
                first_notes = backend.quantize(settings, first_model)
            else:
                if q.exclude_nodes or q.exclude_op_types:
                    notes.append(f"exclude_nodes / exclude_op_types apply to static int8 only (mode {q.mode!r})")
                first_notes = convert_onnx_model(model, first_model, q.mode, cal.arrays, spec.name,
                                                 per_channel=q.per_channel, method=q.calibration_method,
                                                 workdir=work, symmetric_activations=symmetric)
            quantize_s = time.perf_counter() - t0

        with steps.step("validate"):
            t0 = time.perf_counter()
            reference = onnx_outputs(model, val.arrays, job.threads, "fp32")
            if backend is not None:
                backend.reference = reference
            quality = quality_onnx(first_model, val, reference, job.threads)
            first = Attempt(INITIAL, settings, _judge(q)(quality), quantize_s + time.perf_counter() - t0,
                            first_model, quality, first_notes)
        chosen, ladder = _gate_and_ladder(job, first, backend, work)
        notes.extend(chosen.notes)
        assert chosen.model is not None
        with steps.step("ladder" if ladder["ran"] else "validate"):  # latency: of the model packaged only
            quant = work / "model.onnx"
            os.replace(chosen.model, quant)
            q_inputs, q_outputs, q_opset = inspect_onnx(quant)
            validation = compare_onnx(model, quant, val, job.threads, runs=job.latency_runs)
            _speed_note(validation, q.mode, notes)

        with steps.step("golden"):
            golden_in, golden_out, atol = _golden(quant, val, spec.name)

        pre = samples.preprocessing or val.preprocessing or job.preprocessing
        calibration = {"count": cal_info["count"], "seed": job.seed, "sha256": cal_info["sha256"]}
        cs = chosen.settings
        quantization = {"mode": q.mode, "per_channel": cs.per_channel, "method": cs.method,
                        "format": "QDQ" if q.mode == "int8" else q.mode, "calibration": calibration,
                        "float_nodes": list(cs.float_nodes), "exclude_op_types": list(cs.exclude_op_types)}
        validation["gate"] = chosen.gate.to_dict() if chosen.gate else None
        validation["ladder_rung"] = chosen.rung
        report: dict[str, Any] = _finite({
            "schema": REPORT_SCHEMA,
            "name": job.name,
            "version": job.version,
            "profile": job.profile.name,
            "source_model": {"file": model.name, "sha256": _sha256(model), "opset": opset,
                             "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]},
            "model_opset": q_opset,
            "quantization": quantization,
            "calibration": cal_info,
            "validation": validation,
            "gate": validation["gate"],
            "ladder": ladder,
            "golden": {"count": len(golden_in[spec.name]), "atol": atol,
                       "note": "outputs of the quantized model on this host; the device smoke test must match "
                               "them within atol = max(1e-4, 2% of the largest golden output)"},
            "notes": notes,
            "timings_s": dict(steps.timings),
        })
        return _package(job, "model.onnx", quant, "onnx", "onnxruntime", _tools(), report, q_inputs, q_outputs,
                        (golden_in, golden_out, atol), pre, quantization, validation)


# --------------------------------------------------------------------------------------------------
# TFLite


def _single_input(model: Path, inputs: list[TensorSpec], quantized_ok: bool) -> TensorSpec:
    if quantized_ok and len(inputs) == 1 and inputs[0].dtype in ("int8", "uint8") and inputs[0].scale:
        return inputs[0]
    return _single_float_input(model, inputs)


def _tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder: every file's relative path and contents, in sorted order."""
    if path.is_file():
        return _sha256(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode("utf-8") + b"\0")
        h.update(bytes.fromhex(_sha256(f)))
    return h.hexdigest()


def _golden_tflite(quant: Path, val: Samples) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Golden inputs and outputs of the quantized model, raw in the model's own I/O dtypes."""
    from converters.tflite_int8 import interpreter, spec_from_detail, to_model_input

    it = interpreter(quant)
    detail = it.get_input_details()[0]
    spec = spec_from_detail(detail)
    outputs = it.get_output_details()
    raw_in = [to_model_input(x, spec) for x in val.arrays[:GOLDEN_COUNT]]
    results = []
    for x in raw_in:
        it.set_tensor(detail["index"], x)
        it.invoke()
        results.append([np.array(it.get_tensor(d["index"])) for d in outputs])
    golden_out = {d["name"]: np.stack([r[k] for r in results]) for k, d in enumerate(outputs)}
    peak = max(float(np.abs(a.astype(np.float64)).max()) if a.size else 0.0 for a in golden_out.values())
    integer = all(a.dtype.kind in "iu" for a in golden_out.values())
    atol = max(1.0, 0.02 * peak) if integer else max(1e-4, 0.02 * peak)
    return {spec.name: np.stack(raw_in)}, golden_out, atol


def _tflite_tools(extra: dict[str, str]) -> dict[str, str]:
    from converters.tflite_int8 import tf_versions

    return {"edgekit": EDGEKIT_VERSION, **tf_versions(), **extra, "numpy": np.__version__}


class _TFLiteLadder:
    """The recovery ladder's TFLite backend: calibrate once, then re-quantize with TFLite's MLIR quantizer."""

    methods = ("minmax",)

    def __init__(self, job: _Job, source: Any, cal: Samples, val: Samples, allow_float_ops: bool, edgetpu: bool,
                 fp32: Path, reference: tuple[list[str], list[np.ndarray]], node_count: int) -> None:
        self.job, self.source, self.cal, self.val = job, source, cal, val
        self.allow_float_ops, self.edgetpu, self.fp32, self.reference = allow_float_ops, edgetpu, fp32, reference
        self.node_count = node_count
        self.calibrated: bytes | None = None
        self.conversions: dict[Path, Any] = {}

    def quantize(self, settings: QuantSettings, dst: Path) -> list[str]:
        from converters.tflite_int8 import calibrate_tflite, convert_tflite_model

        q = self.job.q
        if self.source.kind != "tflite" and self.calibrated is None:
            self.calibrated = calibrate_tflite(self.source.saved_model, self.cal.arrays)
        conversion = convert_tflite_model(self.source, dst, "int8", self.cal.arrays, io_dtype=q.io_dtype,
                                          per_channel=settings.per_channel, method=settings.method,
                                          allow_float_ops=self.allow_float_ops, edgetpu=self.edgetpu,
                                          float_nodes=settings.float_nodes,
                                          float_op_types=settings.exclude_op_types, calibrated=self.calibrated)
        self.conversions[Path(dst)] = conversion
        return conversion.notes

    def evaluate(self, model: Path) -> dict[str, Any]:
        from converters.validate_tflite import quality_tflite

        return quality_tflite(model, self.val, self.reference, self.job.threads)

    def layer_errors(self, model: Path, settings: QuantSettings) -> list[LayerError]:
        from converters.tflite_int8 import tflite_layer_errors

        if self.source.kind == "tflite":
            raise ConversionError("keeping layers in float needs the Keras/SavedModel source; a .tflite source is "
                                  "quantized by ai-edge-quantizer")
        return tflite_layer_errors(self.source, Path(model).read_bytes(), self.cal.arrays, self.val.arrays,
                                   io_dtype=self.job.q.io_dtype, per_channel=settings.per_channel,
                                   float_nodes=settings.float_nodes, float_op_types=settings.exclude_op_types)


def _convert_tflite(job: _Job, allow_float_ops: bool) -> ConvertResult:
    from converters.tflite_int8 import convert_tflite_model, float_reference, op_counts, prepare_source, tflite_io
    from converters.validate_tflite import compare_tflite, quality_tflite, tflite_outputs

    model, q, steps, notes, profile = job.model, job.q, job.steps, job.notes, job.profile
    edgetpu = "edgetpu" in profile.runtime.delegates
    with tempfile.TemporaryDirectory(prefix="edgekit-convert-") as tmp:
        work = Path(tmp)
        with steps.step("inspect"):
            source = prepare_source(model, work)
            notes.extend(source.notes)
            if source.quantized and q.mode != "none":
                raise InputError(f"{model} is already quantized (integer inputs, outputs or QUANTIZE ops); it "
                                 f"cannot be quantized again for mode {q.mode!r}",
                                 hint="package it as it is with --mode none, or convert the float source model")
            spec = _fixed(_single_input(model, source.inputs, quantized_ok=source.kind == "tflite"))
            _check_label_count(job.label_names, source.outputs, job.labels)

        with steps.step("calibration"):
            samples, cal, val, cal_info = _calibration(job, spec, q, notes)

        first_model, fp32 = work / "attempt0.tflite", work / "fp32.tflite"
        settings = _initial_settings(q)
        with steps.step("quantize"):
            t0 = time.perf_counter()
            int8 = q.mode == "int8"
            conversion = convert_tflite_model(source, first_model, q.mode, cal.arrays, io_dtype=q.io_dtype,
                                              per_channel=q.per_channel, method=q.calibration_method,
                                              allow_float_ops=allow_float_ops, edgetpu=edgetpu,
                                              float_nodes=settings.exclude_nodes if int8 else (),
                                              float_op_types=settings.exclude_op_types if int8 else ())
            if not int8 and (q.exclude_nodes or q.exclude_op_types):
                notes.append(f"exclude_nodes / exclude_op_types apply to int8 only (mode {q.mode!r})")
            float_reference(source, fp32)
            quantize_s = time.perf_counter() - t0

        with steps.step("validate"):
            t0 = time.perf_counter()
            reference = tflite_outputs(fp32, val.arrays, job.threads, "fp32")
            quality = quality_tflite(first_model, val, reference, job.threads)
            first = Attempt(INITIAL, settings, _judge(q)(quality), quantize_s + time.perf_counter() - t0,
                            first_model, quality, conversion.notes)
        backend = None
        if int8:
            nodes = sum(n for op, n in op_counts(first_model).items() if op not in ("QUANTIZE", "DEQUANTIZE"))
            backend = _TFLiteLadder(job, source, cal, val, allow_float_ops, edgetpu, fp32, reference, nodes)
            backend.conversions[first_model] = conversion
        chosen, ladder = _gate_and_ladder(job, first, backend, work)
        if backend is not None and chosen.model is not None:
            conversion = backend.conversions[Path(chosen.model)]
        notes.extend(chosen.notes)
        assert chosen.model is not None
        quant = work / "model.tflite"
        with steps.step("ladder" if ladder["ran"] else "validate"):  # latency: of the model packaged only
            os.replace(chosen.model, quant)
            q_inputs, q_outputs = tflite_io(quant)
            validation = compare_tflite(fp32, quant, val, job.threads, runs=job.latency_runs)
            _speed_note(validation, q.mode, notes)
            xnn = validation["xnnpack"]
            if xnn["delegated_nodes"] < xnn["total_nodes"]:
                notes.append(f"on this host LiteRT's XNNPACK delegate took {xnn['delegated_nodes']} of "
                             f"{xnn['total_nodes']} nodes; the others run on LiteRT's built-in kernels")
            if edgetpu:
                notes.append(EDGETPU_VALIDATION_NOTE)
            if edgetpu and conversion.kept_float:
                notes.append(f"the Edge TPU runs integer ops only: the {len(conversion.kept_float)} op(s) kept in "
                             "float, and every op after the first of them, will run on the CPU")

        with steps.step("golden"):
            golden_in, golden_out, atol = _golden_tflite(quant, val)
        tpu = _edgetpu_step(job, quant, work, q_inputs, q_outputs)

        pre = samples.preprocessing or val.preprocessing or job.preprocessing
        io_dtype = q_inputs[0].dtype if q.mode == "int8" else "float32"
        cs = chosen.settings
        quantization = {"mode": q.mode, "per_channel": cs.per_channel, "method": "minmax",
                        "format": "tflite-" + ("full-integer" if q.mode == "int8" else q.mode),
                        "io_dtype": io_dtype, "allow_float_ops": allow_float_ops,
                        "float_ops": [op.op for op in conversion.float_ops],
                        "float_nodes": list(cs.float_nodes), "exclude_op_types": list(cs.exclude_op_types),
                        "kept_float_ops": [op.op for op in conversion.kept_float],
                        "calibration": {"count": cal_info["count"], "seed": job.seed,
                                        "sha256": cal_info["sha256"]}}
        validation["gate"] = chosen.gate.to_dict() if chosen.gate else None
        validation["ladder_rung"] = chosen.rung
        report: dict[str, Any] = _finite({
            "schema": REPORT_SCHEMA,
            "name": job.name,
            "version": job.version,
            "profile": profile.name,
            "source_model": {"file": model.name, "kind": source.kind, "sha256": _tree_sha256(model),
                             "inputs": [t.to_dict() for t in source.inputs],
                             "outputs": [t.to_dict() for t in source.outputs]},
            **tflite_report_tail(quantization, conversion.float_ops, conversion.kept_float, cal_info, validation,
                                 ladder, golden_in, golden_out, atol, notes, steps.timings),
        })
        return _package(job, CPU_MODEL, quant, "tflite", "litert", _tflite_tools(conversion.tools), report,
                        q_inputs, q_outputs, (golden_in, golden_out, atol), pre, quantization, validation, tpu)
