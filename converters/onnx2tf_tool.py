"""ONNX -> TFLite through onnx2tf, run as an isolated tool in its own virtual environment.

onnx2tf pins exact, old versions of everything it uses (numpy 1.26.4, tensorflow 2.19.0, protobuf 4.25.5,
onnx 1.19.1, onnxruntime 1.23.0, opencv-python 4.11): they conflict with edgekit's own numpy 2 /
tensorflow-cpu 2.21 / protobuf 6 line, so onnx2tf can never be a dependency of edgekit. It lives in a
virtual environment of its own, built on first use:

* ``ensure_env`` creates it with ``python -m venv`` under ``~/.cache/edgekit/onnx2tf-<hash>`` (the hash
  covers ``PIP_REQUIREMENT`` and ``REQUIREMENTS``, so a change of pins builds a new one), installs the
  pinned requirements with pip (wheels only, its output streamed as progress), checks it (``pip check``,
  ``import onnx2tf``), and only then writes a marker file (temp + rename). A folder without the marker is a
  half-built environment (a killed pip, a full disk) and is rebuilt. About 800 MB are downloaded and the
  environment takes about 2.6 GB (tensorflow alone 1.8 GB).
* ``onnx_to_tflite`` runs ``<env python> -m onnx2tf`` in a subprocess (own process group, timeout) on one
  model and collects the .tflite files it writes.

onnx2tf facts this module is built around (onnx2tf 1.29.24):

* it turns channel-first inputs into channel-last ones (NCHW -> NHWC for images), so the calibration
  samples are written in that layout (``-cind NAME FILE MEAN STD`` wants "the dimension order after
  conversion to TF"), with mean 0 and std 1 so the samples pass through unchanged;
* for a 4-D input with 3 channels it loads ``calibration_image_sample_data_20x128x128x3_float32.npy`` from
  its working directory, and downloads it from GitHub when absent, even when ``-cind`` is given: the file
  is written into the working directory first, and every run has HTTP(S)_PROXY pointed at a closed local
  port, so any download attempt fails loudly instead of silently reaching the network;
* it runs ``onnxsim`` as a command found on PATH: the environment's bin folder goes first on PATH, or
  onnx2tf skips the simplification with a mere warning;
* a failed quantization is a printed warning with exit code 0 ("Full INT8 Quantization tflite output
  failed."): the expected output file is checked, never assumed;
* its quantizer allows TensorFlow Select (Flex) ops, which LiteRT on a device does not have: the written
  models are opened with LiteRT in the tool environment and a Flex or custom op is a ``ConversionError``;
* with ``-cind`` and more than one sample, its ONNX dummy inference fails on the NHWC samples and it skips
  its onnxruntime shape-estimation pass (PINTO0309/onnx2tf#929): reported as a note when it happens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.errors import ConversionError, InputError, ModelError, missing_extra

ProgressFn = Callable[[str, float | None], None]
"""progress(message, fraction): what is happening now, and the estimated overall fraction done (0..1), or
None when unknown."""

TOOL = "onnx2tf"
ONNX2TF_VERSION = "1.29.24"
INSTALL_COMMAND = "edgekit tools onnx2tf --install"

# pip is pinned and installed first: pip >= 24.1 prints byte progress with --progress-bar raw (the
# tensorflow wheel alone is 645 MB), and one pinned pip resolves the same way whatever pip the system
# Python bundles.
PIP_REQUIREMENT = "pip==26.3"
_BY_ONNX2TF = f"pinned exactly by onnx2tf {ONNX2TF_VERSION}'s own metadata (Requires-Dist)"
PINS: tuple[tuple[str, str], ...] = (
    (f"onnx2tf=={ONNX2TF_VERSION}", "the converter; the newest release on the index in Nov 2026"),
    ("tensorflow==2.19.0", f"{_BY_ONNX2TF}; builds the Keras graph and writes and quantizes the .tflite; the "
                           "full 'tensorflow' distribution, because tf-keras 2.19.0 requires that name"),
    ("tf-keras==2.19.0", f"{_BY_ONNX2TF}; onnx2tf sets TF_USE_LEGACY_KERAS=1 and builds with Keras 2"),
    ("numpy==1.26.4", f"{_BY_ONNX2TF}; numpy 1, the first conflict with edgekit's numpy 2"),
    ("protobuf==4.25.5", f"{_BY_ONNX2TF}; edgekit's tensorflow-cpu 2.21 needs protobuf >= 6.31"),
    ("onnx==1.19.1", f"{_BY_ONNX2TF}; reads and checks the ONNX model"),
    ("onnxruntime==1.23.0", f"{_BY_ONNX2TF}; runs the ONNX model for onnx2tf's shape estimation"),
    ("onnxsim==0.4.36", f"{_BY_ONNX2TF}; onnx-simplifier, run as the 'onnxsim' command before conversion"),
    ("onnxoptimizer==0.4.2", _BY_ONNX2TF),
    ("onnx-graphsurgeon==0.5.8", f"{_BY_ONNX2TF}; onnx2tf's graph representation"),
    ("simple-onnx-processing-tools==1.1.32", f"{_BY_ONNX2TF}; brings sng4onnx (op names for old models) and "
                                             "sne4onnx"),
    ("opencv-python==4.11.0.86", f"{_BY_ONNX2TF}; the last OpenCV for numpy 1"),
    ("ai-edge-litert==2.1.0", f"{_BY_ONNX2TF}; edgekit also opens the written models with it in this "
                              "environment to read their inputs and ops"),
    ("h5py==3.11.0", _BY_ONNX2TF),
    ("ml-dtypes==0.5.1", _BY_ONNX2TF),
    ("flatbuffers==25.12.19", _BY_ONNX2TF),
    ("psutil==5.9.5", _BY_ONNX2TF),
    ("requests==2.32.5", f"{_BY_ONNX2TF}; onnx2tf downloads sample data with it (blocked, see above)"),
)
REQUIREMENTS: tuple[str, ...] = tuple(req for req, _ in PINS)
# wheels only: onnxsim or onnxoptimizer from source need cmake and a C++ toolchain and take many minutes
PIP_OPTIONS: tuple[str, ...] = ("--only-binary=:all:", "--no-input", "--disable-pip-version-check")
PYTHON_MIN = (3, 10, 12)  # onnx2tf 1.29.24: Requires-Python >= 3.10.12
PYTHON_MAX = (3, 12)  # tensorflow 2.19.0 has wheels for CPython 3.9 to 3.12

MODES = ("int8", "dynamic", "fp16", "none")
IO_DTYPES = ("int8", "uint8", "float32")
OUTPUT_SUFFIX = {"int8": "_full_integer_quant.tflite", "dynamic": "_dynamic_range_quant.tflite",
                 "fp16": "_float16.tflite", "none": "_float32.tflite"}
SAMPLE_FILE = "calibration_image_sample_data_20x128x128x3_float32.npy"
SAMPLE_SHAPE = (20, 128, 128, 3)
MARKER = ".edgekit-env.json"
# a closed local port (discard): requests fails at once with "connection refused" instead of downloading
BLOCKED_PROXY = "http://127.0.0.1:9"
_DOWNLOAD_SIGNS = ("PINTO0309/onnx2tf/releases/download", "wasabisys.com")
_INT8_FAILED = "Full INT8 Quantization tflite output failed"
_ONNXSIM_FAILED = "Failed to optimize the onnx file"
_SHAPE_ESTIMATION_SKIPPED = "optimization process for shape estimation is skipped"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# absl/TF C++ log lines: "W0000 00:00:1795286868.078023    5016 computation_placer.cc:177] ..."
_ABSL = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:[\d.]+\s+\d+ \S+:\d+\] ")
_OP_PROGRESS = re.compile(r"INFO:\s+(\d+) / (\d+)\s*$")
# measured on Linux x86-64, CPython 3.11 (Nov 2026): 81 distributions, 788 MB of wheels
EXPECTED_DISTRIBUTIONS = 81
EXPECTED_DOWNLOAD_BYTES = 788_000_000
_SIZE_UNITS = {"B": 1, "kB": 1_000, "KB": 1_000, "MB": 1_000_000, "GB": 1_000_000_000}


# --------------------------------------------------------------------------------------------------
# the environment: where, which, whether complete


def requirements_hash(requirements: Sequence[str] = REQUIREMENTS, pip: str = PIP_REQUIREMENT,
                      options: Sequence[str] = PIP_OPTIONS) -> str:
    """16 hex digits of sha256 over everything that decides what the environment holds."""
    text = "\n".join([pip, *requirements, *options])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def cache_root() -> Path:
    """edgekit's cache folder: $XDG_CACHE_HOME/edgekit when that is set to an absolute path, else
    ~/.cache/edgekit."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "edgekit"


def default_env_dir() -> Path:
    """``<cache_root>/onnx2tf-<requirements hash>``."""
    return cache_root() / f"{TOOL}-{requirements_hash()}"


def env_python(env_dir: Path) -> Path:
    """The Python interpreter of the virtual environment at ``env_dir``."""
    if os.name == "nt":
        return Path(env_dir) / "Scripts" / "python.exe"
    return Path(env_dir) / "bin" / "python"


def _env_bin(python: Path) -> Path:
    return Path(python).parent


def read_marker(env_dir: Path) -> dict[str, Any] | None:
    """The marker of a complete environment, or None (absent, unreadable, or not a JSON object)."""
    try:
        data = json.loads((Path(env_dir) / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def installed(env_dir: Path | None = None) -> bool:
    """True when ``env_dir`` (default: ``default_env_dir()``) holds a complete environment for the current
    pins: its marker carries the current requirement hash and its Python exists."""
    env_dir = Path(env_dir) if env_dir is not None else default_env_dir()
    marker = read_marker(env_dir)
    return (marker is not None and marker.get("requirements_hash") == requirements_hash()
            and env_python(env_dir).is_file())


def env_info(env_dir: Path | None = None) -> dict[str, Any]:
    """What ``edgekit tools onnx2tf`` can show: path, installed, and the marker's contents when complete."""
    env_dir = Path(env_dir) if env_dir is not None else default_env_dir()
    info: dict[str, Any] = {"tool": TOOL, "env_dir": str(env_dir), "installed": installed(env_dir),
                            "requirements_hash": requirements_hash(), "requirements": list(REQUIREMENTS)}
    marker = read_marker(env_dir)
    if info["installed"] and marker is not None:
        info.update({k: marker[k] for k in ("python", "created", "build_seconds", "packages") if k in marker})
    return info


def write_marker(env_dir: Path, data: dict[str, Any]) -> Path:
    """Write the marker atomically (temp file in the same folder, fsync, rename)."""
    dst = Path(env_dir) / MARKER
    partial = dst.with_name(f"{MARKER}.partial")
    try:
        with partial.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, dst)
    except OSError as e:
        partial.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {dst}: {e.strerror}",
                              hint=f"check the permissions and free space of {env_dir.parent}") from e
    return dst


# --------------------------------------------------------------------------------------------------
# subprocesses: streamed, timed out, killed as a group


@dataclass(frozen=True)
class RunResult:
    returncode: int | None  # None when the command was killed at its timeout
    tail: list[str]  # the last lines of its output (stdout and stderr merged), ANSI colours removed
    seconds: float

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def clean_line(line: str) -> str:
    """A line of tool output without ANSI colour codes and trailing whitespace."""
    return _ANSI.sub("", line).rstrip()


def _kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass  # it ended between poll() and the kill


def run_streaming(cmd: Sequence[str | Path], *, env: dict[str, str], timeout_s: float, cwd: Path | None = None,
                  on_line: Callable[[str], None] | None = None, log: Path | None = None,
                  tail_lines: int = 60) -> RunResult:
    """Run ``cmd`` (no shell) in its own process group, calling ``on_line`` for every output line.

    At ``timeout_s`` (or on KeyboardInterrupt) the whole process group is killed. The full output goes to
    ``log`` when given (appended to).
    """
    argv = [str(c) for c in cmd]
    tail: deque[str] = deque(maxlen=tail_lines)
    killed = threading.Event()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(Path(log).open("a", encoding="utf-8")) if log is not None else None
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True, encoding="utf-8",
                                    errors="replace", bufsize=1, start_new_session=os.name == "posix")
        except OSError as e:
            raise ConversionError(f"cannot start {argv[0]}: {e.strerror}",
                                  hint="check that the file exists and is executable") from e

        def on_timeout() -> None:
            killed.set()
            _kill_group(proc)

        timer = threading.Timer(timeout_s, on_timeout)
        timer.daemon = True
        timer.start()
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:
                if log_file is not None:
                    log_file.write(raw)
                line = clean_line(raw)
                tail.append(line)
                if on_line is not None:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        finally:
            timer.cancel()
    return RunResult(None if killed.is_set() else returncode, list(tail), time.perf_counter() - t0)


def tool_env(python: Path, *, block_network: bool = True) -> dict[str, str]:
    """The environment variables for a command of the tool environment.

    The environment's bin folder goes first on PATH (onnx2tf runs ``onnxsim`` as a command); PYTHONPATH and
    PYTHONHOME are dropped and user site-packages disabled, so nothing of the caller's environment leaks
    in. ``block_network`` points HTTP(S)_PROXY at a closed local port: a download attempt fails at once.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = os.pathsep.join([str(_env_bin(python)), env.get("PATH", os.defpath)])
    env["VIRTUAL_ENV"] = str(_env_bin(python).parent)
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"  # TensorFlow C++ errors only
    env["CUDA_VISIBLE_DEVICES"] = "-1"  # the conversion runs on the CPU whatever GPUs the host has
    if block_network:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            env[name] = BLOCKED_PROXY
        env["NO_PROXY"] = env["no_proxy"] = ""
    return env


def meaningful_tail(lines: Sequence[str], n: int = 15) -> list[str]:
    """The last ``n`` lines that are not blank and not TensorFlow's C++ (absl) log noise."""
    kept = [ln for ln in lines if ln.strip() and not _ABSL.match(ln)]
    return kept[-n:]


def _indent(lines: Sequence[str]) -> str:
    return "\n".join(f"    {ln}" for ln in lines)


# --------------------------------------------------------------------------------------------------
# building the environment


def _parse_size(number: str, unit: str) -> int:
    return int(float(number) * _SIZE_UNITS.get(unit, 1))


class PipProgress:
    """Turns pip's output lines into (message, overall fraction) progress events.

    Fractions: 0.05 once pip runs; up to 0.50 while collecting, by the larger of two estimates (the
    distributions seen of ``EXPECTED_DISTRIBUTIONS``, the bytes downloaded of ``EXPECTED_DOWNLOAD_BYTES``);
    0.55 while installing (about half the time: pip unpacks 2.6 GB without printing progress); 0.95 when
    pip is done. The expected figures were measured on Linux x86-64 and
    are only estimates elsewhere.
    """

    _COLLECT = re.compile(r"^(?:Collecting|Processing)\s+(\S+)")
    _DOWNLOAD = re.compile(r"^\s*Downloading\s+(\S+)\s+\(([\d.]+)\s*(\w+)\)")
    _CACHED = re.compile(r"^\s*Using cached\s+(\S+)\s+\(([\d.]+)\s*(\w+)\)")
    _RAW = re.compile(r"^Progress (\d+) of (\d+)")
    _INSTALLING = re.compile(r"^Installing collected packages: (.*)")

    def __init__(self, expected_distributions: int = EXPECTED_DISTRIBUTIONS,
                 expected_bytes: int = EXPECTED_DOWNLOAD_BYTES) -> None:
        self.expected_distributions = expected_distributions
        self.expected_bytes = expected_bytes
        self.seen = 0
        self.done_bytes = 0  # finished downloads and cached wheels
        self.current = 0  # bytes of the download in progress
        self.current_name = ""
        self.fraction = 0.05

    def _collecting(self) -> float:
        by_count = self.seen / max(1, self.expected_distributions)
        by_bytes = (self.done_bytes + self.current) / max(1, self.expected_bytes)
        self.fraction = max(self.fraction, 0.05 + 0.45 * min(1.0, max(by_count, by_bytes)))
        return self.fraction

    def feed(self, line: str) -> tuple[str, float] | None:
        """The progress event for one line of pip output, or None when the line says nothing new."""
        if m := self._RAW.match(line):
            done, total = int(m.group(1)), int(m.group(2))
            self.current = done
            if done >= total > 0:
                self.done_bytes += total
                self.current = 0
            mb = f"{done / 1e6:.0f}/{total / 1e6:.0f} MB"
            return f"downloading {self.current_name} ({mb})", self._collecting()
        if m := self._COLLECT.match(line):
            self.seen += 1
            name = Path(m.group(1)).name if m.group(0).startswith("Processing") else m.group(1)
            return f"collecting {name}", self._collecting()
        if m := self._DOWNLOAD.match(line):
            self.current_name = m.group(1)
            return f"downloading {m.group(1)} ({m.group(2)} {m.group(3)})", self._collecting()
        if m := self._CACHED.match(line):
            self.done_bytes += _parse_size(m.group(2), m.group(3))
            return f"using cached {m.group(1)}", self._collecting()
        if m := self._INSTALLING.match(line):
            count = len([p for p in m.group(1).split(",") if p.strip()])
            self.fraction = max(self.fraction, 0.55)
            return f"installing {count} packages (2.6 GB, tensorflow alone 1.8 GB)", self.fraction
        if line.startswith("Successfully installed"):
            self.fraction = max(self.fraction, 0.95)
            return "installed", self.fraction
        return None


def _check_python(python: str) -> str:
    """The version of ``python`` (x.y.z) when it can build the environment, else an InputError."""
    try:
        out = subprocess.run([python, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
                             capture_output=True, text=True, timeout=60, check=True, stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise InputError(f"Python interpreter {python} does not exist",
                         hint="give a CPython 3.10.12 to 3.12 (e.g. /usr/bin/python3.11)") from e
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        raise InputError(f"cannot run Python interpreter {python}: {e}",
                         hint="give a CPython 3.10.12 to 3.12 (e.g. /usr/bin/python3.11)") from e
    text = out.stdout.strip()
    try:
        version = tuple(int(p) for p in text.split("."))
    except ValueError:
        raise InputError(f"{python} printed {text!r} for its version",
                         hint="give a CPython 3.10.12 to 3.12 (e.g. /usr/bin/python3.11)") from None
    if not (PYTHON_MIN <= version and version[:2] <= PYTHON_MAX):
        raise InputError(
            f"{python} is Python {text}; the onnx2tf environment needs Python 3.10.12 to 3.12 (onnx2tf "
            f"{ONNX2TF_VERSION} needs >= 3.10.12, tensorflow 2.19.0 has no wheels for newer Pythons)",
            hint="install such a Python and pass it to edgekit (e.g. --python /usr/bin/python3.11)",
        )
    return text


def _is_venv_or_empty(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file() or not any(path.iterdir())


def _remove_env(env_dir: Path) -> None:
    try:
        shutil.rmtree(env_dir)
    except OSError as e:
        raise ConversionError(f"cannot remove the incomplete tool environment {env_dir}: {e.strerror}",
                              hint=f"remove {env_dir} by hand and run again") from e


@contextlib.contextmanager
def _env_lock(env_dir: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive lock (``<env_dir>.lock``) so that two edgekit processes never build one environment."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented limitation)
        yield
        return
    lock_path = env_dir.with_name(env_dir.name + ".lock")
    with lock_path.open("a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConversionError(
                        f"another process has been building the tool environment {env_dir} for "
                        f"{timeout_s:.0f} s", hint=f"wait for it, or stop it and remove {env_dir}") from None
                time.sleep(1.0)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _step_error(step: str, run: RunResult, what: str, log: Path, hint: str) -> ConversionError:
    how = (f"did not finish within {run.seconds:.0f} s and was stopped" if run.timed_out
           else f"failed with exit code {run.returncode}")
    last = meaningful_tail(run.tail, 15)
    return ConversionError(f"{what} {how} (step: {step}); its last lines:\n{_indent(last)}\n"
                           f"  full log: {log}", hint=hint)


def ensure_env(env_dir: Path | None = None, *, python: str | Path | None = None,
               progress: ProgressFn | None = None, offline: bool = False,
               timeout_s: float = 3600.0) -> Path:
    """The Python of a complete onnx2tf tool environment, built first when missing or half-built.

    ``env_dir`` defaults to ``default_env_dir()``; ``python`` (default: the running interpreter) must be
    CPython 3.10.12 to 3.12. A complete environment is reused without touching the network. ``offline``
    refuses to build (an ``InputError`` saying how to build it while online). A pip failure is a
    ``ConversionError`` with pip's last lines; the full log stays at ``<env_dir>.install.log`` and the
    half-built folder is removed.
    """
    env_dir = Path(env_dir).expanduser().absolute() if env_dir is not None else default_env_dir()
    py = env_python(env_dir)
    if installed(env_dir):
        return py
    if offline:
        state = "is incomplete" if env_dir.exists() else "does not exist"
        raise InputError(
            f"converting ONNX to TFLite needs onnx2tf, which runs in its own Python environment; that "
            f"environment ({env_dir}) {state} and cannot be built offline",
            hint=f"run `{INSTALL_COMMAND}` once while online (about 800 MB download, 2.6 GB on disk)",
        )

    def report(message: str, fraction: float | None) -> None:
        if progress is not None:
            progress(message, fraction)

    env_dir.parent.mkdir(parents=True, exist_ok=True)
    with _env_lock(env_dir, timeout_s):
        if installed(env_dir):  # another process finished it while we waited
            return py
        base = str(python) if python is not None else sys.executable
        version = _check_python(base)
        t0 = time.perf_counter()
        if env_dir.exists():
            if not env_dir.is_dir() or not _is_venv_or_empty(env_dir):
                raise InputError(f"{env_dir} exists and is not an edgekit tool environment (no pyvenv.cfg)",
                                 hint="give another env_dir, or move that folder away")
            report(f"removing the incomplete environment {env_dir}", 0.0)
            _remove_env(env_dir)
        log = env_dir.with_name(env_dir.name + ".install.log")
        log.unlink(missing_ok=True)
        env = tool_env(py, block_network=False)
        for name in ("VIRTUAL_ENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX", "PIP_ROOT"):
            env.pop(name, None)  # these would send pip's installs somewhere else than the new environment
        hint_pip = ("check the network connection and pip's index (`pip config list`); a Python without "
                    "wheels for these pins needs another --python (CPython 3.10.12 to 3.12)")
        try:
            report(f"creating a Python {version} environment for onnx2tf in {env_dir}", 0.0)
            run = run_streaming([base, "-m", "venv", env_dir], env=env, timeout_s=300, log=log)
            if run.returncode != 0:
                raise _step_error("venv", run, f"{base} -m venv", log,
                                  "install the venv module of that Python (Debian: apt install python3-venv)")
            pip = PipProgress()

            def on_pip_line(line: str) -> None:
                event = pip.feed(line)
                if event is not None:
                    report(*event)

            report(f"installing {PIP_REQUIREMENT}", 0.02)
            started = time.monotonic()
            run = run_streaming([py, "-m", "pip", "install", *PIP_OPTIONS, "--progress-bar", "off",
                                 PIP_REQUIREMENT], env=env, timeout_s=600, log=log)
            if run.returncode != 0:
                raise _step_error("pip install", run, f"pip install {PIP_REQUIREMENT}", log, hint_pip)
            report(f"installing onnx2tf {ONNX2TF_VERSION} and {len(REQUIREMENTS) - 1} pinned packages", 0.05)
            left = max(60.0, timeout_s - (time.monotonic() - started))
            run = run_streaming([py, "-m", "pip", "install", *PIP_OPTIONS, "--progress-bar", "raw",
                                 *REQUIREMENTS], env=env, timeout_s=left, on_line=on_pip_line, log=log)
            if run.returncode != 0:
                raise _step_error("pip install", run, "pip install of the onnx2tf requirements", log, hint_pip)
            report("checking the environment (pip check, import onnx2tf)", 0.96)
            check = run_streaming([py, "-m", "pip", "check"], env=env, timeout_s=120, log=log)
            if check.returncode != 0:
                raise _step_error("pip check", check, "pip check", log,
                                  "the pins conflict on this platform; report it to the edgekit issue tracker")
            smoke = run_streaming([py, "-c", "import importlib.metadata as m, onnx2tf; "
                                             "print('onnx2tf', m.version('onnx2tf'))"],
                                  env=tool_env(py), timeout_s=300, log=log)
            if smoke.returncode != 0:
                raise _step_error("import", smoke, "import onnx2tf", log,
                                  "the environment installed but onnx2tf does not import; report it to the "
                                  "edgekit issue tracker with the log")
            packages = _freeze(py, env)
        except BaseException:
            with contextlib.suppress(OSError):
                if env_dir.exists():
                    shutil.rmtree(env_dir)
            raise
        seconds = round(time.perf_counter() - t0, 1)
        write_marker(env_dir, {
            "tool": TOOL, "requirements_hash": requirements_hash(), "requirements": list(REQUIREMENTS),
            "pip": PIP_REQUIREMENT, "python": version, "base_python": base,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": seconds,
            "packages": packages,
        })
        report(f"onnx2tf environment ready ({seconds:.0f} s)", 1.0)
    return py


def _freeze(py: Path, env: dict[str, str]) -> dict[str, str]:
    """name -> version of every distribution in the environment (pip list --format json)."""
    try:
        out = subprocess.run([str(py), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                             capture_output=True, text=True, timeout=120, env=env, check=True,
                             stdin=subprocess.DEVNULL)
        rows = json.loads(out.stdout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError, ValueError) as e:
        raise ConversionError(f"cannot list the packages of the tool environment ({e})",
                              hint="remove the environment folder and build it again") from e
    return {str(r["name"]).lower(): str(r["version"]) for r in rows}


# --------------------------------------------------------------------------------------------------
# the conversion: pure parts


def channels_last_perm(rank: int) -> tuple[int, ...]:
    """The axes permutation onnx2tf applies to a channel-first input of ``rank`` (identity below rank 3)."""
    if rank < 3:
        return tuple(range(rank))
    return (0, *range(2, rank), 1)


def expected_tflite_shape(onnx_shape: Sequence[int]) -> tuple[int, ...]:
    """The TFLite input shape onnx2tf writes for an ONNX input shape: batch 1, channels last (-1 = any)."""
    fixed = tuple(1 if i == 0 else int(d) for i, d in enumerate(onnx_shape))
    return tuple(fixed[p] for p in channels_last_perm(len(fixed)))


def shape_matches(actual: Sequence[int], expected: Sequence[int]) -> bool:
    """Same rank, and equal wherever ``expected`` is not -1."""
    return len(actual) == len(expected) and all(e == -1 or a == e for a, e in zip(actual, expected, strict=True))


def layout_name(rank: int) -> str:
    """The layout of an input of ``rank`` after onnx2tf: NWC, NHWC, NDHWC (rank < 3: 'NC')."""
    return {3: "NWC", 4: "NHWC", 5: "NDHWC"}.get(rank, "NC")


def calibration_array(calib: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """Calibration samples (N, *input_shape) float32, each with its batch axis of 1 -> onnx2tf's ``-cind``
    array: (N, *channels-last sample shape), float32, C-contiguous."""
    calib = np.asarray(calib)
    rank = len(input_shape)
    if calib.ndim != rank + 1 or calib.shape[1] != 1:
        raise InputError(f"calibration samples have shape {calib.shape}; expected (N, 1, ...) for an input of "
                         f"rank {rank} (each sample keeps its batch axis of 1)",
                         hint="pass the arrays of converters.calibration.Samples")
    if len(calib) == 0:
        raise InputError("full-integer quantization needs at least one calibration sample")
    fixed = [int(d) for d in input_shape[1:]]
    if any(d > 0 and d != s for d, s in zip(fixed, calib.shape[2:], strict=True)):
        raise InputError(f"calibration samples have shape {calib.shape[1:]} and the model input "
                         f"{tuple(input_shape)}", hint="give samples shaped like the model input")
    samples = calib[:, 0].astype(np.float32, copy=False)
    return np.ascontiguousarray(np.transpose(samples, channels_last_perm(samples.ndim)))


def samples_to_tflite_layout(arrays: np.ndarray) -> np.ndarray:
    """Samples (N, 1, *channel-first input shape) -> (N, 1, *channel-last shape): the layout of the TFLite
    model onnx2tf writes, for validation and golden files (rank < 3 inputs are returned as they are)."""
    arrays = np.asarray(arrays)
    perm = (0, *(p + 1 for p in channels_last_perm(arrays.ndim - 1)))
    return np.ascontiguousarray(np.transpose(arrays, perm))


def sample_file_array(samples_nhwc: np.ndarray | None = None) -> np.ndarray:
    """The array for onnx2tf's ``calibration_image_sample_data_20x128x128x3_float32.npy``.

    onnx2tf only uses it for its ONNX dummy inference when no ``-cind`` is given (modes other than int8),
    resized to the input size. With 4-D 3-channel samples it is built from them (nearest-neighbour resize to
    128x128, repeated up to 20), so that dummy inference sees real data; otherwise it is mid-grey (0.5).
    """
    if samples_nhwc is None or samples_nhwc.ndim != 4 or samples_nhwc.shape[-1] != 3 or len(samples_nhwc) == 0:
        return np.full(SAMPLE_SHAPE, 0.5, dtype=np.float32)
    n, h, w, _ = samples_nhwc.shape
    rows = (np.arange(SAMPLE_SHAPE[1]) * h) // SAMPLE_SHAPE[1]
    cols = (np.arange(SAMPLE_SHAPE[2]) * w) // SAMPLE_SHAPE[2]
    picked = samples_nhwc[np.arange(SAMPLE_SHAPE[0]) % n]
    return np.ascontiguousarray(picked[:, rows][:, :, cols], dtype=np.float32)


def write_sample_file(folder: Path, samples_nhwc: np.ndarray | None = None) -> Path:
    """Write ``calibration_image_sample_data_20x128x128x3_float32.npy`` into ``folder`` (onnx2tf's working
    directory), so that onnx2tf never downloads it."""
    path = Path(folder) / SAMPLE_FILE
    np.save(path, sample_file_array(samples_nhwc))
    return path


def build_command(python: Path, model: Path, out: Path, *, mode: str, io_dtype: str, per_channel: bool,
                  input_name: str | None, calib_file: Path | None) -> list[str]:
    """The onnx2tf command line (an argv list, no shell)."""
    if mode not in MODES:
        raise InputError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}")
    if io_dtype not in IO_DTYPES:
        raise InputError(f"io dtype {io_dtype!r} is not one of {', '.join(IO_DTYPES)}")
    cmd = [str(python), "-m", "onnx2tf", "-i", str(model), "-o", str(out), "-b", "1"]
    if mode == "int8":
        if input_name is None or calib_file is None:
            raise InputError("mode int8 needs the input name and a calibration file")
        cmd += ["-oiqt", "-qt", "per-channel" if per_channel else "per-tensor",
                # mean 0, std 1: (x - 0) / 1 leaves our (already preprocessed) samples unchanged
                "-cind", input_name, str(calib_file), "[0.0]", "[1.0]",
                "-iqd", io_dtype, "-oqd", io_dtype]
    elif mode == "dynamic":
        cmd += ["-odrqt"]
    return cmd


def output_paths(folder: Path, stem: str, mode: str) -> dict[str, Path]:
    """{"float32": ..., "model": ...}: where onnx2tf writes the float32 reference and the ``mode`` model."""
    folder = Path(folder)
    return {"float32": folder / f"{stem}{OUTPUT_SUFFIX['none']}", "model": folder / f"{stem}{OUTPUT_SUFFIX[mode]}"}


def download_attempted(lines: Sequence[str]) -> bool:
    """True when onnx2tf's output shows it tried to download its sample data."""
    return any(sign in line for line in lines for sign in _DOWNLOAD_SIGNS)


def _failure_block(lines: Sequence[str], marker: str, n: int = 12) -> list[str]:
    """The lines before ``marker`` (onnx2tf prints the traceback, then the warning)."""
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            return meaningful_tail(lines[:i + 1], n)
    return []


def log_notes(lines: Sequence[str]) -> list[str]:
    """Plain-English notes for the report from onnx2tf's output."""
    notes: list[str] = []
    text = "\n".join(lines)
    if _ONNXSIM_FAILED in text:
        notes.append("onnx2tf could not simplify the model with onnx-simplifier and converted it unsimplified")
    if _SHAPE_ESTIMATION_SKIPPED in text:
        notes.append("onnx2tf skipped its onnxruntime shape-estimation pass (its ONNX dummy inference is fed "
                     "the channel-last calibration samples: upstream PINTO0309/onnx2tf#929)")
    return notes


# --------------------------------------------------------------------------------------------------
# the conversion


def _onnx_input(model: Path) -> tuple[str, tuple[int, ...]]:
    """(name, shape) of the single graph input of an ONNX model; dynamic dims are -1."""
    try:
        import onnx
    except ImportError as e:
        raise missing_extra("onnx", "host", "converting ONNX models") from e
    try:
        m = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError/ValueError/OSError for non-models
        raise ModelError(f"{model} is not an ONNX model onnx {onnx.__version__} can read ({e})",
                         hint="re-export the model") from e
    initializers = {t.name for t in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InputError(f"{model} has {len(inputs)} inputs; onnx2tf conversion in edgekit takes one",
                         hint="export a model with a single input tensor")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)
    return inputs[0].name, shape


def tf_input_name(onnx_name: str) -> str:
    """The input name onnx2tf uses for ``-cind`` with ``-oiqt`` (':' -> '__', a leading '/' -> 'wa/')."""
    name = onnx_name.replace(":", "__")
    return re.sub(r"^/", "wa/", name)


_INSPECT = r"""
import importlib.metadata as md, json, sys
from ai_edge_litert.interpreter import Interpreter, OpResolverType
def det(d):
    scale, zp = d.get("quantization", (0.0, 0))
    return {"name": d["name"], "shape": [int(x) for x in d["shape"]], "dtype": d["dtype"].__name__,
            "scale": float(scale), "zero_point": int(zp)}
out = {"tools": {}, "models": {}}
for dist in ("onnx2tf", "tensorflow", "tf-keras", "onnx", "onnxruntime", "onnxsim", "ai-edge-litert", "numpy"):
    out["tools"][dist] = md.version(dist)
for key, path in json.loads(sys.argv[1]).items():
    try:
        it = Interpreter(model_path=path,
                         experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        it.allocate_tensors()
        ops = sorted({op["op_name"] for op in it._get_ops_details()})
        out["models"][key] = {"inputs": [det(d) for d in it.get_input_details()],
                              "outputs": [det(d) for d in it.get_output_details()], "ops": ops}
    except Exception as e:
        text = str(e).strip().splitlines()
        out["models"][key] = {"error": type(e).__name__ + (": " + text[0] if text else "")}
print("EDGEKIT-INSPECT " + json.dumps(out))
"""


def _inspect(python: Path, models: dict[str, Path], timeout_s: float = 300) -> dict[str, Any]:
    """Open the written models with LiteRT in the tool environment: I/O details, op names, tool versions."""
    lines: list[str] = []
    run = run_streaming([python, "-c", _INSPECT, json.dumps({k: str(v) for k, v in models.items()})],
                        env=tool_env(python), timeout_s=timeout_s, on_line=lines.append)
    found = [ln for ln in lines if ln.startswith("EDGEKIT-INSPECT ")]
    if run.returncode != 0 or not found:
        raise ConversionError(f"reading the models onnx2tf wrote failed (step: inspect):\n"
                              f"{_indent(meaningful_tail(run.tail))}",
                              hint="report the model to the edgekit issue tracker")
    return json.loads(found[-1][len("EDGEKIT-INSPECT "):])


def flex_ops(ops: Sequence[str]) -> list[str]:
    """Ops a device's LiteRT cannot run: TensorFlow Select (Flex...) and custom ops."""
    return [op for op in ops if op.startswith("Flex") or op == "CUSTOM" or op == "DELEGATE"]


@dataclass(frozen=True)
class Onnx2TFResult:
    """What ``onnx_to_tflite`` produced."""

    model: Path  # the .tflite for the asked mode (int8: full-integer)
    float32: Path  # the float32 .tflite (validation reference)
    mode: str
    io_dtype: str
    input_name: str  # the ONNX input name
    onnx_input_shape: tuple[int, ...]
    input_layout: str  # the TFLite input's layout: NHWC for images (onnx2tf turns NCHW into NHWC)
    inputs: list[dict[str, Any]]  # LiteRT details of ``model``'s inputs (name, shape, dtype, scale, zero point)
    outputs: list[dict[str, Any]]
    ops: list[str]  # op names of ``model``
    tools: dict[str, str]  # versions in the tool environment (onnx2tf, tensorflow, ...)
    command: list[str]
    seconds: float
    log: Path
    notes: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return self.tools.get("onnx2tf", "unknown")

    def to_dict(self) -> dict[str, Any]:
        return {"model": str(self.model), "float32": str(self.float32), "mode": self.mode,
                "io_dtype": self.io_dtype, "input_name": self.input_name,
                "onnx_input_shape": list(self.onnx_input_shape), "input_layout": self.input_layout,
                "inputs": self.inputs, "outputs": self.outputs, "ops": self.ops, "tools": self.tools,
                "command": self.command, "seconds": self.seconds, "log": str(self.log), "notes": self.notes}


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as e:
        raise ConversionError(f"cannot move {src} to {dst}: {e.strerror}", hint="check the output folder") from e


def onnx_to_tflite(model: Path, out_dir: Path, *, calib: np.ndarray | None, io_dtype: str = "int8",
                   env_python: Path, mode: str = "int8", per_channel: bool = True, timeout_s: float = 900.0,
                   progress: ProgressFn | None = None) -> Onnx2TFResult:
    """Convert the ONNX ``model`` with onnx2tf (in the tool environment of ``env_python``) into ``out_dir``.

    ``calib`` is (N, *input_shape) float32 with the ONNX (channel-first) layout, each sample with its
    batch axis of 1 (``converters.calibration.Samples.arrays``); it is required for mode int8 and written
    channel-last for onnx2tf. ``io_dtype`` (int8, uint8 or float32) applies to mode int8. The batch is
    fixed to 1. ``out_dir`` receives ``<stem>_float32.tflite``, the mode's model (``<stem>_full_integer_
    quant.tflite`` for int8) and ``onnx2tf.log``; nothing else of onnx2tf's output is kept. onnx2tf runs
    without network (its proxy points at a closed port).
    """
    model, out_dir, env_python = Path(model), Path(out_dir), Path(env_python)
    if not model.is_file():
        raise ModelError(f"model file {model} does not exist", hint="check the path to the .onnx file")
    if not env_python.is_file():
        raise InputError(f"the onnx2tf environment's Python {env_python} does not exist",
                         hint=f"build the environment with `{INSTALL_COMMAND}`")
    if mode not in MODES:
        raise InputError(f"quantization mode {mode!r} is not one of {', '.join(MODES)}")
    if io_dtype not in IO_DTYPES:
        raise InputError(f"io dtype {io_dtype!r} is not one of {', '.join(IO_DTYPES)}")
    name, shape = _onnx_input(model)
    if mode == "int8" and calib is None:
        raise InputError("full-integer quantization needs calibration samples")
    samples = calibration_array(calib, shape) if calib is not None else None

    def report(message: str, fraction: float | None) -> None:
        if progress is not None:
            progress(message, fraction)

    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "onnx2tf.log"
    log.unlink(missing_ok=True)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix=".onnx2tf-", dir=out_dir) as tmp:
        work = Path(tmp)
        calib_file = None
        if mode == "int8":
            assert samples is not None
            calib_file = work / "calibration.npy"
            np.save(calib_file, samples)
        write_sample_file(work, samples)
        raw_out = work / "out"
        cmd = build_command(env_python, model.absolute(), raw_out, mode=mode, io_dtype=io_dtype,
                            per_channel=per_channel, input_name=tf_input_name(name), calib_file=calib_file)

        fraction = [0.0]

        def on_line(line: str) -> None:
            if m := _OP_PROGRESS.search(line):
                done, total = int(m.group(1)), int(m.group(2))
                fraction[0] = max(fraction[0], 0.05 + 0.55 * done / max(1, total))
                report(f"onnx2tf: converting op {done} of {total}", fraction[0])
            elif "tflite output complete" in line or "output started" in line:
                fraction[0] = min(0.88, max(fraction[0], 0.6) + 0.035)
                report(f"onnx2tf: {line.strip(' =')}", fraction[0])

        report(f"onnx2tf: converting {model.name}", 0.0)
        run = run_streaming(cmd, env=tool_env(env_python), timeout_s=timeout_s, cwd=work, on_line=on_line,
                            log=log, tail_lines=400)
        if download_attempted(run.tail):
            raise ConversionError(
                f"onnx2tf tried to download its sample calibration data although {SAMPLE_FILE} was in its "
                f"working directory (step: onnx2tf); full log: {log}",
                hint="this onnx2tf version looks for the file elsewhere; report it to the edgekit issue tracker")
        if run.returncode != 0:
            raise _step_error("onnx2tf", run, f"onnx2tf {ONNX2TF_VERSION} on {model.name}", log,
                              "onnx2tf cannot convert this model as it is; check the ops named above, try "
                              "another --mode, or convert the model's Keras/SavedModel source instead")
        paths = output_paths(raw_out, model.stem, mode)
        missing = [p for p in paths.values() if not p.is_file()]
        if missing:
            block = _failure_block(run.tail, _INT8_FAILED) if mode == "int8" else []
            block = block or meaningful_tail(run.tail, 12)
            raise ConversionError(
                f"onnx2tf finished but did not write {', '.join(p.name for p in missing)} (step: onnx2tf); "
                f"its last lines:\n{_indent(block)}\n  full log: {log}",
                hint="full-integer quantization failed inside TensorFlow's converter; try --mode dynamic or "
                     "fp16, or convert the model's Keras/SavedModel source instead")
        notes.extend(log_notes(run.tail))
        report("reading the written models with LiteRT", 0.9)
        info = _inspect(env_python, paths)
        for key, written in info["models"].items():
            if "error" in written:
                raise ConversionError(f"LiteRT cannot open the {key} model onnx2tf wrote: {written['error']} "
                                      "(step: inspect)",
                                      hint="the model probably needs TensorFlow Select (Flex) ops, which LiteRT "
                                           "on a device does not have; simplify the ONNX model's unusual ops")
            bad = flex_ops(written["ops"])
            if bad:
                raise ConversionError(f"the {key} model onnx2tf wrote uses ops LiteRT on a device cannot run: "
                                      f"{', '.join(bad)} (step: inspect)",
                                      hint="replace the ONNX ops that became TensorFlow Select (Flex) ops")
        details = info["models"]["model"]
        tfl_shape = tuple(details["inputs"][0]["shape"]) if details["inputs"] else ()
        expected = expected_tflite_shape(shape)
        if not shape_matches(tfl_shape, expected):
            raise ConversionError(
                f"onnx2tf wrote a model with input shape {list(tfl_shape)} for the ONNX input {name!r} "
                f"{list(shape)}; edgekit expected {list(expected)}, the layout it wrote the calibration samples "
                f"in (step: inspect)", hint="report the model to the edgekit issue tracker")
        layout = layout_name(len(shape))
        io_seen = {d["dtype"] for d in (*details["inputs"], *details["outputs"])}
        if mode == "int8" and io_seen != {io_dtype}:
            raise ConversionError(f"onnx2tf wrote a full-integer model with {', '.join(sorted(io_seen))} inputs "
                                  f"and outputs; -iqd/-oqd asked for {io_dtype} (step: inspect)",
                                  hint="report the model to the edgekit issue tracker")
        if len(shape) >= 3:
            notes.append(f"onnx2tf turned the input {name!r} from {list(shape)} (channel-first) into "
                         f"{list(tfl_shape)} ({layout}); the bundle's preprocessing must give {layout} tensors")
        if mode == "int8":
            notes.append(f"onnx2tf {info['tools'].get('onnx2tf', ONNX2TF_VERSION)} quantized the model to full "
                         f"integer ({'per-channel' if per_channel else 'per-tensor'} weights, {io_dtype} inputs "
                         f"and outputs) with TensorFlow {info['tools'].get('tensorflow', '?')}, calibrated on "
                         f"{len(samples) if samples is not None else 0} samples")
        if shape and shape[0] != 1:
            notes.append(f"the batch axis of input {name!r} ({'dynamic' if shape[0] == -1 else shape[0]}) was "
                         "fixed to 1 (onnx2tf -b 1)")
        final = {"float32": out_dir / paths["float32"].name, "model": out_dir / paths["model"].name}
        _move(paths["float32"], final["float32"])
        if mode != "none":
            _move(paths["model"], final["model"])
    report("onnx2tf: done", 1.0)
    return Onnx2TFResult(
        model=final["model"], float32=final["float32"], mode=mode,
        io_dtype=io_dtype if mode == "int8" else "float32",
        input_name=name, onnx_input_shape=shape, input_layout=layout, inputs=details["inputs"],
        outputs=details["outputs"], ops=details["ops"], tools=info["tools"], command=cmd,
        seconds=round(run.seconds, 2), log=log, notes=notes)
