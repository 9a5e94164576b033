"""The bundle manifest: the contract between the converter (host) and the agent (device).

``manifest.json`` inside a bundle is a JSON object. ``parse_manifest`` validates it strictly (pure, no
I/O): unknown schema versions, missing or mistyped fields and unsafe member names are ``BundleError``s.
See docs/bundle.md for the field-by-field description.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_agent.errors import BundleError

MANIFEST_SCHEMA = 1
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "bool")
_SEMVER = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MEMBER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
RESERVED = ("manifest.json", "manifest.sig")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # -1 for a dynamic dimension
    dtype: str
    scale: float | None = None  # quantization of an int8/uint8 tensor: real = (q - zero_point) * scale
    zero_point: int | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: str
    profile: str
    format: str  # "onnx" | "tflite"
    engine: str  # "onnxruntime" | "litert"
    model: str  # member name of the model file
    files: dict[str, FileEntry]  # every member except manifest.json / manifest.sig
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    runtime: dict[str, Any]  # the profile's [runtime] section the bundle was built for
    tools: dict[str, str]  # package -> version that built it
    preprocessing: dict[str, Any] | None = None  # see edge_agent.preprocess.Preprocessing
    labels: str | None = None  # member name of a labels file, one class per line
    golden: dict[str, Any] | None = None  # {"inputs": member, "outputs": member, "atol": float}
    report: str | None = None  # member name of the validation report (JSON)
    # member name of a model the CPU can run in place of ``model`` when the accelerator delegate cannot load
    # (an Edge TPU bundle: ``model`` is compiled by edgetpu_compiler, ``cpu_model`` is the uncompiled one)
    cpu_model: str | None = None
    quantization: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    schema: int = MANIFEST_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["inputs"] = [t.to_dict() for t in self.inputs]
        d["outputs"] = [t.to_dict() for t in self.outputs]
        return d


def _need(data: dict, key: str, typ: type | tuple[type, ...], where: str = "manifest") -> Any:
    if key not in data:
        raise BundleError(f"{where}: missing field {key!r}", hint="rebuild the bundle with edgekit",
                          reason="malformed")
    value = data[key]
    if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
        raise BundleError(f"{where}.{key}: expected {getattr(typ, '__name__', typ)}, got {value!r}",
                          hint="rebuild the bundle with edgekit", reason="malformed")
    return value


def check_member_name(name: str) -> str:
    """A safe, relative member name: no absolute path, no '..', no odd characters."""
    if not isinstance(name, str) or not _MEMBER.fullmatch(name) or ".." in name.split("/"):
        raise BundleError(f"unsafe member name {name!r} in bundle", reason="unsafe_path",
                          hint="the bundle was not made by edgekit or was tampered with; do not use it")
    return name


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object", reason="malformed")
    name = _need(d, "name", str, where)
    shape = _need(d, "shape", list, where)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= -1 for s in shape):
        raise BundleError(f"{where}.shape: expected integers >= -1, got {shape!r}", reason="malformed")
    dtype = _need(d, "dtype", str, where)
    if dtype not in DTYPES:
        raise BundleError(f"{where}.dtype: {dtype!r} is not one of {', '.join(DTYPES)}", reason="malformed")
    scale = d.get("scale")
    zp = d.get("zero_point")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise BundleError(f"{where}.scale: expected a number", reason="malformed")
        try:
            scale = float(scale)
        except OverflowError as e:  # a JSON integer beyond the float range
            raise BundleError(f"{where}.scale: out of the float range", reason="malformed") from e
        if not math.isfinite(scale):
            raise BundleError(f"{where}.scale: expected a finite number, got {scale!r}", reason="malformed")
    if zp is not None and (not isinstance(zp, int) or isinstance(zp, bool)):
        raise BundleError(f"{where}.zero_point: expected an integer", reason="malformed")
    return TensorSpec(name, tuple(shape), dtype, scale, zp)


def parse_manifest(data: Any) -> Manifest:
    """Validate a decoded manifest.json into a ``Manifest`` (pure)."""
    if not isinstance(data, dict):
        raise BundleError("manifest.json is not a JSON object", reason="malformed")
    schema = data.get("schema")
    if type(schema) is not int or schema != MANIFEST_SCHEMA:  # not True, not 1.0
        raise BundleError(
            f"manifest schema version {schema!r} is not supported (this agent reads {MANIFEST_SCHEMA})",
            hint="upgrade edge-agent on the device, or build the bundle with a matching edgekit",
            reason="schema",
        )
    version = _need(data, "version", str)
    if not _SEMVER.fullmatch(version):
        raise BundleError(f"manifest.version {version!r} is not a semantic version (e.g. 1.2.0)",
                          reason="malformed")
    files_raw = _need(data, "files", dict)
    files: dict[str, FileEntry] = {}
    for member, entry in files_raw.items():
        check_member_name(member)
        if member in RESERVED:
            raise BundleError(f"manifest.files lists reserved member {member!r}", reason="malformed")
        if not isinstance(entry, dict):
            raise BundleError(f"manifest.files[{member!r}]: expected an object", reason="malformed")
        sha = _need(entry, "sha256", str, f"manifest.files[{member!r}]")
        size = _need(entry, "size", int, f"manifest.files[{member!r}]")
        if not _SHA256.fullmatch(sha) or size < 0:
            raise BundleError(f"manifest.files[{member!r}]: bad sha256 or size", reason="malformed")
        files[member] = FileEntry(sha, size)
    for member in files:  # "a" and "a/b" cannot both be files when the bundle is unpacked
        parts = member.split("/")
        clash = next((p for p in ("/".join(parts[:i]) for i in range(1, len(parts))) if p in files), None)
        if clash is not None:
            raise BundleError(f"manifest.files lists {clash!r} as a file and {member!r} inside it",
                              reason="malformed")
    model = check_member_name(_need(data, "model", str))
    if model not in files:
        raise BundleError(f"manifest.model {model!r} is not listed in manifest.files", reason="malformed")
    for key in ("labels", "report", "cpu_model"):
        if data.get(key) is not None and check_member_name(_need(data, key, str)) not in files:
            raise BundleError(f"manifest.{key} {data[key]!r} is not listed in manifest.files",
                              reason="malformed")
    golden = data.get("golden")
    if golden is not None:
        if not isinstance(golden, dict):
            raise BundleError("manifest.golden: expected an object", reason="malformed")
        for key in ("inputs", "outputs"):
            if check_member_name(_need(golden, key, str, "manifest.golden")) not in files:
                raise BundleError(f"manifest.golden.{key} is not listed in manifest.files", reason="malformed")
        budget = golden.get("latency_budget_ms")
        if budget is not None:
            try:
                ok = (not isinstance(budget, bool) and isinstance(budget, (int, float))
                      and math.isfinite(budget) and budget > 0)
            except OverflowError:  # a JSON integer beyond the float range
                ok = False
            if not ok:
                raise BundleError(f"manifest.golden.latency_budget_ms: expected a positive number of "
                                  f"milliseconds, got {budget!r}", hint="rebuild the bundle with edgekit",
                                  reason="malformed")
    fmt = _need(data, "format", str)
    engine = _need(data, "engine", str)
    if (fmt, engine) not in (("onnx", "onnxruntime"), ("tflite", "litert")):
        raise BundleError(f"manifest: format {fmt!r} with engine {engine!r} is not supported",
                          reason="malformed")
    inputs = tuple(_tensor(t, f"manifest.inputs[{i}]") for i, t in enumerate(_need(data, "inputs", list)))
    outputs = tuple(_tensor(t, f"manifest.outputs[{i}]") for i, t in enumerate(_need(data, "outputs", list)))
    if not inputs or not outputs:
        raise BundleError("manifest: a model needs at least one input and one output", reason="malformed")
    pre = data.get("preprocessing")
    if pre is not None and not isinstance(pre, dict):
        raise BundleError("manifest.preprocessing: expected an object or null", reason="malformed")
    for key in ("quantization", "validation"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise BundleError(f"manifest.{key}: expected an object or null", reason="malformed")
    return Manifest(
        name=_need(data, "name", str),
        version=version,
        created=_need(data, "created", str),
        profile=_need(data, "profile", str),
        format=fmt,
        engine=engine,
        model=model,
        files=files,
        inputs=inputs,
        outputs=outputs,
        runtime=_need(data, "runtime", dict),
        tools=_need(data, "tools", dict),
        preprocessing=pre,
        labels=data.get("labels"),
        golden=golden,
        report=data.get("report"),
        cpu_model=data.get("cpu_model"),
        quantization=data.get("quantization") or {},
        validation=data.get("validation") or {},
        schema=schema,
    )
