"""An aarch64 Python for the edge agent on an x86-64 host: Debian bookworm arm64 under qemu user emulation.

    tools/arm64-env build [--force-agent] [--mirror URL]   build what is missing (minutes the first time)
    tools/arm64-env python [--base]                         print the emulated venv's python (or bare wrapper)
    tools/arm64-env status [--json]                         what is cached, where, how big, what is stale
    tools/arm64-env install-agent                           reinstall the agent from this checkout
    tools/arm64-env run ARGS...                             run the emulated venv's python with ARGS (e.g. -c CODE)
    tools/arm64-env clean [--stale]                         remove the cache (or only layers no longer current)

The recipe is the one measured in ../shared/ARM64.md (qemu 7.2, no binfmt_misc):

1. ``debootstrap --foreign --arch=arm64 --variant=minbase`` downloads bookworm with python3, python3-venv and
   libstdc++6 from the Debian mirror apt uses; every .deb it lists is unpacked with ``dpkg-deb`` (the second
   stage, which would need an arm64 CPU or binfmt, is never run).
2. ``rootfs/proc`` (a symlink to the host's /proc after debootstrap) becomes a real folder holding a fake
   ``cpuinfo`` of two Cortex-A72 cores: qemu 7.2 would show the host's x86 cpuinfo, and both LiteRT and
   onnxruntime segfault on it. ``rootfs/tmp`` is removed so that ``/tmp`` is the host's (qemu resolves an
   absolute path inside the root filesystem first when it exists there).
3. ``bin/python3`` is a shell wrapper (so subprocess, venv and pip work, and ``sys.executable`` is the
   wrapper) that runs ``rootfs/usr/bin/python3.11`` under ``qemu-aarch64-static`` with ``QEMU_CPU`` pinned
   to ``cortex-a72``: the default ``max`` CPU advertises SME, and XNNPACK then silently returns wrong int8
   results and onnxruntime runs hundreds of times slower.
4. The host downloads the aarch64 wheels of the agent's dependencies (``pip download --only-binary=:all:
   --platform manylinux_2_NN_aarch64 … --python-version 3.11 --abi cp311``) into a wheelhouse, builds the
   agent's own wheel from this checkout (``pip wheel --no-deps``; the checkout is copied first, so the build
   writes nothing into it), and the emulated pip installs ``edgekit-….whl[tflite,onnx,vision]`` -- the
   install command of firmware_notes/ -- with ``--no-index --find-links WHEELHOUSE --only-binary=:all:``.

Cache: ``~/.cache/edgekit/arm64/`` (``$EDGEKIT_ARM64_CACHE`` overrides), one folder per layer named by a hash
of what it holds: ``base-<h>`` (root filesystem + wrapper; recipe, suite, packages, cpuinfo),
``wheels-<h>`` (requirements of pyproject.toml's base + tflite/onnx/vision extras, platforms, Python),
``buildreq-<h>`` (the build backend for the agent's wheel), ``venv-<h>`` (base + wheels). A layer is
complete only when its ``.complete`` marker exists (written last); an incomplete one (a killed build, a
full disk) is deleted and rebuilt. The agent in the venv is reinstalled whenever the hash of its sources
(``.agent-stamp``) differs from the checkout's. Builds hold ``.lock`` (flock), so concurrent runs wait.
About 0.7 GB in all. Exit codes: 0 ok, 1 a step failed, 2 bad usage, 3 a required host tool is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent  # the checkout
RECIPE = 1  # bump when the way a layer is built changes (invalidates every cached layer)
SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "libstdc++6")
PYTHON_VERSION = "3.11"
QEMU_CPU = "cortex-a72"
QEMU = "qemu-aarch64-static"
EXTRAS = ("tflite", "onnx", "vision")  # `pip install "edgekit[tflite,onnx,vision]"`, as firmware_notes/ say
# glibc 2.36 (bookworm, = Raspberry Pi OS bookworm): every manylinux tag up to 2_36 installs. pip does not
# widen a --platform to older glibc tags by itself, so they are all listed (LiteRT's wheels are 2_27).
PLATFORMS = ("manylinux2014_aarch64", *(f"manylinux_2_{n}_aarch64" for n in range(17, 37)))
ABIS = ("cp311", "abi3", "none")
AGENT_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "edge_agent", "converters", "device_profiles")
HOST_ONLY = ("tensorflow", "tensorflow-cpu", "tf-keras", "keras", "onnx")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# Two Raspberry Pi 4 cores (Cortex-A72 r0p3), as the kernel prints them; matches QEMU_CPU.
_CORE = ("processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
         "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
         "CPU revision\t: 3\n\n")
CPUINFO = "".join(_CORE.format(n=n) for n in range(2)) + (
    "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4 (qemu user emulation)\n")
COMPLETE = ".complete"
AGENT_STAMP = ".agent-stamp"

_T0 = time.monotonic()


class ToolError(Exception):
    """A step failed: ``str(e)`` says what and what to do; ``exit_code`` 1 (failure) or 3 (missing tool)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def log(msg: str) -> None:
    """Progress on stderr, with the seconds since the tool started (a first build takes minutes)."""
    print(f"[arm64-env {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# keys and paths


def cache_root() -> Path:
    return Path(os.environ.get("EDGEKIT_ARM64_CACHE") or Path.home() / ".cache" / "edgekit" / "arm64")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def requirements() -> list[str]:
    """The agent's requirements for ``edgekit[tflite,onnx,vision]``: the base list plus those extras."""
    project = _pyproject()["project"]
    extras = project.get("optional-dependencies", {})
    missing = [e for e in EXTRAS if e not in extras]
    if missing:
        raise ToolError(f"pyproject.toml has no extra {', '.join(missing)} (needed: {', '.join(EXTRAS)})")
    reqs = list(project.get("dependencies", []))
    for e in EXTRAS:
        reqs += extras[e]
    return sorted(dict.fromkeys(reqs))


def build_requirements() -> list[str]:
    return sorted(_pyproject().get("build-system", {}).get("requires", ["setuptools"]))


def base_key() -> str:
    return _hash({"recipe": RECIPE, "suite": SUITE, "arch": "arm64", "variant": "minbase",
                  "packages": DEBIAN_PACKAGES, "cpuinfo": CPUINFO})


def wheels_key() -> str:
    return _hash({"recipe": RECIPE, "requirements": requirements(), "python": PYTHON_VERSION,
                  "platforms": PLATFORMS, "abis": ABIS})


def buildreq_key() -> str:
    return _hash({"recipe": RECIPE, "requires": build_requirements()})


def venv_key() -> str:
    return _hash({"recipe": RECIPE, "base": base_key(), "wheels": wheels_key(), "extras": EXTRAS})


def _agent_files() -> Iterator[Path]:
    for name in AGENT_SOURCES:
        p = ROOT / name
        if p.is_file():
            yield p
        elif p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and "__pycache__" not in f.parts
                              and f.suffix not in (".pyc", ".pyo"))


def agent_hash() -> str:
    """A hash of everything that goes into the agent's wheel (paths and contents)."""
    h = hashlib.sha256()
    for f in _agent_files():
        h.update(str(f.relative_to(ROOT)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class Layout:
    """Where every layer of the current keys lives."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or cache_root()
        self.base = self.root / f"base-{base_key()}"
        self.rootfs = self.base / "rootfs"
        self.wrapper = self.base / "bin" / "python3"
        self.wheels = self.root / f"wheels-{wheels_key()}"
        self.buildreq = self.root / f"buildreq-{buildreq_key()}"
        self.venv = self.root / f"venv-{venv_key()}"
        self.python = self.venv / "bin" / "python"

    def layers(self) -> dict[str, Path]:
        return {"base": self.base, "wheels": self.wheels, "buildreq": self.buildreq, "venv": self.venv}


def complete(d: Path) -> bool:
    return (d / COMPLETE).is_file()


def _mark_complete(d: Path, info: dict[str, Any]) -> None:
    tmp = d / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps({**info, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1) + "\n")
    tmp.rename(d / COMPLETE)


def _remove(d: Path) -> None:
    if d.is_symlink() or d.is_file():
        d.unlink()
    elif d.exists():
        shutil.rmtree(d)


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another arm64-env build holding {root / '.lock'}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# running steps


def run_step(cmd: Sequence[str | os.PathLike[str]], what: str, *, cwd: Path | None = None,
             env: dict[str, str] | None = None, echo: bool = True, timeout: float = 3600) -> str:
    """Run ``cmd``, streaming its output as progress (indented), and return it; ToolError when it fails."""
    log(f"{what}: {' '.join(map(str, cmd))}" if len(cmd) < 12 else f"{what}: {cmd[0]} {cmd[1]} ...")
    tail: deque[str] = deque(maxlen=40)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    with subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=cwd, env=env, errors="replace") as p:
        assert p.stdout is not None
        for line in p.stdout:
            line = line.rstrip()
            lines.append(line)
            tail.append(line)
            if echo and line:
                print(f"    {line}", file=sys.stderr, flush=True)
            if time.monotonic() > deadline:
                p.kill()
                raise ToolError(f"{what} took more than {timeout:.0f} s and was stopped")
        rc = p.wait()
    if rc != 0:
        shown = "\n".join(f"    {x}" for x in tail)
        raise ToolError(f"{what} failed (exit {rc}):\n{shown}")
    return "\n".join(lines)


def which(tool: str) -> str | None:
    """``tool`` on PATH or in /usr/sbin and /sbin (not on a normal user's PATH, where debootstrap lives)."""
    return shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")


def missing_tools() -> list[str]:
    """Host programs the build needs that are not installed, each with the Debian package that has it."""
    need = {QEMU: "qemu-user-static", "debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
    return [f"{tool} (Debian package {pkg})" for tool, pkg in need.items() if which(tool) is None]


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        pkgs = " ".join(re.findall(r"package (\S+)\)", " ".join(missing)))
        raise ToolError(f"missing host tools: {', '.join(missing)}.\n"
                        f"  install them with: sudo apt-get install -y {pkgs}\n"
                        "  (or run bash scripts/setup.sh, which installs them when missing)", exit_code=3)


def debian_mirror() -> str:
    """The Debian mirror apt already uses (deb822 .sources or sources.list), else deb.debian.org."""
    if os.environ.get("EDGEKIT_ARM64_MIRROR"):
        return os.environ["EDGEKIT_ARM64_MIRROR"]
    apt = Path("/etc/apt")
    files = [*sorted(apt.glob("sources.list.d/*.sources")), apt / "sources.list",
             *sorted(apt.glob("sources.list.d/*.list"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                uris = re.search(r"^URIs:\s*(.+)$", stanza, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", stanza, re.M)
                if uris and suites and SUITE in suites.group(1).split():
                    for uri in uris.group(1).split():
                        if uri.rstrip("/").endswith("/debian"):
                            return uri.rstrip("/")
        else:
            for m in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s", text, re.M):
                if m.group(2) == SUITE and m.group(1).rstrip("/").endswith("/debian"):
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


# --------------------------------------------------------------------------------------------------
# layer 1: root filesystem + wrapper


def _unpack_deb(deb: Path, rootfs: Path) -> None:
    dpkg = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    tar = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(rootfs)], stdin=dpkg.stdout,
                         capture_output=True)
    assert dpkg.stdout is not None and dpkg.stderr is not None
    dpkg.stdout.close()
    err = dpkg.stderr.read().decode(errors="replace")
    dpkg.stderr.close()
    if dpkg.wait() != 0 or tar.returncode != 0:
        tar_err = tar.stderr.decode(errors="replace").strip()
        raise ToolError(f"unpacking {deb.name} failed: {err.strip()} {tar_err}")


def build_base(lay: Layout, mirror: str) -> None:
    partial = lay.base.with_name(lay.base.name + ".partial")
    _remove(partial)
    rootfs = partial / "rootfs"
    rootfs.mkdir(parents=True)
    cmd = [str(which("debootstrap")), "--arch=arm64", "--foreign", "--variant=minbase",
           f"--include={','.join(DEBIAN_PACKAGES)}", SUITE, str(rootfs), mirror]
    if os.geteuid() != 0:
        if shutil.which("fakeroot") is None:
            raise ToolError("debootstrap needs root: run this as root (sudo), or install fakeroot "
                            "(sudo apt-get install -y fakeroot) to build as a normal user", exit_code=3)
        cmd.insert(0, "fakeroot")
    t0 = time.monotonic()
    run_step(cmd, "debootstrap (first stage: download arm64 bookworm)", timeout=1800)
    debpaths = rootfs / "debootstrap" / "debpaths"
    if not debpaths.is_file():
        raise ToolError(f"debootstrap wrote no {debpaths}: cannot tell which packages to unpack")
    debs = [rootfs / line.split()[1].lstrip("/") for line in debpaths.read_text().splitlines() if line.strip()]
    log(f"unpacking {len(debs)} packages with dpkg-deb (debootstrap's second stage is not run)")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for i, _ in enumerate(pool.map(lambda d: _unpack_deb(d, rootfs), debs), 1):
            if i % 20 == 0 or i == len(debs):
                log(f"  unpacked {i}/{len(debs)}")
    for deb in debs:  # ~40 MB nobody needs again
        deb.unlink(missing_ok=True)
    proc = rootfs / "proc"
    if proc.is_symlink() or proc.is_file():
        proc.unlink()  # debootstrap's link to the host's /proc
    proc.mkdir(exist_ok=True)
    (proc / "cpuinfo").write_text(CPUINFO)
    _remove(rootfs / "tmp")  # /tmp is then the host's (qemu tries rootfs/<path> first when it exists)
    python = rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"
    if not python.is_file():
        raise ToolError(f"{python} is missing after unpacking: the debootstrap package list lacked python3")
    partial.rename(lay.base)
    write_wrapper(lay)
    log(f"root filesystem ready in {time.monotonic() - t0:.0f} s ({_du(lay.base) / 2**20:.0f} MiB)")
    version = run_step([lay.wrapper, "-c", "import platform, sys; "
                        "print(platform.machine(), sys.version.split()[0], platform.libc_ver()[1])"],
                       "check the emulated python")
    if not version.startswith("aarch64 "):
        raise ToolError(f"the emulated python reports {version!r}, not aarch64")
    _mark_complete(lay.base, {"mirror": mirror, "packages": DEBIAN_PACKAGES, "python": version,
                              "qemu_cpu": QEMU_CPU})


def write_wrapper(lay: Layout) -> None:
    """(Re)write ``bin/python3``: cheap, so it always names the qemu found now."""
    qemu = which(QEMU)
    if qemu is None:
        raise ToolError(f"{QEMU} not found", exit_code=3)
    lay.wrapper.parent.mkdir(parents=True, exist_ok=True)
    text = ("#!/bin/sh\n"
            "# aarch64 Python of a Debian bookworm arm64 root filesystem under qemu user emulation\n"
            "# (written by tools/arm64_env.py; recipe: ../shared/ARM64.md). QEMU_CPU is pinned: the default\n"
            "# 'max' CPU advertises SME and XNNPACK then returns wrong int8 results.\n"
            f"exec env QEMU_LD_PREFIX='{lay.rootfs}' QEMU_CPU={QEMU_CPU} '{qemu}' -0 \"$0\" "
            f"'{lay.rootfs}/usr/bin/python{PYTHON_VERSION}' \"$@\"\n")
    if lay.wrapper.is_file() and lay.wrapper.read_text() == text:
        return
    tmp = lay.wrapper.with_name("python3.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.rename(lay.wrapper)


# --------------------------------------------------------------------------------------------------
# layer 2: wheelhouse (downloaded on the host) and the agent's build backend


def _pip_host() -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def build_wheels(lay: Layout) -> None:
    _remove(lay.wheels)
    lay.wheels.mkdir(parents=True)
    reqs = requirements()
    (lay.wheels / "requirements.txt").write_text("\n".join(reqs) + "\n")
    cmd = [*_pip_host(), "download", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
           "--implementation", "cp", *(a for abi in ABIS for a in ("--abi", abi)),
           *(a for p in PLATFORMS for a in ("--platform", p)), "-d", str(lay.wheels),
           "-r", str(lay.wheels / "requirements.txt")]
    run_step(cmd, "download the aarch64 wheels on the host", timeout=1800)
    wheels = sorted(p.name for p in lay.wheels.glob("*.whl"))
    _mark_complete(lay.wheels, {"requirements": reqs, "wheels": wheels})
    log(f"wheelhouse: {len(wheels)} wheels, {_du(lay.wheels) / 2**20:.0f} MiB")


def build_buildreq(lay: Layout) -> None:
    _remove(lay.buildreq)
    lay.buildreq.mkdir(parents=True)
    reqs = build_requirements()
    run_step([*_pip_host(), "download", "--only-binary=:all:", "-d", str(lay.buildreq), *reqs],
             "download the agent's build backend", timeout=600)
    _mark_complete(lay.buildreq, {"requires": reqs})


def build_agent_wheel(lay: Layout, out: Path) -> Path:
    """The agent's wheel from a copy of this checkout's sources (the checkout itself is not written to)."""
    with tempfile.TemporaryDirectory(prefix="edgekit-src-") as tmp:
        src = Path(tmp)
        for name in AGENT_SOURCES:
            p = ROOT / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif p.is_file():
                shutil.copy2(p, src / name)
        run_step([*_pip_host(), "wheel", "--no-deps", "--no-index", "--find-links", str(lay.buildreq),
                  "-w", str(out), str(src)], "build the agent's wheel on the host", echo=False, timeout=600)
    (wheel,) = out.glob("edgekit-*.whl")
    return wheel


# --------------------------------------------------------------------------------------------------
# layer 3: the emulated venv


def _pip_emulated(lay: Layout) -> list[str]:
    # --isolated: no PIP_* variables or pip.conf of the host (qemu shows the host's /etc/pip.conf too)
    return [str(lay.python), "-m", "pip", "--isolated", "--disable-pip-version-check", "install", "--no-index",
            "--find-links", str(lay.wheels), "--only-binary=:all:"]


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{PYTHON_VERSION}" / "site-packages"


def installed(venv: Path) -> dict[str, dict[str, Any]]:
    """Distributions in the venv (read on the host): normalized name -> version and wheel tags."""
    out: dict[str, dict[str, Any]] = {}
    for info in site_packages(venv).glob("*.dist-info"):
        meta = (info / "METADATA").read_text(errors="replace") if (info / "METADATA").is_file() else ""
        name = re.search(r"^Name:\s*(\S+)", meta, re.M)
        version = re.search(r"^Version:\s*(\S+)", meta, re.M)
        wheel = (info / "WHEEL").read_text(errors="replace") if (info / "WHEEL").is_file() else ""
        if name:
            out[re.sub(r"[-_.]+", "-", name.group(1)).lower()] = {
                "version": version.group(1) if version else None,
                "tags": re.findall(r"^Tag:\s*(\S+)", wheel, re.M)}
    return out


def _host_uninstall(venv: Path, dist: str) -> None:
    """Remove ``dist`` from the venv the way pip would (its RECORD), done on the host: the emulated pip
    would need a process of its own, and a local wheel of an already installed version is skipped by pip."""
    sp = site_packages(venv)
    for info in sp.glob(f"{dist}-*.dist-info"):
        record = info / "RECORD"
        if record.is_file():
            for line in record.read_text().splitlines():
                rel = line.rsplit(",", 2)[0]
                if rel:
                    target = (sp / rel).resolve()
                    if target.is_file() and venv.resolve() in target.parents:
                        target.unlink()
        _remove(info)
    for top in ("edge_agent", "converters", "device_profiles"):
        if (sp / top).is_dir() and not any((sp / top).rglob("*.py")):
            _remove(sp / top)


def install_agent(lay: Layout) -> dict[str, Any]:
    """Build the agent's wheel from the checkout and install it with its extras into the emulated venv."""
    stamp = agent_hash()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgekit-wheel-") as tmp:
        wheel = build_agent_wheel(lay, Path(tmp))
        (lay.venv / AGENT_STAMP).unlink(missing_ok=True)
        _host_uninstall(lay.venv, "edgekit")
        output = run_step([*_pip_emulated(lay), f"{wheel}[{','.join(EXTRAS)}]"],
                          f"install the agent ({wheel.name}[{','.join(EXTRAS)}]) with the emulated pip")
    (lay.venv / AGENT_STAMP).write_text(stamp + "\n")
    dists = installed(lay.venv)
    host_only = sorted(set(dists) & set(HOST_ONLY))
    if host_only:
        raise ToolError(f"the agent's install pulled host-only packages into the aarch64 venv: {host_only}")
    log(f"agent installed in {time.monotonic() - t0:.0f} s (sources {stamp})")
    return {"wheel": wheel.name, "seconds": round(time.monotonic() - t0, 1), "output": output, "stamp": stamp}


def build_venv(lay: Layout) -> None:
    _remove(lay.venv)
    t0 = time.monotonic()
    run_step([lay.wrapper, "-m", "venv", lay.venv], "create the emulated venv (about 35 s)")
    lay.venv.joinpath(".tool-keys.json").write_text(json.dumps({"base": lay.base.name, "wheels": lay.wheels.name}))
    install_agent(lay)  # resolves every dependency of [tflite,onnx,vision] from the wheelhouse
    _mark_complete(lay.venv, {"base": lay.base.name, "wheels": lay.wheels.name,
                              "dists": {k: v["version"] for k, v in sorted(installed(lay.venv).items())}})
    log(f"emulated venv ready in {time.monotonic() - t0:.0f} s ({_du(lay.venv) / 2**20:.0f} MiB)")


# --------------------------------------------------------------------------------------------------
# commands


def build(*, force_agent: bool = False, mirror: str | None = None, root: Path | None = None) -> Layout:
    """Build every layer that is missing or incomplete, then make sure the venv's agent is this checkout's."""
    require_tools()
    lay = Layout(root)
    t0 = time.monotonic()
    with locked(lay.root):
        if not complete(lay.base):
            _remove(lay.base)
            m = mirror or debian_mirror()
            log(f"building the arm64 root filesystem ({SUITE}, {', '.join(DEBIAN_PACKAGES)}) from {m}")
            build_base(lay, m)
        else:
            write_wrapper(lay)
            log(f"root filesystem: cached ({lay.base})")
        if not complete(lay.wheels):
            build_wheels(lay)
        else:
            log(f"wheelhouse: cached ({lay.wheels})")
        if not complete(lay.buildreq):
            build_buildreq(lay)
        if not complete(lay.venv):
            build_venv(lay)
        else:
            log(f"emulated venv: cached ({lay.venv})")
            current = (lay.venv / AGENT_STAMP).read_text().strip() if (lay.venv / AGENT_STAMP).is_file() else ""
            if force_agent or current != agent_hash():
                install_agent(lay)
            else:
                log("agent: this checkout's sources are installed")
    stale = status(lay.root)["stale"]
    if stale:
        log(f"{len(stale)} cached folder(s) of older keys remain: tools/arm64-env clean --stale removes them")
    log(f"ready in {time.monotonic() - t0:.0f} s: {lay.python}")
    return lay


def _du(p: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def status(root: Path | None = None) -> dict[str, Any]:
    lay = Layout(root)
    layers = {name: {"path": str(d), "complete": complete(d), "exists": d.exists()}
              for name, d in lay.layers().items()}
    current = {d.name for d in lay.layers().values()}
    stale = sorted(str(p) for p in lay.root.glob("*-*") if p.is_dir() and p.name not in current) \
        if lay.root.is_dir() else []
    stamp = lay.venv / AGENT_STAMP
    return {
        "cache": str(lay.root), "layers": layers, "stale": stale, "python": str(lay.python),
        "wrapper": str(lay.wrapper), "rootfs": str(lay.rootfs), "wheelhouse": str(lay.wheels),
        "venv": str(lay.venv), "qemu_cpu": QEMU_CPU, "extras": list(EXTRAS),
        "ready": all(v["complete"] for v in layers.values()),
        "agent_current": stamp.is_file() and stamp.read_text().strip() == agent_hash(),
        "missing_tools": missing_tools(),
    }


def clean(*, stale_only: bool, root: Path | None = None) -> list[str]:
    lay = Layout(root)
    if not lay.root.is_dir():
        return []
    current = {d.name for d in lay.layers().values()}
    removed = []
    with locked(lay.root):
        for p in sorted(lay.root.iterdir()):
            if p.name == ".lock" or (stale_only and p.name in current):
                continue
            _remove(p)
            removed.append(str(p))
    return removed


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arm64-env", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or reuse) the aarch64 root filesystem, wheelhouse and venv")
    b.add_argument("--force-agent", action="store_true", help="reinstall the agent even when it is current")
    b.add_argument("--mirror", help="Debian mirror for debootstrap (default: the one apt uses, or "
                   "$EDGEKIT_ARM64_MIRROR)")
    py = sub.add_parser("python", help="print the emulated venv's python (exit 1 when not built)")
    py.add_argument("--base", action="store_true", help="the bare rootfs python wrapper instead of the venv's")
    s = sub.add_parser("status", help="what is cached and whether it is current")
    s.add_argument("--json", action="store_true")
    sub.add_parser("install-agent", help="rebuild the agent's wheel from this checkout and reinstall it")
    r = sub.add_parser("run", help="run the emulated venv's python with the arguments that follow")
    r.add_argument("args", nargs=argparse.REMAINDER)
    c = sub.add_parser("clean", help="remove the cache")
    c.add_argument("--stale", action="store_true",
                   help="only layers of other keys (older recipes or requirements)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # everything after "run" goes to python as it is (argparse would eat "-c")
        rest = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        argv = ["run", "--", *rest]
    args = _parser().parse_args(argv)
    try:
        if args.command == "build":
            lay = build(force_agent=args.force_agent, mirror=args.mirror)
            print(lay.python)
        elif args.command in ("python", "run"):
            lay = Layout()
            target = lay.wrapper if args.command == "python" and args.base else lay.python
            layer = lay.base if target == lay.wrapper else lay.venv
            if not complete(layer) or not target.exists():
                raise ToolError(f"the aarch64 environment is not built ({layer}): run tools/arm64-env build")
            if args.command == "python":
                print(target)
            else:
                rest = args.args[1:] if args.args[:1] == ["--"] else args.args
                os.execv(str(target), [str(target), *rest])
        elif args.command == "status":
            st = status()
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                print(f"cache      {st['cache']}")
                for name, layer in st["layers"].items():
                    d = Path(layer["path"])
                    state = "complete" if layer["complete"] else "incomplete" if layer["exists"] else "missing"
                    size = f"{_du(d) / 2**20:7.0f} MiB" if layer["exists"] else " " * 11
                    print(f"{name:<10} {state:<10} {size}  {d}")
                print(f"agent      {'current' if st['agent_current'] else 'stale or not installed'}")
                print(f"qemu cpu   {st['qemu_cpu']}")
                print(f"python     {st['python'] if st['ready'] else '- (run: tools/arm64-env build)'}")
                if st["stale"]:
                    print(f"stale      {len(st['stale'])} folders (tools/arm64-env clean --stale)")
                if st["missing_tools"]:
                    print(f"missing    {', '.join(st['missing_tools'])}")
        elif args.command == "install-agent":
            require_tools()
            lay = Layout()
            if not complete(lay.venv):
                raise ToolError("the aarch64 environment is not built: run tools/arm64-env build")
            with locked(lay.root):
                install_agent(lay)
        elif args.command == "clean":
            for p in clean(stale_only=args.stale):
                print(f"removed {p}")
    except ToolError as e:
        print(f"arm64-env: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
