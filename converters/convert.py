"""`edgekit convert`: model + device profile + calibration data -> a signed, validated bundle.

Steps (each reported through ``progress`` and timed in the report):
inspect -> calibration -> quantize -> validate -> golden -> package.

Every change made on the way (batch fixed, opset upgraded, a workaround retried, fewer samples than
asked for) is a plain-English note in ``report.json`` and in ``ConvertResult.report``.

Golden files (for the on-device smoke test): ``golden/inputs.npz`` holds one array per model input and
``golden/outputs.npz`` one array per output, keyed by tensor name; the first axis counts the samples, the
rest is the tensor's shape (batch axis of 1 included). The outputs are the quantized model's, computed on
this host; the device must match them within ``golden.atol``.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from converters.calibration import Samples, fixed_shape, load_samples, split
from converters.onnx_int8 import convert_onnx_model, inspect_onnx, session
from converters.validate import compare_onnx
from edge_agent import __version__ as EDGEKIT_VERSION
from edge_agent.errors import BundleError, CalibrationError, InputError
from edge_agent.manifest import Manifest, TensorSpec, parse_manifest
from edge_agent.preprocess import Preprocessing
from edge_agent.profiles import Profile

GOLDEN_COUNT = 4
REPORT_SCHEMA = 1
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SEMVER = re.compile(r"\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?")


@dataclass(frozen=True)
class ConvertResult:
    bundle: Path
    manifest: Manifest
    report: dict[str, Any]


class _Steps:
    """Calls progress(step) and records how long each step took."""

    def __init__(self, progress: Callable[[str], None] | None) -> None:
        self.progress = progress
        self.timings: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        if self.progress is not None:
            self.progress(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(time.perf_counter() - t0, 3)


def _check_args(model: Path, profile: Profile, name: str, version: str) -> None:
    if profile.target.format != "onnx":
        raise InputError(
            f"profile {profile.name!r} targets format {profile.target.format!r}; this version of edgekit "
            "converts ONNX models for ONNX profiles only (TFLite profiles arrive in a later version)",
            hint="use an ONNX profile such as x86-64, jetson-nano or jetson-orin-nano",
        )
    if model.suffix.lower() != ".onnx":
        raise InputError(
            f"model {model} is not a .onnx file; profile {profile.name!r} (format {profile.target.format!r}) "
            "needs an ONNX model",
            hint="export the model to ONNX (e.g. torch.onnx.export(..., opset_version=17))",
        )
    if not _NAME.fullmatch(name):
        raise InputError(f"bundle name {name!r} is not a plain name",
                         hint="use letters, digits, '_', '.', '-' (pass --name)")
    if not _SEMVER.fullmatch(version):
        raise InputError(f"version {version!r} is not a semantic version", hint="e.g. 1.0.0 or 1.2.0-rc.1")


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
    """JSON-safe: non-finite floats become None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
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


def _quant_notes(profile: Profile) -> tuple[bool, list[str]]:
    """Profile-driven choices that change the model: symmetric activations for TensorRT, float I/O."""
    notes: list[str] = []
    q = profile.quantization
    symmetric = q.mode == "int8" and "TensorrtExecutionProvider" in profile.runtime.providers
    if symmetric:
        notes.append("activations were quantized symmetrically (zero point 0) because TensorRT reads QDQ "
                     "models only with symmetric int8 scales")
    if q.mode == "int8" and q.io_dtype != "float32":
        notes.append(f"the profile asks for {q.io_dtype} inputs and outputs; ONNX QDQ models keep float32 "
                     "inputs and outputs (the runtime quantizes at the graph edges)")
    return symmetric, notes


def convert(model: Path, profile: Profile, calib: str, out_dir: Path, key: Path, *, name: str | None = None,
            version: str = "1.0.0", preprocessing: Preprocessing | None = None, labels: Path | None = None,
            seed: int = 0, threads: int | None = None, progress: Callable[[str], None] | None = None,
            latency_runs: int = 200) -> ConvertResult:
    """Quantize ``model`` for ``profile``, validate it against the float model, and write a signed bundle.

    The bundle is ``out_dir / f"{name}-{version}-{profile.name}.edgebundle"``.
    """
    from converters.package import build_bundle, golden_npz

    model = Path(model)
    name = name or model.stem
    _check_args(model, profile, name, version)
    label_names = _read_labels(Path(labels)) if labels is not None else None
    q = profile.quantization
    threads = threads or min(profile.runtime.threads, os.cpu_count() or 1)
    steps = _Steps(progress)
    notes: list[str] = []

    with steps.step("inspect"):
        inputs, outputs, opset = inspect_onnx(model)
        spec = _fixed(_single_float_input(model, inputs))
        _check_label_count(label_names, outputs, labels)

    with steps.step("calibration"):
        samples = load_samples(calib, spec, preprocessing)
        if preprocessing is None and samples.preprocessing is not None:
            pre = samples.preprocessing
            notes.append(f"image preprocessing was derived from the input shape {list(spec.shape)}: "
                         f"{pre.layout}, {pre.color}, {pre.size[0]}x{pre.size[1]}, pixel x {pre.scale:.6g}, "
                         f"mean {list(pre.mean)}, std {list(pre.std)}; give the preprocessing explicitly "
                         "if the model was trained otherwise")
        samples = _relabel(samples, label_names, notes)
        cal, val, cal_info = split(samples, q.calibration_samples, q.validation_samples, seed)
        notes.extend(cal_info.pop("notes"))

    with tempfile.TemporaryDirectory(prefix="edgekit-convert-") as tmp:
        work = Path(tmp)
        quant = work / "model.onnx"
        with steps.step("quantize"):
            symmetric, profile_notes = _quant_notes(profile)
            notes.extend(profile_notes)
            notes.extend(convert_onnx_model(model, quant, q.mode, cal.arrays, spec.name,
                                            per_channel=q.per_channel, method=q.calibration_method,
                                            workdir=work, symmetric_activations=symmetric))
            q_inputs, q_outputs, q_opset = inspect_onnx(quant)

        with steps.step("validate"):
            validation = compare_onnx(model, quant, val, threads, runs=latency_runs)
            if q.mode != "none" and validation["speedup"] is not None and validation["speedup"] < 1:
                notes.append(f"on this host the {q.mode} model ran slower than fp32 "
                             f"(speed-up {validation['speedup']:.2f}x); small models often do, and the device "
                             "may differ: measure there with the agent's bench")

        with steps.step("golden"):
            golden_in, golden_out, atol = _golden(quant, val, spec.name)

        pre = samples.preprocessing or preprocessing
        quantization = {"mode": q.mode, "per_channel": q.per_channel, "method": q.calibration_method,
                        "format": "QDQ" if q.mode == "int8" else q.mode,
                        "calibration": {"count": cal_info["count"], "seed": seed, "sha256": cal_info["sha256"]}}
        report: dict[str, Any] = _finite({
            "schema": REPORT_SCHEMA,
            "name": name,
            "version": version,
            "profile": profile.name,
            "source_model": {"file": model.name, "sha256": _sha256(model), "opset": opset,
                             "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs]},
            "model_opset": q_opset,
            "quantization": quantization,
            "calibration": cal_info,
            "validation": validation,
            "golden": {"count": len(golden_in[spec.name]), "atol": atol,
                       "note": "outputs of the quantized model on this host; the device smoke test must match "
                               "them within atol = max(1e-4, 2% of the largest golden output)"},
            "notes": notes,
            "timings_s": dict(steps.timings),
        })
        manifest_fields: dict[str, Any] = {
            "name": name,
            "version": version,
            "profile": profile.name,
            "format": "onnx",
            "engine": "onnxruntime",
            "model": "model.onnx",
            "inputs": [_fixed(t).to_dict() for t in q_inputs],
            "outputs": [_fixed(t).to_dict() for t in q_outputs],
            "runtime": _runtime(profile),
            "tools": _tools(),
            "preprocessing": pre.to_dict() if pre is not None else None,
            "labels": "labels.txt" if labels is not None else None,
            "golden": {"inputs": "golden/inputs.npz", "outputs": "golden/outputs.npz", "atol": atol},
            "report": "report.json",
            "quantization": quantization,
            "validation": _summary(validation),
        }
        members: dict[str, Path | bytes] = {
            "model.onnx": quant,
            "golden/inputs.npz": golden_npz(golden_in),
            "golden/outputs.npz": golden_npz(golden_out),
            "report.json": (json.dumps(report, indent=2) + "\n").encode("utf-8"),
        }
        if labels is not None:
            members["labels.txt"] = Path(labels)
        with steps.step("package"):
            out_dir = Path(out_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            bundle = build_bundle(out_dir / f"{name}-{version}-{profile.name}.edgebundle", manifest_fields,
                                  members, Path(key))
    report["timings_s"] = dict(steps.timings)  # now with the package step (report.json was written before it)
    return ConvertResult(bundle=bundle, manifest=read_bundle_manifest(bundle), report=report)
