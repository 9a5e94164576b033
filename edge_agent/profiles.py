"""Device profiles: one TOML per board, the single source of truth for host and device.

A profile is parsed into frozen dataclasses. Validation is strict and does no I/O beyond reading the
file: an unknown key, a wrong type or a value outside the allowed set is a ``ProfileError`` that names
the file, the key path (``runtime.threads``) and what is allowed.

Where profiles are found, first match wins:
  1. an explicit path (``--profile ./my-board.toml``),
  2. ``profiles_dir`` (the ``--profiles-dir`` option),
  3. the folder in the ``EDGEKIT_PROFILES_DIR`` environment variable,
  4. the profiles shipped with edgekit (``device_profiles/``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Union

from edge_agent.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

PROFILES_ENV = "EDGEKIT_PROFILES_DIR"
SCHEMA_VERSION = 1

FORMATS = ("tflite", "onnx")
QUANT_MODES = ("int8", "dynamic", "fp16", "none")
IO_DTYPES = ("int8", "uint8", "float32")
CALIB_METHODS = ("minmax", "entropy", "percentile")
ENGINES = ("litert", "onnxruntime")
DELEGATES = ("xnnpack", "edgetpu", "gpu")  # plus "external:<path to .so>"
PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "OpenVINOExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "XnnpackExecutionProvider",
    "CPUExecutionProvider",
)
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")
POWER_SOURCES = ("none", "ina3221", "rapl", "pmic")  # plus "hwmon:<name>", "serial:<meter>"
SERIAL_METERS = ("um25c", "um34c", "ina219-csv")
ARCHES = ("aarch64", "x86_64", "armv7l")
ENGINE_FOR_FORMAT = {"tflite": "litert", "onnx": "onnxruntime"}


def _doc(text: str, choices: tuple[Any, ...] | None = None, minimum: float | None = None,
         maximum: float | None = None) -> dict:
    return {"doc": text, "choices": choices, "min": minimum, "max": maximum}


@dataclass(frozen=True)
class DeviceSection:
    name: str = field(metadata=_doc("profile name; must equal the file name without .toml"))
    description: str = field(metadata=_doc("the board, its SoC and accelerator"))
    arch: str = field(metadata=_doc("CPU architecture of the board", ARCHES))
    cores: int = field(metadata=_doc("CPU cores available to the agent", minimum=1))


@dataclass(frozen=True)
class TargetSection:
    format: str = field(metadata=_doc("model format the converter writes", FORMATS))


@dataclass(frozen=True)
class QuantizationSection:
    mode: str = field(metadata=_doc("int8 = full-integer static quantization", QUANT_MODES))
    io_dtype: str = field(metadata=_doc("dtype of the model's inputs and outputs", IO_DTYPES))
    per_channel: bool = field(metadata=_doc("per-channel weight scales (else per-tensor)"))
    calibration_method: str = field(metadata=_doc("how activation ranges are found", CALIB_METHODS))
    calibration_samples: int = field(metadata=_doc("calibration samples to draw", minimum=1))
    validation_samples: int = field(
        default=200, metadata=_doc("held-out samples for fp32 vs int8 validation", minimum=1)
    )
    exclude_nodes: tuple[str, ...] = field(
        default=(), metadata=_doc("ONNX node names / TFLite tensor names kept in float (not quantized)")
    )
    exclude_op_types: tuple[str, ...] = field(
        default=(), metadata=_doc("op types kept in float: ONNX (e.g. Softmax) or TFLite (e.g. SOFTMAX)")
    )
    gate_min_accuracy_ratio: float = field(
        default=0.99, metadata=_doc("gate with labels: quantized accuracy >= ratio x fp32 accuracy", minimum=0,
                                    maximum=1)
    )
    gate_min_agreement: float = field(
        default=0.99, metadata=_doc("gate without labels: top-1 agreement with fp32 (classifier outputs)",
                                    minimum=0, maximum=1)
    )
    gate_min_snr_db: float = field(
        default=20.0, metadata=_doc("gate for outputs that are not class scores: SNR vs fp32 in dB")
    )
    ladder: bool = field(
        default=True, metadata=_doc("when the gate fails, try per-channel/per-tensor, other calibration methods, "
                                    "then keep the most sensitive layers in float")
    )
    max_calibration_memory_mb: int = field(
        default=512, metadata=_doc("memory bound for calibration: samples and activations held at once", minimum=1)
    )


@dataclass(frozen=True)
class RuntimeSection:
    engine: str = field(metadata=_doc("inference runtime on the device", ENGINES))
    threads: int = field(metadata=_doc("intra-op threads; the board's core count", minimum=1))
    cpu_fallback: bool = field(
        metadata=_doc("run on CPU (reported as degraded) when the accelerator is missing")
    )
    delegates: tuple[str, ...] = field(
        default=(), metadata=_doc("LiteRT delegates in order: xnnpack, edgetpu, gpu, external:<path>")
    )
    providers: tuple[str, ...] = field(
        default=(), metadata=_doc("onnxruntime execution providers in order of preference", PROVIDERS)
    )
    graph_optimization: str = field(
        default="all", metadata=_doc("onnxruntime graph optimisation level", GRAPH_OPT_LEVELS)
    )
    edgetpu_device: str = field(default="", metadata=_doc("Edge TPU selector: usb, usb:N, pci:N"))
    trt_cache_dir: str = field(default="", metadata=_doc("TensorRT engine cache folder"))
    trt_fp16: bool = field(default=False, metadata=_doc("let TensorRT build fp16 engines"))
    trt_int8: bool = field(
        default=False, metadata=_doc("let TensorRT run int8 layers (the Q/DQ scales of an int8 bundle)")
    )


@dataclass(frozen=True)
class PowerSection:
    source: str = field(
        metadata=_doc("none, ina3221, rapl, pmic, hwmon:<chip name> or serial:<um25c|um34c|ina219-csv>")
    )
    sample_hz: float = field(default=10.0, metadata=_doc("power sampling rate", minimum=0.1))
    serial_port: str = field(default="", metadata=_doc("serial device of a USB power meter"))


@dataclass(frozen=True)
class ThermalSection:
    zones: tuple[str, ...] = field(
        default=(), metadata=_doc("thermal zone types to read (/sys/class/thermal/*/type); empty = all")
    )
    throttle_c: float = field(default=80.0, metadata=_doc("temperature at which the board throttles"))


@dataclass(frozen=True)
class TelemetrySection:
    window_s: float = field(default=10.0, metadata=_doc("seconds per telemetry window", minimum=0.1))
    topic_prefix: str = field(default="edgekit", metadata=_doc("MQTT topic prefix"))
    qos: int = field(default=1, metadata=_doc("MQTT QoS of telemetry", (0, 1)))
    slo_p99_ms: float = field(default=0.0, metadata=_doc("p99 latency SLO for alerts; 0 = none", minimum=0))


@dataclass(frozen=True)
class Profile:
    schema: int = field(metadata=_doc("profile schema version", (SCHEMA_VERSION,)))
    device: DeviceSection = field(metadata=_doc("identity of the board"))
    target: TargetSection = field(metadata=_doc("what the converter produces"))
    quantization: QuantizationSection = field(metadata=_doc("quantization settings"))
    runtime: RuntimeSection = field(metadata=_doc("how the agent runs the model"))
    power: PowerSection = field(metadata=_doc("power measurement"))
    thermal: ThermalSection = field(default_factory=ThermalSection, metadata=_doc("thermal zones"))
    telemetry: TelemetrySection = field(default_factory=TelemetrySection, metadata=_doc("telemetry"))
    source_file: str = field(default="", metadata={"internal": True})

    @property
    def name(self) -> str:
        return self.device.name

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("source_file")
        return data


# --------------------------------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, where: str, file: str, meta: dict) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):  # Optional[...]
        if value is None:
            return None
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
        origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, file)
    if origin is tuple:
        if not isinstance(value, list):
            raise _err(file, where, f"expected a list, got {value!r}")
        item_tp = typing.get_args(tp)[0]
        items = tuple(_convert(v, item_tp, f"{where}[{i}]", file, {}) for i, v in enumerate(value))
        if meta.get("choices"):
            for i, item in enumerate(items):
                _check_choice(item, meta["choices"], f"{where}[{i}]", file)
        return items
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp is str and isinstance(value, str))
    )
    if not ok:
        raise _err(file, where, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float:
        value = float(value)
    if meta.get("choices"):
        _check_choice(value, meta["choices"], where, file)
    if meta.get("min") is not None and value < meta["min"]:
        raise _err(file, where, f"must be at least {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise _err(file, where, f"must be at most {meta['max']}, got {value!r}")
    return value


def _check_choice(value: Any, choices: tuple, where: str, file: str) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise _err(file, where, f"{value!r} is not allowed; allowed values: {allowed}")


def _err(file: str, where: str, what: str) -> ProfileError:
    return ProfileError(
        f"{file}: {where}: {what}",
        hint="fix the profile; `edgekit profiles show x86-64` shows a valid one",
    )


def _build(cls: type, table: Any, where: str, file: str) -> Any:
    label = where or "top level"
    if not isinstance(table, dict):
        raise _err(file, label, f"expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise _err(file, key, f"unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in table:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default:
                raise _err(file, key, f"missing required key ({f.metadata.get('doc', '')})")
            continue
        kwargs[name] = _convert(table[name], hints[name], key, file, dict(f.metadata))
    return cls(**kwargs)


def _check_cross_fields(p: Profile, file: str) -> None:
    want = ENGINE_FOR_FORMAT[p.target.format]
    if p.runtime.engine != want:
        raise _err(file, "runtime.engine", f"format {p.target.format!r} runs on engine {want!r}, "
                   f"not {p.runtime.engine!r}")
    if p.runtime.engine == "onnxruntime":
        if p.runtime.delegates:
            raise _err(file, "runtime.delegates", "delegates are for litert; onnxruntime uses providers")
        if not p.runtime.providers:
            raise _err(file, "runtime.providers", "list at least one provider, e.g. CPUExecutionProvider")
        if p.runtime.providers[-1] != "CPUExecutionProvider" and p.runtime.cpu_fallback:
            raise _err(file, "runtime.providers",
                       "cpu_fallback = true needs CPUExecutionProvider as the last provider")
    if p.runtime.engine == "litert":
        if p.runtime.providers:
            raise _err(file, "runtime.providers", "providers are for onnxruntime; litert uses delegates")
        for i, d in enumerate(p.runtime.delegates):
            if d not in DELEGATES and not (d.startswith("external:") and len(d) > len("external:")):
                raise _err(file, f"runtime.delegates[{i}]",
                           f"{d!r} is not allowed; allowed: {', '.join(DELEGATES)}, external:<path>")
    src = p.power.source
    if src.startswith("hwmon:"):
        if not src[len("hwmon:"):]:
            raise _err(file, "power.source", "hwmon:<name> needs the hwmon chip name")
    elif src.startswith("serial:"):
        _check_choice(src[len("serial:"):], SERIAL_METERS, "power.source (serial meter)", file)
    else:
        _check_choice(src, (*POWER_SOURCES, "hwmon:<name>", "serial:<meter>"), "power.source", file)
    if p.quantization.io_dtype != "float32" and p.quantization.mode != "int8":
        raise _err(file, "quantization.io_dtype",
                   f"{p.quantization.io_dtype} inputs need mode = 'int8' (mode is {p.quantization.mode!r})")


def parse_profile(data: dict, file: str, expected_name: str | None = None) -> Profile:
    """Validate a parsed TOML table into a ``Profile`` (pure: no I/O)."""
    if isinstance(data, dict) and data.get("schema") not in (None, SCHEMA_VERSION):
        raise _err(file, "schema", f"schema version {data.get('schema')!r} is not supported; "
                   f"this edgekit reads version {SCHEMA_VERSION}")
    profile = _build(Profile, data, "", file)
    if expected_name is not None and profile.device.name != expected_name:
        raise _err(file, "device.name", f"{profile.device.name!r} must equal the file name {expected_name!r}")
    _check_cross_fields(profile, file)
    return dataclasses.replace(profile, source_file=file)


# --------------------------------------------------------------------------------------------------
# finding and loading


def builtin_profiles_dir() -> Path:
    return Path(str(resources.files("device_profiles")))


def search_dirs(profiles_dir: str | os.PathLike | None = None) -> list[Path]:
    dirs: list[Path] = []
    for where, value in (("--profiles-dir", profiles_dir), (f"${PROFILES_ENV}", os.environ.get(PROFILES_ENV))):
        if not value:
            continue
        d = Path(value)
        if not d.is_dir():
            raise ProfileError(f"{where} {d} is not a folder",
                               hint="point it at a folder holding <name>.toml profile files")
        dirs.append(d)
    dirs.append(builtin_profiles_dir())
    return dirs


def load_profile_file(path: str | os.PathLike) -> Profile:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist",
                           hint="`edgekit profiles list` shows the profiles found") from None
    except OSError as e:
        raise ProfileError(f"cannot read profile file {path}: {e.strerror}") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}", hint="check the line it names") from e
    return parse_profile(data, str(path), expected_name=path.stem)


def load_profile(name_or_path: str, profiles_dir: str | os.PathLike | None = None) -> Profile:
    """Load a profile by name (searching the profile folders) or by path to a .toml file."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_profile_file(name_or_path)
    for d in search_dirs(profiles_dir):
        candidate = d / f"{name_or_path}.toml"
        if candidate.is_file():
            return load_profile_file(candidate)
    known = ", ".join(sorted(available_profiles(profiles_dir))) or "none"
    raise ProfileError(
        f"unknown profile {name_or_path!r}; known profiles: {known}",
        hint=f"add {name_or_path}.toml to a folder given with --profiles-dir or ${PROFILES_ENV}",
    )


def available_profiles(profiles_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Profile name -> file, with earlier search folders shadowing later ones."""
    found: dict[str, Path] = {}
    for d in reversed(search_dirs(profiles_dir)):
        if d.is_dir():
            for f in sorted(d.glob("*.toml")):
                found[f.stem] = f
    return dict(sorted(found.items()))


def list_profiles(profiles_dir: str | os.PathLike | None = None) -> list[Profile]:
    """Load every profile found; raises on the first invalid one."""
    return [load_profile_file(p) for p in available_profiles(profiles_dir).values()]
