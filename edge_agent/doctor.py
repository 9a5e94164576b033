"""``edge-agent doctor``: check this board against its device profile, one row per check.

    edge-agent doctor --profile NAME|PATH [--profiles-dir DIR] [--state-dir DIR] [--mqtt HOST:PORT]
                      [--source SPEC] [--pubkey PATH] [--sysfs-root DIR] [--vcgencmd PATH] [--nvpmodel PATH]
                      [--timeout S] [--strict] [--json]

``run_checks(profile, options=...)`` returns a list of ``Check(name, status, detail, note)``. ``note`` is the
checklist item of the board's firmware note that explains the setup and the fix
(``firmware_notes/rpi5.md#runtime``); a profile without a note of its own (a copy under a new name) gets
the note of the closest shipped profile (``note_board``). The checks, in order:

* ``python`` — CPython >= 3.10, 64-bit, the profile's architecture;
* ``glibc`` — new enough for the runtime's manylinux wheels;
* ``runtime`` — the engine imports AND builds an interpreter/session on a tiny built-in model, and its output
  is right (tflite-runtime under numpy 2 imports fine and then cannot build one);
* ``delegate:<name>`` (LiteRT) — XNNPACK takes the int8 model's node and computes it right;
  ``load_delegate("libedgetpu.so.1", {"device": ...})`` loads the library and opens the Edge TPU;
* ``provider:<name>`` (onnxruntime) — the execution provider is in this build and a session really runs on it;
* ``trt-cache`` (TensorRT profiles) — the engine cache folder is writable;
* ``power`` — the profile's power source opens through the power registry and gives a reading;
* ``power-mode`` (Jetson) — ``nvpmodel -q`` answers (the agent reports the mode in its birth message and bench);
* ``thermal`` — the profile's thermal zones exist and read; ``cpufreq`` — readable, cores vs the profile;
* ``throttle`` (Raspberry Pi) — ``vcgencmd get_throttled``;
* ``camera`` (with ``--source``) — the camera, stream or video file opens and gives a frame;
* ``state-dir`` — a temp file is created, written, fsynced, renamed and removed; free space;
* ``broker`` (with ``--mqtt``) — TCP connect + MQTT 5 CONNECT/CONNACK with a throwaway client id;
* ``pubkey`` — the trusted key is there and is an Ed25519 public key, not a private one.

Statuses: ``pass``; ``warn`` (works, but look at it); ``fail`` (the agent will not work as the profile says);
``absent`` (hardware the profile names is not on this machine: sensor, command, camera); ``skip`` (not asked
for, or nothing to check). A check never crashes the doctor: an error it did not expect becomes
``fail: internal error <type>: <message>``. The runtime, delegate and provider checks run in a child
process, so a runtime that crashes (a libedgetpu built for another TensorFlow can segfault) or hangs is a
``fail`` row too. Exit code: 0 when no check failed (with ``--strict``: and none is absent), 1 otherwise,
2 for bad arguments (an unknown or invalid profile).

The tiny models are built into this module: ``TINY_TFLITE`` (680 bytes: one int8 FULLY_CONNECTED,
y = W x + b with every scale 1 and zero point 0, written with LiteRT's flatbuffer schema; tests rebuild it)
and ``TINY_ONNX`` (92 bytes: y = x + x, opset 13, IR 7; written with onnx.helper, which the device never
needs). Nothing is downloaded and no file outside ``--state-dir`` is written.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import errno
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import Any, NamedTuple

from edge_agent.errors import EdgekitError, InputError, KeyFileError
from edge_agent.profiles import Profile, builtin_profiles_dir, load_profile, load_profile_file

PROG = "edge-agent"
SCHEMA = 1
STATUSES = ("pass", "warn", "fail", "absent", "skip")
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")
DEFAULT_PUBKEY = Path("/etc/edge-agent/trusted.pub")
SYSFS_ROOT = Path("/sys")
MIN_PYTHON = (3, 10)
MIN_FREE_MB = 256.0  # bundles are tens of MiB, the store keeps 3 versions, the spool is bounded at 64 MiB
PROBE_TIMEOUT_S = 300.0  # a first TensorRT engine build takes a while, even for one node
PROBE_MARK = "@@edgekit-doctor "
COMMAND_TIMEOUT_S = 5.0

# The shipped notes (firmware_notes/<board>.md) and the board family each belongs to.
BOARDS: dict[str, str] = {
    "rpi4": "pi", "rpi5": "pi", "coral-usb": "pi", "coral-devboard": "coral",
    "jetson-nano": "jetson", "jetson-orin-nano": "jetson", "x86-64": "x86",
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"
ONNXRUNTIME_DISTS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-qnn")

# glibc each engine's wheels need: (minimum, why). tflite-runtime 2.14 is the aarch64 exception (2.34).
GLIBC_MIN: dict[str, tuple[tuple[int, int], str]] = {
    "litert": ((2, 27), "ai-edge-litert wheels are manylinux_2_27"),
    "onnxruntime": ((2, 27), "onnxruntime wheels are manylinux_2_27 (1.23) / manylinux_2_28 (1.31)"),
}
GLIBC_TFLITE_RUNTIME_AARCH64 = ((2, 34), "the tflite-runtime 2.14 aarch64 wheel needs glibc >= 2.34")

# One int8 FULLY_CONNECTED: y = W x + b, W = [[1, 2, 3, 4], [-1, 0, 1, 0]], b = [1, -2], every scale 1.0 and
# zero point 0 (so the result is exact): x = [3, -1, 2, 5] -> y = [28, -3].
TINY_TFLITE = base64.b64decode(
    "CAAAAFRGTDN+////FAAAAFQAAABsAAAAbAIAAAMAAAADAAAAPAAAACQAAAAEAAAA6v///wQAAAAIAAAAAQAAAP7///8AAAYACAAE"
    "AAYAAAAEAAAACAAAAAECAwT/AAEAeP///xQAAABlZGdla2l0IGRvY3RvciBwcm9iZQAAAAABAAAAFAAAAAAADgAYABQAEAAMAAgA"
    "BAAOAAAAFAAAABwAAABkAAAAaAAAAGwAAAAEAAAAbWFpbgAAAAABAAAAFAAAAAAADgAUAAAAEAAMAAsABAAOAAAAFAAAAAAAAAgQ"
    "AAAAFAAAAAQABAAEAAAAAQAAAAMAAAADAAAAAAAAAAEAAAACAAAAAQAAAAMAAAABAAAAAAAAAAQAAAAUAQAAsAAAAFQAAAAEAAAA"
    "Cv///xAAAAAwAAAAAAAACTAAAAD8/v//CAAAABQAAAABAAAAAAAAAAAAAAAAAAAAAQAAAAAAgD8BAAAAeQAAAAIAAAABAAAAAgAA"
    "ALb///8UAAAAMAAAAAIAAAAAAAACLAAAAEz///8IAAAAEAAAAAEAAAAAAAAAAAAAAAEAAAAAAIA/AQAAAGIAAAABAAAAAgAAAAAA"
    "DgAYABQAEwAMAAgABAAOAAAAFAAAADQAAAABAAAAAAAACTAAAACk////CAAAABQAAAABAAAAAAAAAAAAAAAAAAAAAQAAAAAAgD8B"
    "AAAAdwAAAAIAAAACAAAABAAAAAAADgAUABAADwAAAAgABAAOAAAAHAAAADgAAAAAAAAJOAAAAAwADAAAAAAACAAEAAwAAAAIAAAA"
    "EAAAAAEAAAAAAAAAAAAAAAEAAAAAAIA/AQAAAHgAAAACAAAAAQAAAAQAAAABAAAAEAAAAAwAEAAPAAAACAAEAAwAAAAJAAAABAAA"
    "AAAAAAk="
)
TINY_TFLITE_IN = (3, -1, 2, 5)
TINY_TFLITE_OUT = (28, -3)
# y = x + x (Add), float32 [1, 4], opset 13, IR version 7 (onnxruntime >= 1.7 loads it).
TINY_ONNX = (b"\x08\x07\x12\x0eedgekit-doctor:B\n\x0e\n\x01x\n\x01x\x12\x01y\"\x03Add\x12\x06doctorZ\x13\n\x01x"
             b"\x12\x0e\n\x0c\x08\x01\x12\x08\n\x02\x08\x01\n\x02\x08\x04b\x13\n\x01y\x12\x0e\n\x0c\x08\x01\x12\x08"
             b"\n\x02\x08\x01\n\x02\x08\x04B\x04\n\x00\x10\r")
TINY_ONNX_IN = (1.0, 2.0, 3.0, 4.0)
TINY_ONNX_OUT = (2.0, 4.0, 6.0, 8.0)


class Check(NamedTuple):
    """One row of the doctor's table."""

    name: str
    status: str  # pass | warn | fail | absent | skip
    detail: str
    note: str  # firmware_notes/<board>.md#<anchor>

    def to_dict(self) -> dict[str, str]:
        return dict(self._asdict())


@dataclass(frozen=True)
class DoctorOptions:
    """Where to look and what to try; every hardware root is injected (tests use fake trees)."""

    state_dir: Path = DEFAULT_STATE_DIR
    mqtt: str | None = None  # HOST:PORT; None: the broker check is skipped
    source: str | None = None  # camera:N, camera:/dev/videoN, rtsp://..., video:PATH; None: skipped
    sysfs_root: Path = SYSFS_ROOT
    vcgencmd: str = "vcgencmd"
    nvpmodel: str = "nvpmodel"
    pubkey: Path | None = None  # None: the agent's default locations
    timeout_s: float = 5.0  # broker CONNACK
    probe_timeout_s: float = PROBE_TIMEOUT_S
    probe_python: str | None = None  # the interpreter that runs the runtime probe (default: this one)


# a check function's answer: (status, detail) or (status, detail, anchor) when the anchor depends on the outcome
Result = tuple[str, str] | tuple[str, str, str]


# --------------------------------------------------------------------------------------------------
# which note, which checks


def note_board(profile: Profile) -> tuple[str, str | None]:
    """The shipped note for ``profile`` and, when it is not the profile's own, why that one.

    A profile copied under a new name keeps the description of the one it was copied from; otherwise the
    closest shipped profile by engine, power source, delegates/providers and architecture is used.
    """
    if profile.name in BOARDS:
        return profile.name, None
    best, best_score, why = "x86-64", -1, ""
    for board in BOARDS:
        try:
            shipped = load_profile_file(builtin_profiles_dir() / f"{board}.toml")
        except EdgekitError:
            continue
        if shipped.device.description == profile.device.description:
            return board, f"profile {profile.name!r} has no note of its own; it has the description of {board!r}"
        rt, srt = profile.runtime, shipped.runtime
        score = (8 * (rt.engine == srt.engine) + 4 * (profile.power.source == shipped.power.source)
                 + 4 * (rt.delegates == srt.delegates and rt.providers == srt.providers)
                 + 2 * (profile.device.arch == shipped.device.arch))
        if score > best_score:
            best, best_score = board, score
            why = (f"profile {profile.name!r} has no note of its own; {board!r} is the closest shipped profile "
                   "(engine, power source, delegates/providers, architecture)")
    return best, why


def _family(profile: Profile) -> str:
    return BOARDS[note_board(profile)[0]]


def plan(profile: Profile) -> list[tuple[str, tuple[str, ...]]]:
    """The checks ``run_checks`` makes for ``profile``, in order, with every note anchor each may name."""
    family = _family(profile)
    rt = profile.runtime
    out: list[tuple[str, tuple[str, ...]]] = [("python", ("python",)), ("glibc", ("glibc",)),
                                              ("runtime", ("runtime",))]
    if rt.engine == "litert":
        for d in rt.delegates:
            anchors = {"xnnpack": ("xnnpack",), "edgetpu": ("libedgetpu", "edge-tpu-device")}.get(d, ("runtime",))
            out.append((f"delegate:{d}", anchors))
    else:
        for p in rt.providers:
            if p != CPU_PROVIDER:
                out.append((f"provider:{p}", ("gpu-providers",) if p in GPU_PROVIDERS else ("runtime",)))
    if rt.engine == "onnxruntime" and rt.trt_cache_dir and "TensorrtExecutionProvider" in rt.providers:
        out.append(("trt-cache", ("tensorrt-cache",)))
    out.append(("power", ("power",)))
    if family == "jetson":
        out.append(("power-mode", ("power-mode",)))
    out += [("thermal", ("thermal-zones",)), ("cpufreq", ("cpu-frequency",))]
    if family == "pi":
        out.append(("throttle", ("throttling",)))
    out += [("camera", ("camera",)), ("state-dir", ("state-folder",)), ("broker", ("broker",)),
            ("pubkey", ("trusted-key",))]
    return out


def run_checks(profile: Profile, *, options: DoctorOptions) -> list[Check]:
    """Run every check of ``plan(profile)``; never raises for what it finds (see the module docstring)."""
    board, _ = note_board(profile)
    checks: list[Check] = []
    steps = plan(profile)
    anchors = dict(steps)
    probe_names = [n for n, _ in steps if n == "runtime" or n.startswith(("delegate:", "provider:"))]
    local: dict[str, Callable[[], Result]] = {
        "python": lambda: check_python(profile),
        "glibc": lambda: check_glibc(profile),
        "trt-cache": lambda: check_folder(Path(profile.runtime.trt_cache_dir), "the TensorRT engine cache",
                                          min_free_mb=None),
        "power": lambda: check_power(profile, options, board),
        "power-mode": lambda: check_power_mode(options.nvpmodel),
        "thermal": lambda: check_thermal(profile, options.sysfs_root),
        "cpufreq": lambda: check_cpufreq(profile, options.sysfs_root),
        "throttle": lambda: check_throttle(options.vcgencmd),
        "camera": lambda: check_camera(options.source),
        "state-dir": lambda: check_folder(options.state_dir, "the state folder", min_free_mb=MIN_FREE_MB),
        "broker": lambda: check_broker(options.mqtt, options.timeout_s),
        "pubkey": lambda: check_pubkey(options.pubkey),
    }
    for name, _anchors in steps:
        if name in probe_names:
            if name == probe_names[0]:
                results = _guard(lambda: _run_probe(profile, options, probe_names), probe_names)
                checks += [Check(n, s, d, f"firmware_notes/{board}.md#{a or anchors[n][0]}")
                           for n, (s, d, a) in zip(probe_names, results, strict=True)]
            continue
        status, detail, anchor = _guard_one(local[name])
        checks.append(Check(name, status, detail, f"firmware_notes/{board}.md#{anchor or anchors[name][0]}"))
    return checks


def _error_text(e: BaseException) -> str:
    if isinstance(e, EdgekitError):
        return f"{e.message} (hint: {e.hint})" if e.hint else e.message
    return f"internal error {type(e).__name__}: {e}"


def _guard_one(fn: Callable[[], Result]) -> tuple[str, str, str | None]:
    """Run one check; an exception becomes a ``fail`` row (never propagates)."""
    try:
        result = fn()
    except Exception as e:  # a check must never crash the doctor: the row says what happened
        return "fail", _error_text(e), None
    status, detail, *rest = result
    return status, detail, (rest[0] if rest else None)


def _guard(fn: Callable[[], list[tuple[str, str, str | None]]],
           names: Sequence[str]) -> list[tuple[str, str, str | None]]:
    try:
        return fn()
    except Exception as e:  # the probe's parent side failed: every runtime row says so
        return [("fail", _error_text(e), None) for _ in names]


# --------------------------------------------------------------------------------------------------
# python and glibc


def platform_arch(machine: str, pointer_bits: int) -> str:
    """The architecture user space runs (pure): a 32-bit Python on a 64-bit ARM kernel is ``armv7l``."""
    m = machine.lower()
    arch = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "armv8l": "armv7l"}.get(m, m)
    if arch.startswith("armv7"):
        arch = "armv7l"
    if pointer_bits == 32 and arch == "aarch64":
        return "armv7l"
    if pointer_bits == 32 and arch == "x86_64":
        return "i686"
    return arch


def python_status(version: tuple[int, int, int], implementation: str, system: str, arch: str,
                  profile_arch: str) -> Result:
    """The ``python`` check's verdict (pure)."""
    ver = ".".join(map(str, version))
    where = f"Python {ver} ({implementation}) on {system} {arch}"
    problems = []
    if version[:2] < MIN_PYTHON:
        problems.append(f"edgekit needs Python >= {'.'.join(map(str, MIN_PYTHON))}: give the agent its own newer "
                        "Python in a venv, and leave the system Python alone")
    if arch != profile_arch:
        if profile_arch == "aarch64" and arch == "armv7l":
            problems.append("this is a 32-bit user space: LiteRT has no armv7l wheel; flash the 64-bit OS image")
        else:
            problems.append(f"the profile is for {profile_arch}: run the profile made for this board")
    if system != "Linux":
        problems.append("the agent runs on Linux")
    if problems:
        return "fail", f"{where}: " + "; ".join(problems)
    return "pass", f"{where}, as the profile says"


def check_python(profile: Profile) -> Result:
    arch = platform_arch(platform.machine(), struct.calcsize("P") * 8)
    v = sys.version_info
    return python_status((v.major, v.minor, v.micro), platform.python_implementation(), platform.system(), arch,
                         profile.device.arch)


def glibc_version() -> tuple[int, int] | None:
    """glibc's version of this process, None on a C library that is not glibc (musl)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        text = ""
    name, _, ver = text.partition(" ")
    if name != "glibc":
        lib, ver = platform.libc_ver()
        if lib != "glibc":
            return None
    try:
        major, minor = ver.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def glibc_status(glibc: tuple[int, int] | None, engine: str, arch: str, tflite_runtime_only: bool,
                 wheels: Sequence[str] = ()) -> Result:
    """The ``glibc`` check's verdict (pure). ``wheels``: ``dist tag`` of the runtime wheels installed."""
    need, why = GLIBC_MIN[engine]
    if engine == "litert" and tflite_runtime_only and arch == "aarch64":
        need, why = GLIBC_TFLITE_RUNTIME_AARCH64
    installed = f"; installed: {', '.join(wheels)}" if wheels else ""
    want = f"glibc >= {need[0]}.{need[1]} ({why})"
    if glibc is None:
        return "fail", (f"no glibc (musl or another C library): the runtime's manylinux wheels need {want}; "
                        "use a glibc distribution (Raspberry Pi OS, Debian, Ubuntu, L4T)")
    have = f"glibc {glibc[0]}.{glibc[1]}"
    if glibc < need:
        return "fail", f"{have} is older than the {want}{installed}"
    return "pass", f"{have}: meets {want}{installed}"


def _wheel_tags(dists: Sequence[str]) -> list[str]:
    out = []
    for name in dists:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        tags = [line.split(":", 1)[1].strip() for line in (dist.read_text("WHEEL") or "").splitlines()
                if line.startswith("Tag:")]
        out.append(f"{name} {dist.version} ({', '.join(tags) or 'no wheel tag'})")
    return out


def check_glibc(profile: Profile) -> Result:
    engine = profile.runtime.engine
    arch = platform_arch(platform.machine(), struct.calcsize("P") * 8)
    tflite_only = (engine == "litert" and util.find_spec("ai_edge_litert") is None
                   and util.find_spec("tflite_runtime") is not None)
    dists = ("ai-edge-litert", "tflite-runtime") if engine == "litert" else ONNXRUNTIME_DISTS
    return glibc_status(glibc_version(), engine, arch, tflite_only, _wheel_tags(dists))


# --------------------------------------------------------------------------------------------------
# the runtime probe (runs in a child process: a crashing or hanging runtime cannot take the doctor down)


def _probe_request(profile: Profile, names: Sequence[str]) -> dict[str, Any]:
    rt = profile.runtime
    threads = max(1, min(rt.threads, os.cpu_count() or 1))
    return {"engine": rt.engine, "names": list(names), "threads": threads, "profile": profile.name,
            "runtime": {"delegates": list(rt.delegates), "providers": list(rt.providers),
                        "edgetpu_device": rt.edgetpu_device, "cpu_fallback": rt.cpu_fallback}}


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _run_probe(profile: Profile, options: DoctorOptions,
               names: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """Run ``_probe_main`` in a child interpreter and turn its report (or its death) into rows."""
    python = options.probe_python or sys.executable
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
    cmd = [python, "-c", "import sys; from edge_agent.doctor import _probe_main; sys.exit(_probe_main())"]
    request = json.dumps(_probe_request(profile, names))
    timed_out = False
    try:
        done = subprocess.run(cmd, input=request, capture_output=True, text=True, env=env,
                              timeout=options.probe_timeout_s, check=False)
        stdout, stderr, rc = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        timed_out = True
        stdout = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = None
    except OSError as e:
        raise InputError(f"cannot start the runtime probe {python}: {e.strerror or e}") from e
    results: dict[str, tuple[str, str, str | None]] = {}
    started: list[str] = []
    for line in stdout.splitlines():
        if not line.startswith(PROBE_MARK):
            continue
        try:
            msg = json.loads(line[len(PROBE_MARK):])
        except json.JSONDecodeError:
            continue
        if "start" in msg:
            started.append(str(msg["start"]))
        elif "result" in msg:
            r = msg["result"]
            if r.get("status") in STATUSES:
                results[str(r["name"])] = (r["status"], str(r["detail"]), r.get("anchor"))
    unfinished = next((n for n in started if n not in results), None)
    said = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:] if line.strip())
    said = f"; it printed: {said[:400]}" if said else ""
    if timed_out:
        death = f"did not finish within {options.probe_timeout_s:g} s"
    elif rc is not None and rc < 0:
        death = f"crashed ({_signal_name(rc)})"
    elif rc:
        death = f"exited with {rc}"
    else:
        death = "ended without a result"
    out = []
    for name in names:
        if name in results:
            out.append(results[name])
        elif name == unfinished:
            why = (" (a libedgetpu built for another TensorFlow version can crash the runtime)"
                   if name == "delegate:edgetpu" else "")
            out.append(("fail", f"the runtime {death} while checking {name}{why}{said}", None))
        elif unfinished is None and not started:
            out.append(("fail", f"the runtime probe ({python}) {death}{said}", None))
        else:
            out.append(("skip", f"not run: the runtime probe {death} at {unfinished or 'the start'}", None))
    return out


def _emit(msg: dict[str, Any]) -> None:
    sys.stdout.write(PROBE_MARK + json.dumps(msg) + "\n")
    sys.stdout.flush()


def _probe_main() -> int:
    """The child side: read the request on stdin, print one start line and one result line per check."""
    request = json.loads(sys.stdin.read())
    state: dict[str, Any] = {}
    for name in request["names"]:
        _emit({"start": name})
        status, detail, anchor = _guard_one(lambda name=name: _probe_one(name, request, state))
        _emit({"result": {"name": name, "status": status, "detail": detail, "anchor": anchor}})
    return 0


def _probe_one(name: str, request: dict[str, Any], state: dict[str, Any]) -> Result:
    if request["engine"] == "litert":
        if name == "runtime":
            return _litert_runtime(request, state)
        result = _litert_delegate(name[len("delegate:"):], request, state)
    elif name == "runtime":
        return _ort_runtime(state)
    else:
        result = _ort_provider(name[len("provider:"):], state)
    if result[0] == "fail" and name != "delegate:xnnpack":
        fallback = ("the agent would run on the CPU, reported as degraded" if request["runtime"]["cpu_fallback"]
                    else "the profile has cpu_fallback = false: the agent would refuse to run")
        return ("fail", f"{result[1]}; {fallback}", *result[2:])
    return result


def _litert_runtime(request: dict[str, Any], state: dict[str, Any]) -> Result:
    import numpy as np

    from edge_agent.backends.tflite import load_runtime

    rt = load_runtime()  # MissingDependencyError names the tflite extra
    state["rt"] = rt
    resolver = rt.module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = rt.module.Interpreter(model_content=TINY_TFLITE, num_threads=1,
                                       experimental_op_resolver_type=resolver)
        out = _invoke_tflite(interp, np)
    except ImportError as e:  # tflite-runtime built for numpy 1 under numpy 2: "_ARRAY_API not found"
        return "fail", (f"{rt.label} imports but cannot build an interpreter: {e} (tflite-runtime needs numpy<2; "
                        "install ai-edge-litert: pip install 'edgekit[tflite]')")
    except (ValueError, RuntimeError) as e:
        return "fail", f"{rt.label} imports but cannot run the built-in int8 test model: {e}"
    if tuple(int(v) for v in out) != TINY_TFLITE_OUT:
        return "fail", (f"{rt.label} ran the built-in int8 test model but gave {list(out)}, expected "
                        f"{list(TINY_TFLITE_OUT)}: this runtime computes wrong results on this CPU")
    detail = f"{rt.label}: built an interpreter for the built-in int8 test model and ran it (output right)"
    if rt.label.startswith("tflite-runtime"):
        return "warn", (f"{detail}; tflite-runtime is the fallback: it needs numpy<2 and does not apply XNNPACK "
                        "to int8 models (about 24x slower): install ai-edge-litert")
    return "pass", detail


def _invoke_tflite(interp: Any, np: Any) -> list[int]:
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]
    interp.set_tensor(inp["index"], np.array([TINY_TFLITE_IN], dtype=np.int8))
    interp.invoke()
    return [int(v) for v in interp.get_tensor(interp.get_output_details()[0]["index"]).reshape(-1)]


def _no_runtime(state: dict[str, Any]) -> Result | None:
    if state.get("rt") is None:
        return "skip", "no TFLite runtime could be loaded (see the runtime check)"
    return None


def _litert_delegate(delegate: str, request: dict[str, Any], state: dict[str, Any]) -> Result:
    missing = _no_runtime(state)
    if missing is not None:
        return missing
    from edge_agent.backends.tflite import parse_delegates

    rt = state["rt"]
    spec = next(s for s in parse_delegates([delegate], request["runtime"]))
    if spec.name == "xnnpack":
        return _xnnpack(rt, request["threads"])
    if spec.library is None:  # gpu
        return "fail", (f"no GPU delegate library exists for {rt.label}'s Interpreter API on Linux (LiteRT's GPU "
                        "accelerator belongs to its CompiledModel API); a self-built one can be named "
                        "external:<path>")
    lib = spec.library
    edgetpu = spec.name == "edgetpu"
    try:
        handle = ctypes.CDLL(lib)
    except OSError as e:
        fix = (" (install libedgetpu1-std from Coral's apt repository; Mendel ships it)" if edgetpu
               else " (check the path after external:)")
        return "fail", f"{lib} cannot be loaded: {e}{fix}", "libedgetpu" if edgetpu else "runtime"
    if not hasattr(handle, "tflite_plugin_create_delegate"):
        return "fail", f"{lib} is not a TFLite delegate (it does not export tflite_plugin_create_delegate)"
    try:
        rt.module.load_delegate(lib, options=spec.options or None)
    except (OSError, ValueError, RuntimeError) as e:
        where = f" on device {spec.options['device']!r}" if spec.options.get("device") else ""
        if edgetpu:
            return "fail", (f"{lib} loads, but no Edge TPU answered{where}: {' '.join(str(e).split())} (is it "
                            "plugged in / is /dev/apex_0 there, and is the agent's user allowed to open it?)",
                            "edge-tpu-device")
        return "fail", f"{lib} loads, but the delegate refused to start: {e}"
    if edgetpu:
        device = spec.options.get("device", "")
        return "pass", f"{lib} loaded and the Edge TPU opened (device {device or 'default'})", "edge-tpu-device"
    return "pass", f"{lib} loaded as a delegate"


def _xnnpack(rt: Any, threads: int) -> Result:
    import numpy as np

    from edge_agent.backends.tflite import nodes_taken_by_delegates

    interp = rt.module.Interpreter(model_content=TINY_TFLITE, num_threads=threads,
                                   experimental_op_resolver_type=rt.module.OpResolverType.BUILTIN)
    model_nodes = len(interp._get_ops_details())
    out = _invoke_tflite(interp, np)
    taken = nodes_taken_by_delegates(interp._get_ops_details(), model_nodes)
    took = len(set().union(*taken.values())) if taken else 0
    if tuple(out) != TINY_TFLITE_OUT:
        return "fail", (f"XNNPACK took {took} of {model_nodes} node(s) of the int8 test model but gave {out}, "
                        f"expected {list(TINY_TFLITE_OUT)}: wrong results on this CPU (under qemu: pin QEMU_CPU)")
    if took == 0:
        return "fail", (f"XNNPACK took none of the int8 test model's {model_nodes} node(s) with {rt.label} "
                        "(tflite-runtime does not delegate int8 models: about 24x slower); install ai-edge-litert")
    return "pass", (f"XNNPACK took {took} of {model_nodes} node(s) of the int8 test model ({threads} threads), "
                    "output right")


def _ort(state: dict[str, Any]) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        from edge_agent.errors import missing_extra

        raise missing_extra("onnxruntime", "onnx", "running an ONNX bundle") from e
    state["ort"] = ort
    return ort


def _ort_session(ort: Any, providers: list[str]) -> Any:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(TINY_ONNX, sess_options=so, providers=providers)


def _ort_run(session: Any) -> list[float]:
    import numpy as np

    out = session.run(None, {"x": np.array([TINY_ONNX_IN], dtype=np.float32)})[0]
    return [float(v) for v in out.reshape(-1)]


def _ort_runtime(state: dict[str, Any]) -> Result:
    ort = _ort(state)
    installed = [d for d in ONNXRUNTIME_DISTS if _dist_version(d) is not None]
    try:
        session = _ort_session(ort, [CPU_PROVIDER])
        out = _ort_run(session)
    except Exception as e:  # onnxruntime's pybind11 errors are not RuntimeError subclasses
        return "fail", f"onnxruntime {ort.__version__} imports but cannot run the built-in test model: {e}"
    if tuple(out) != TINY_ONNX_OUT:
        return "fail", (f"onnxruntime {ort.__version__} gave {out} for the test model, expected "
                        f"{list(TINY_ONNX_OUT)}")
    detail = (f"onnxruntime {ort.__version__}: built a CPU session for the built-in test model and ran it "
              f"(output right); providers in this build: {', '.join(ort.get_available_providers())}")
    if len(installed) > 1:
        return "warn", (f"{detail}; {len(installed)} onnxruntime packages are installed ({', '.join(installed)}): "
                        "one shadows the other; keep one")
    return "pass", detail


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _ort_provider(provider: str, state: dict[str, Any]) -> Result:
    ort = state.get("ort")
    if ort is None:
        return "skip", "onnxruntime could not be loaded (see the runtime check)"
    available = list(ort.get_available_providers())
    if provider not in available:
        return "fail", (f"{provider} is not in this onnxruntime {ort.__version__} build (it has "
                        f"{', '.join(available)}): install the build for this board")
    try:
        session = _ort_session(ort, [provider, CPU_PROVIDER])
        in_use = list(session.get_providers())
        out = _ort_run(session)
    except Exception as e:  # onnxruntime's pybind11 errors are not RuntimeError subclasses
        said = " ".join(str(e).split())[:400]
        return "fail", f"{provider} is in this build, but a session with it failed: {said}"
    if not in_use or in_use[0] != provider:
        return "fail", (f"{provider} is in this build, but the session fell back to {', '.join(in_use)} (its "
                        "libraries, e.g. CUDA/TensorRT, do not load: check they match this onnxruntime build)")
    if tuple(out) != TINY_ONNX_OUT:
        return "fail", f"a session on {provider} gave {out} for the test model, expected {list(TINY_ONNX_OUT)}"
    return "pass", f"a session runs the built-in test model on {provider} (output right)"


# --------------------------------------------------------------------------------------------------
# folders


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def probe_write(folder: Path) -> None:
    """Create, write, fsync, rename and remove a temp file in ``folder`` (what the agent's writes need)."""
    name = f".edgekit-doctor-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp, final = folder / f"{name}.tmp", folder / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        for p in (tmp, final):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def check_folder(folder: Path, what: str, *, min_free_mb: float | None) -> Result:
    """A folder the agent writes to: writable (probe file), and with ``min_free_mb`` MiB free."""
    folder = Path(folder)
    create = f"sudo install -d -o <agent-user> -m 0750 {folder}"
    if not folder.exists():
        parent = _nearest_existing(folder.parent)
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            return "warn", (f"{what} {folder} does not exist yet; the agent creates it at start ({parent} is "
                            f"writable by this user); create it now with the right owner: {create}")
        return "fail", (f"{what} {folder} does not exist, and {parent} is not writable by this user, so the agent "
                        f"cannot create it: {create}")
    if not folder.is_dir():
        return "fail", f"{what} {folder} is not a folder"
    try:
        probe_write(folder)
    except OSError as e:
        why = e.strerror or str(e)
        fix = (f"make it writable by the agent's user ({create}; run doctor as that user: "
               "sudo -u <agent-user> edge-agent doctor ...)")
        if e.errno == errno.EROFS:
            fix = "it is on a read-only file system: put it on a writable one"
        elif e.errno == errno.ENOSPC:
            fix = "the disk is full"
        return "fail", f"cannot write in {what} {folder}: {why}; {fix}"
    usage = shutil.disk_usage(folder)
    free_mb = usage.free / 2**20
    detail = f"{folder}: a temp file was created, written, fsynced, renamed and removed; {free_mb:,.0f} MiB free"
    if min_free_mb is not None and free_mb < min_free_mb:
        return "warn", (f"{detail}, below {min_free_mb:g} MiB: new bundles, the model store and the telemetry "
                        "spool need room")
    return "pass", detail


# --------------------------------------------------------------------------------------------------
# power, thermal, cpufreq, throttling, power mode


def check_power(profile: Profile, options: DoctorOptions, board: str) -> Result:
    from edge_agent.errors import SourceError
    from edge_agent.power import open_power_source

    spec = profile.power.source
    if spec == "none":
        return "skip", ("the profile's [power] source is 'none': power is reported as null; to measure, wire a "
                        "USB meter and set serial:<meter> in a copied profile")
    try:
        src = open_power_source(spec, sysfs_root=options.sysfs_root, serial_port=profile.power.serial_port,
                                vcgencmd=options.vcgencmd, profile=board)
    except SourceError as e:
        # edge_agent.power.base.absent() words "hardware not there" as "...; looked for: <paths>"
        status = "absent" if "; looked for: " in e.message else "fail"
        return status, (f"{e.message}; the agent refuses to start with this profile unless run with --power none"
                        if status == "absent" else _error_text(e))
    try:
        if src.energy_counter:  # RAPL: read_w is the mean since the previous call
            src.read_w()
            time.sleep(0.2)
        watts = src.read_w()
        rails = src.rails()
    finally:
        src.close()
    top = sorted(rails.items(), key=lambda kv: -kv[1])[:4] if len(rails) > 1 else []
    parts = ", ".join(f"{k} {v:.2f} W" for k, v in top) + (f" (+{len(rails) - 4} more)" if len(rails) > 4 else "")
    return "pass", f"{src.name}: {watts:.2f} W now ({src.note})" + (f"; rails: {parts}" if parts else "")


def check_thermal(profile: Profile, sysfs_root: Path) -> Result:
    from edge_agent.thermal import ThermalReader, discover_zones

    root = Path(sysfs_root) / "class" / "thermal"
    wanted = profile.thermal.zones
    reader = ThermalReader(root, wanted)
    present = [label for label, _ in discover_zones(root)]
    others = f"zones here: {', '.join(present)}" if present else f"no thermal zones under {root}"
    if not reader.zones:
        if wanted:
            return "absent", (f"the profile's zone(s) {', '.join(wanted)} are not here ({others}); temp_c will be "
                              "null: copy the profile and name zones that exist")
        return "absent", f"{others} (containers and VMs often have none); temp_c will be null"
    temps = reader.read()
    unreadable = [label for label, _ in reader.zones if label not in temps]
    if not temps:
        return "fail", f"zone(s) {', '.join(unreadable)} found but their temp files cannot be read"
    limit = profile.thermal.throttle_c
    shown = ", ".join(f"{k} {v:.1f} C" for k, v in temps.items())
    detail = f"{shown} (throttle at {limit:g} C)"
    hot = [k for k, v in temps.items() if v >= limit]
    problems = []
    if reader.missing:
        problems.append(f"{', '.join(reader.missing)} not here ({others})")
    if unreadable:
        problems.append(f"{', '.join(unreadable)} unreadable")
    if hot:
        problems.append(f"{', '.join(hot)} at or above {limit:g} C now: check the cooling")
    if problems:
        return "warn", f"{detail}; " + "; ".join(problems)
    return "pass", detail


def check_cpufreq(profile: Profile, sysfs_root: Path) -> Result:
    from edge_agent.throttle import CPU_DIR, CpuFreqReader

    reader = CpuFreqReader(sysfs_root)
    base = Path(sysfs_root) / CPU_DIR
    if not reader.cores:
        return "absent", (f"no cpufreq under {base}/cpu*/cpufreq (VMs and containers have none); cpu_mhz will be "
                          "null")
    reading = reader.read()
    if reading is None:
        return "fail", f"cpufreq files under {base} exist but cannot be read"
    governor_file = base / reader.cores[0][0] / "cpufreq" / "scaling_governor"
    try:
        governor = f", governor {governor_file.read_text().strip()}"
    except OSError:
        governor = ""
    top = f" (max {reading.top_max_mhz:.0f} MHz)" if reading.top_max_mhz else ""
    n = len(reader.cores)
    detail = f"{n} core(s) at {reading.mean_mhz:.0f} MHz mean{top}{governor}"
    if n != profile.device.cores:
        return "warn", (f"{detail}; the profile says {profile.device.cores} cores: copy the profile and set "
                        "cores/threads, or run the agent with --threads")
    return "pass", detail


def _run_command(command: str, args: Sequence[str]) -> tuple[str | None, str]:
    """(stdout, problem): stdout None when the command is missing, fails or hangs; problem says why."""
    path = shutil.which(command)
    if path is None:
        return None, "absent"
    try:
        done = subprocess.run((path, *args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        return None, f"`{path} {' '.join(args)}` did not answer within {COMMAND_TIMEOUT_S:g} s"
    except OSError as e:
        return None, f"cannot run `{path} {' '.join(args)}`: {e.strerror or e}"
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
        return None, f"`{path} {' '.join(args)}` exited with {done.returncode}: {said}"
    return done.stdout, ""


def check_throttle(vcgencmd: str) -> Result:
    from edge_agent.throttle import parse_get_throttled

    out, problem = _run_command(vcgencmd, ("get_throttled",))
    if problem == "absent":
        return "absent", (f"{vcgencmd} is not installed (Raspberry Pi OS has it, package raspi-utils): throttling "
                          "then comes from thermal zones only")
    if out is None:  # the agent then reads throttling from the thermal zones only
        return "warn", (f"{problem} (a user other than root needs the 'video' group for /dev/vcio); the agent "
                        "then sees throttling through the thermal zones only")
    try:
        state = parse_get_throttled(out)
    except ValueError as e:
        return "warn", f"`{vcgencmd} get_throttled`: {e}; the agent reads it as unknown"
    text = f"throttled=0x{state.value:x}"
    if state.now:
        return "warn", f"{text}: now {', '.join(state.now)} (check the power supply and the cooling)"
    if state.occurred:
        return "warn", f"{text}: since boot {', '.join(state.occurred)} (check the power supply and the cooling)"
    return "pass", f"{text}: no under-voltage, capping or throttling since boot"


def check_power_mode(nvpmodel: str) -> Result:
    from edge_agent.throttle import parse_nvpmodel

    out, problem = _run_command(nvpmodel, ("-q",))
    if problem == "absent":
        return "absent", f"{nvpmodel} is not installed (JetPack has it): the power mode cannot be recorded"
    if out is None:  # the agent then reports no power mode; it runs all the same
        return "warn", f"{problem}; the agent then reports no power mode (check by hand: sudo nvpmodel -q)"
    try:
        mode = parse_nvpmodel(out)
    except ValueError as e:
        return "warn", f"`{nvpmodel} -q`: {e}; the agent then reports no power mode"
    ident = f" (id {mode.id})" if mode.id is not None else ""
    return "pass", (f"power mode {mode.name}{ident}; record it (and whether jetson_clocks ran) with every "
                    "measurement")


# --------------------------------------------------------------------------------------------------
# camera, broker, trusted key


def check_camera(spec: str | None) -> Result:
    if not spec:
        return "skip", "no --source given (e.g. --source camera:0, camera:/dev/video0, rtsp://..., video:FILE)"
    from edge_agent.sources import STREAM_SCHEMES, _redact, opencv_opener

    kind, _, arg = spec.partition(":")
    target: int | str
    if kind == "camera" and arg:
        target = int(arg) if arg.isdecimal() else arg
        node = Path(f"/dev/video{arg}") if isinstance(target, int) else Path(arg)
        if sys.platform.startswith("linux") and not node.exists():
            return "absent", (f"{node} does not exist: no camera there (v4l2-ctl --list-devices lists them; a Pi "
                              "CSI camera needs libcamera, see the note)")
        what = f"camera {arg}"
    elif kind.lower() in STREAM_SCHEMES and arg.startswith("//"):
        kind, target, what = "stream", spec, f"stream {_redact(spec)}"
    elif kind == "video" and arg:
        path = Path(arg.split("?", 1)[0]).expanduser()
        if not path.is_file():
            return "fail", f"video file {path} does not exist"
        target, what = str(path), f"video file {path}"
    elif kind in ("synthetic", "npy", "images", "serial"):
        return "skip", (f"--source {spec}: doctor opens cameras, streams and video files; {kind} sources are "
                        "checked when the agent opens them")
    else:
        return "fail", (f"--source {spec!r} is not camera:N, camera:/dev/videoN, rtsp://..., http(s)://... or "
                        "video:PATH")
    t0 = time.monotonic()
    cap = opencv_opener(kind)(target)  # MissingDependencyError names the vision extra
    try:
        if not cap.isOpened():
            return "fail", (f"OpenCV cannot open {what} (is it used by another process? is the agent's user in "
                            "the 'video' group?)")
        ok, frame = cap.read()
    finally:
        cap.release()
    ms = (time.monotonic() - t0) * 1000
    if not ok or frame is None or not getattr(frame, "size", 0):
        return "fail", f"{what} opened but gave no frame"
    h, w = frame.shape[:2]
    channels = frame.shape[2] if frame.ndim == 3 else 1
    return "pass", f"{what}: a {w}x{h} frame ({channels} channel(s), {frame.dtype}) in {ms:.0f} ms"


def check_broker(address: str | None, timeout_s: float) -> Result:
    if not address:
        return "skip", "no --mqtt HOST:PORT given (the agent runs offline without one)"
    from edge_agent.cli import parse_hostport

    host, port = parse_hostport(address)
    try:
        import paho.mqtt.client as mqtt
    except ImportError as e:
        from edge_agent.errors import missing_extra

        raise missing_extra("paho-mqtt", "all", "the broker check") from e
    client_id = f"edgekit-doctor-{uuid.uuid4().hex[:12]}"
    answer: dict[str, Any] = {}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.connect_timeout = timeout_s
    client.on_connect = lambda c, u, flags, rc, props: answer.setdefault("rc", rc)
    client.on_disconnect = lambda c, u, flags, rc, props: answer.setdefault("closed", rc)
    t0 = time.monotonic()
    try:
        client.connect(host, port, keepalive=max(5, int(timeout_s) + 5))
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        return "fail", (f"cannot open a TCP connection to {host}:{port}: {why} (is the broker running and "
                        "reachable from here? firewall? the right port?)")
    try:
        deadline = t0 + timeout_s
        while "rc" not in answer and "closed" not in answer and time.monotonic() < deadline:
            client.loop(timeout=0.05)
    finally:
        client.disconnect()
    ms = (time.monotonic() - t0) * 1000
    rc = answer.get("rc")
    if rc is None:
        why = "closed the connection" if "closed" in answer else f"sent no CONNACK within {timeout_s:g} s"
        return "fail", (f"{host}:{port} accepts TCP but {why} (a TLS listener? doctor speaks plain MQTT 5)")
    if rc.is_failure:
        text = str(rc)
        if text in ("Not authorized", "Bad user name or password"):
            return "warn", (f"{host}:{port} answers MQTT but refuses an anonymous client ({text}); doctor does "
                            "not check the agent's --mqtt-user / TLS settings")
        return "fail", f"{host}:{port} refused the MQTT connection: {text}"
    return "pass", f"{host}:{port}: CONNACK {rc} in {ms:.0f} ms (MQTT 5, throwaway client id {client_id})"


def _private_keys_beside(key: Path) -> list[str]:
    found = []
    for p in sorted(key.parent.iterdir()):
        try:
            if not p.is_file() or p == key or p.stat().st_size > 64 * 1024:
                continue
            if p.suffix == ".key" or b"PRIVATE KEY-----" in p.read_bytes():
                found.append(p.name)
        except OSError:
            continue
    return found


def check_pubkey(pubkey: Path | None) -> Result:
    from edge_agent.signing import fingerprint, load_public_key

    if pubkey is None:
        from edge_agent.service import DEFAULT_KEY_PATHS

        candidates = [p.expanduser() for p in DEFAULT_KEY_PATHS]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return "fail", (f"no trusted key at {', '.join(map(str, candidates))}: the agent runs no bundle "
                            f"without one; install the laptop's edgekit-signing.pub as {DEFAULT_PUBKEY} (the .pub "
                            "only)")
    else:
        path = Path(pubkey).expanduser()
    try:
        key = load_public_key(path)
    except KeyFileError as e:
        return "fail", _error_text(e)
    mode = path.stat().st_mode & 0o777
    detail = f"{path}: Ed25519 public key {fingerprint(key)}"
    problems = []
    if mode & 0o022:
        problems.append(f"it is writable by group/others (mode {mode:04o}): whoever can write it decides what "
                        f"runs; sudo chmod 0644 {path}")
    private = _private_keys_beside(path)
    if private:
        problems.append(f"private key file(s) beside it ({', '.join(private)}): the signing key never belongs on "
                        "a device; remove them")
    if problems:
        return "warn", f"{detail}; " + "; ".join(problems)
    return "pass", detail


# --------------------------------------------------------------------------------------------------
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The doctor's options (shared by ``edge-agent doctor`` and ``python -m edge_agent.doctor``)."""
    p.add_argument("--profile", required=True, metavar="NAME|PATH", help="the board's device profile")
    p.add_argument("--profiles-dir", metavar="DIR", help="extra folder of <name>.toml profiles")
    p.add_argument("--state-dir", metavar="DIR", default=str(DEFAULT_STATE_DIR),
                   help=f"the agent's state folder (default {DEFAULT_STATE_DIR})")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="check that this MQTT broker answers (default: skipped)")
    p.add_argument("--source", metavar="SPEC", help="check that this camera opens: camera:N, camera:/dev/videoN, "
                   "rtsp://..., video:FILE (default: skipped)")
    p.add_argument("--pubkey", metavar="PATH", help="the trusted public key (default: "
                   "/etc/edge-agent/trusted.pub, then ~/.config/edgekit/keys/edgekit-signing.pub, as the agent)")
    p.add_argument("--sysfs-root", metavar="DIR", default=str(SYSFS_ROOT),
                   help="the folder that plays /sys (default /sys)")
    p.add_argument("--vcgencmd", metavar="PATH", default="vcgencmd",
                   help="Raspberry Pi vcgencmd (default: on PATH)")
    p.add_argument("--nvpmodel", metavar="PATH", default="nvpmodel", help="Jetson nvpmodel (default: on PATH)")
    p.add_argument("--timeout", metavar="S", type=float, default=5.0,
                   help="seconds to wait for the broker (default 5)")
    p.add_argument("--strict", action="store_true", help="exit 1 when hardware the profile names is absent too")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def add_doctor_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``doctor`` to an argparse subparsers object (``edge-agent doctor``)."""
    p = sub.add_parser("doctor", help="check this board against its device profile",
                       description="Check this board against its device profile: runtime, delegates, power, "
                                   "thermal, camera, state folder, broker and trusted key. Each row names the "
                                   "section of the board's firmware note to read.")
    add_arguments(p)
    return p


def counts(checks: Sequence[Check]) -> dict[str, int]:
    return {s: sum(1 for c in checks if c.status == s) for s in STATUSES}


def exit_code(checks: Sequence[Check], strict: bool = False) -> int:
    """0 when no check failed (``strict``: and none is absent), else 1."""
    bad = {"fail", "absent"} if strict else {"fail"}
    return 1 if any(c.status in bad for c in checks) else 0


_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "absent": "magenta", "skip": "dim"}


def print_table(checks: Sequence[Check], *, use_rich: bool | None = None, width: int | None = None) -> None:
    """The table (check, status, detail, read): with rich when it is installed, else plain text.

    ``read`` is the note's section without the ``firmware_notes/`` folder, which the heading line names.
    """
    if width is None and not sys.stdout.isatty():
        width = 140  # logs and pipes: wide enough that the details stay readable
    rows = [(c.name, c.status, c.detail, c.note.removeprefix("firmware_notes/")) for c in checks]
    if use_rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            if use_rich:
                raise
        else:
            table = Table()
            table.add_column("check", no_wrap=True)
            table.add_column("status", no_wrap=True)
            table.add_column("detail", overflow="fold", ratio=1)
            table.add_column("read", no_wrap=True)
            for name, status, detail, read in rows:
                table.add_row(name, f"[{_STYLE[status]}]{status}[/]", detail, read)
            Console(width=width).print(table)
            return
    import textwrap

    name_w = max(len("check"), *(len(r[0]) for r in rows))
    read_w = max(len("read"), *(len(r[3]) for r in rows))
    total = width or shutil.get_terminal_size((140, 24)).columns
    detail_w = max(30, total - name_w - read_w - 6 - 6)
    print(f"{'check':<{name_w}}  {'status':<6}  {'detail':<{detail_w}}  read")
    for name, status, detail, read in rows:
        lines = textwrap.wrap(detail, detail_w) or [""]
        print(f"{name:<{name_w}}  {status:<6}  {lines[0]:<{detail_w}}  {read}")
        for more in lines[1:]:
            print(f"{'':<{name_w}}  {'':<6}  {more}")


def report(profile: Profile, checks: Sequence[Check], strict: bool = False) -> dict[str, Any]:
    """The ``--json`` document."""
    board, why = note_board(profile)
    code = exit_code(checks, strict)
    return {"schema": SCHEMA, "profile": profile.name, "profile_file": profile.source_file,
            "note": f"firmware_notes/{board}.md", "note_reason": why, "ok": code == 0, "exit_code": code,
            "counts": counts(checks), "checks": [c.to_dict() for c in checks]}


def options_from_args(args: argparse.Namespace) -> DoctorOptions:
    if not (args.timeout > 0):
        raise InputError(f"--timeout must be more than 0 s, got {args.timeout}")
    return DoctorOptions(state_dir=Path(args.state_dir), mqtt=args.mqtt, source=args.source,
                         sysfs_root=Path(args.sysfs_root), vcgencmd=args.vcgencmd, nvpmodel=args.nvpmodel,
                         pubkey=Path(args.pubkey) if args.pubkey else None, timeout_s=args.timeout)


def run_doctor(args: argparse.Namespace) -> int:
    """Run ``edge-agent doctor``; prints the table (or JSON) and returns the exit code."""
    try:
        profile = load_profile(args.profile, args.profiles_dir)
        options = options_from_args(args)
    except EdgekitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps(e.to_dict()), flush=True)
        return e.exit_code
    checks = run_checks(profile, options=options)
    doc = report(profile, checks, args.strict)
    if args.json:
        print(json.dumps(doc, indent=2), flush=True)
        return int(doc["exit_code"])
    board, why = note_board(profile)
    print(f"edge-agent doctor: profile {profile.name} ({profile.source_file}); notes: firmware_notes/{board}.md")
    if why:
        print(f"  ({why})")
    print_table(checks)
    n = doc["counts"]
    verdict = "OK" if doc["ok"] else "NOT OK"
    print(f"\n{verdict}: " + ", ".join(f"{n[s]} {s}" for s in STATUSES if n[s])
          + ("" if doc["ok"] else "; read the sections named in the last column"))
    return int(doc["exit_code"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.doctor --profile NAME ...`` (the options of ``edge-agent doctor``)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} doctor", description="Check this board against its profile.")
    add_arguments(parser)
    return run_doctor(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
