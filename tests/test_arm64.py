"""The ARM64 tier: the agent installed from this checkout and run by an aarch64 Python (Debian bookworm arm64,
glibc 2.36, as on Raspberry Pi OS) under qemu user emulation, with the real aarch64 wheels of LiteRT,
onnxruntime, OpenCV and numpy.

The environment is built (minutes, once) or reused by ``tools/arm64-env build`` (tools/arm64_env.py, recipe
in ../shared/ARM64.md) and cached under ~/.cache/edgekit/arm64; every session reinstalls the agent from
the checkout with the emulated pip (``edgekit-….whl[tflite,onnx,vision]``, aarch64 wheels only). Bundles are
made on the host from ../shared/realmodels, exactly as tests/test_agent_infer.py makes them, and run by the
emulated agent. Emulated processes start in ~2-4 s and run LiteRT 6-10x slower than native, so each check
is one process (one infer per model, one bench, one run killed and restarted, one in-process check).

What this proves: the agent installs on aarch64 from wheels alone, imports nothing host-only, verifies
bundles, runs real models with XNNPACK to the right answers, spools and delivers telemetry across a SIGKILL,
and its doctor reports what an emulated board lacks instead of crashing. What it cannot: speed, power,
thermal, camera, GPIO or accelerators (qemu has none; /sys is the host's), nor Jetson (Ubuntu, other Pythons).

Skipped, with the reason, when qemu-user-static or debootstrap is not installed (bash scripts/setup.sh
installs them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from edge_agent.telemetry.schema import validate_window
from tests.fixtures_mqtt import broker  # noqa: F401
from tests.mosquitto import Collector, Mosquitto
from tests.test_agent_cli import make_bundle
from tests.test_agent_infer import litert_bundle
from tests.test_agent_outage import PERSIST, collect_until, spool_seqs
from tests.test_backend_tflite import DOG, HELLO_INT8, MICRO, MOBILENET

pytestmark = pytest.mark.arm64

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "arm64_env.py"
# The bundles name the rpi5 profile (what the emulated root filesystem stands for); 2 threads as on CI.
RUNTIME = {"engine": "litert", "delegates": ["xnnpack"], "threads": 2, "cpu_fallback": True}
HOST_ONLY_MODULES = ("tensorflow", "onnx", "tf_keras", "keras")
# hello_world int8 on aarch64 vs x86-64: XNNPACK's int8 kernels measured bit-identical (../shared/ARM64.md);
# LiteRT's built-in kernels differed by up to 3 output quantization steps (of 0.00829) on 7 of 256 inputs.
HELLO_TOLERANCE_STEPS = 3
TIMEOUT = 300.0  # one emulated process; they take 2-15 s here


def _load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("arm64_env", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@contextlib.contextmanager
def live(config: pytest.Config) -> Iterator[None]:
    """Print to the terminal now, not into pytest's capture (the first build takes minutes)."""
    capman = config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
        yield


@dataclass
class Arm64:
    """The built environment: the emulated venv, its python, and what the build printed."""

    venv: Path
    python: Path
    status: dict[str, Any]
    build_log: str
    build_s: float
    times: list[tuple[str, float]] = field(default_factory=list)

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name

    def env(self) -> dict[str, str]:
        # no PIP_* of the host; the venv's bin first (its console scripts)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, what: str, cmd: list[str | Path], cwd: Path,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        """One emulated process; cwd must not be the checkout (``python -c`` would import its edge_agent)."""
        t0 = time.monotonic()
        r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, cwd=cwd,
                           env=self.env())
        self.times.append((what, time.monotonic() - t0))
        return r

    def agent(self, what: str, *args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
        return self.run(what, [self.bin("edge-agent"), *args], cwd)

    def popen_agent(self, *args: str | Path, cwd: Path) -> subprocess.Popen[str]:
        return subprocess.Popen([str(self.bin("edge-agent")), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd, env=self.env())


@pytest.fixture(scope="module")
def arm64(pytestconfig: pytest.Config) -> Iterator[Arm64]:
    """Build (the first time: minutes, printed as it goes) or reuse the aarch64 environment, and install the
    agent from this checkout into it; skips when the host tools are missing."""
    tool = _load_tool()
    if sys.platform != "linux":
        pytest.skip(f"the ARM64 tier needs Linux (qemu user emulation); this is {sys.platform}")
    missing = tool.missing_tools()
    if missing:
        pytest.skip(f"ARM64 tier skipped: {', '.join(missing)} not installed; bash scripts/setup.sh installs "
                    "them (apt-get install qemu-user-static debootstrap)")
    t0 = time.monotonic()
    lines: list[str] = []
    with live(pytestconfig):
        print(f"\n[arm64 tier] tools/arm64-env build --force-agent (cache {tool.cache_root()}; "
              "the first build takes a few minutes)", flush=True)
        with subprocess.Popen([sys.executable, str(TOOL), "build", "--force-agent"], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=ROOT) as p:
            assert p.stdout is not None
            for line in p.stdout:
                print(f"  {line}", end="", flush=True)
                lines.append(line)
            rc = p.wait()
    build_log = "".join(lines)
    if rc == 3:  # a host tool is missing after all (the tool says which and how to install it)
        pytest.skip(f"ARM64 tier skipped: {build_log.strip().splitlines()[-1]}")
    assert rc == 0, f"tools/arm64-env build failed (exit {rc}):\n{build_log[-4000:]}"
    status = json.loads(subprocess.run([sys.executable, str(TOOL), "status", "--json"], capture_output=True,
                                       text=True, check=True, cwd=ROOT).stdout)
    env = Arm64(Path(status["venv"]), Path(status["python"]), status, build_log, time.monotonic() - t0)
    env.times.append(("build/reuse + agent install", env.build_s))
    t_tier = time.monotonic()
    yield env
    with live(pytestconfig):
        print("\n[arm64 tier] seconds per step (emulated processes unless noted):")
        for what, s in env.times:
            print(f"  {s:7.1f}  {what}")
        print(f"  {time.monotonic() - t_tier + env.build_s:7.1f}  whole tier (wall, incl. host work)", flush=True)


@pytest.fixture(scope="module")
def arm_bundles(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path],
                realmodels: Path) -> dict[str, Path]:
    """Signed bundles made on the host (once), as the host tests make them, for the rpi5 profile."""
    d = tmp_path_factory.mktemp("arm64-bundles")
    private, public = keypair
    return {
        "mobilenet": litert_bundle(d / "mobilenet.edgebundle", private, realmodels / MOBILENET, runtime=RUNTIME,
                                   profile="rpi5"),
        "micro": litert_bundle(d / "micro.edgebundle", private, realmodels / MICRO, runtime=RUNTIME,
                               profile="rpi5"),
        "hello": litert_bundle(d / "hello.edgebundle", private, realmodels / HELLO_INT8, runtime=RUNTIME,
                               profile="rpi5"),
        "onnx": make_bundle(d / "mlp.edgebundle", private),
        "pub": public,
    }


def _json(r: subprocess.CompletedProcess[str]) -> Any:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}"
    return json.loads(r.stdout)


def _infer(arm64: Arm64, bundles: dict[str, Path], name: str, x: Path, cwd: Path, what: str) -> dict[str, Any]:
    r = arm64.agent(what, "infer", "--bundle", bundles[name], "--pubkey", bundles["pub"], "--input", x,
                    "--json", cwd=cwd)
    return _json(r)


# ------------------------------------------------------------------------------------------------ install


def test_agent_installs_from_checkout_with_aarch64_wheels_only(arm64: Arm64) -> None:
    tool = _load_tool()
    assert "Successfully installed" in arm64.build_log and "edgekit-0.1.0" in arm64.build_log
    assert "[tflite,onnx,vision]" in arm64.build_log  # the install command of firmware_notes/
    dists = tool.installed(arm64.venv)
    version = tool._pyproject()["project"]["version"]
    assert dists["edgekit"]["version"] == version
    for name in ("ai-edge-litert", "onnxruntime", "opencv-python-headless", "numpy", "paho-mqtt", "cryptography"):
        assert name in dists, f"{name} not installed in the aarch64 venv: {sorted(dists)}"
    foreign = {n: d["tags"] for n, d in dists.items()
               if d["tags"] and not all(t.endswith(("aarch64", "-any")) for t in d["tags"])}
    assert not foreign, f"wheels that are not aarch64 or pure Python: {foreign}"
    assert not set(dists) & set(tool.HOST_ONLY), sorted(set(dists) & set(tool.HOST_ONLY))
    # what got installed is this checkout's (a stable file; the sources hash is the tool's stamp)
    installed_profile = tool.site_packages(arm64.venv) / "device_profiles" / "rpi5.toml"
    assert installed_profile.read_bytes() == (ROOT / "device_profiles" / "rpi5.toml").read_bytes()
    assert (arm64.venv / ".agent-stamp").read_text().strip()
    wrapper = Path(arm64.status["wrapper"]).read_text()
    assert "QEMU_CPU=cortex-a72" in wrapper and "QEMU_LD_PREFIX=" in wrapper  # never qemu's default 'max'
    cpuinfo = Path(arm64.status["rootfs"]) / "proc" / "cpuinfo"
    assert "CPU part\t: 0xd08" in cpuinfo.read_text() and not cpuinfo.is_symlink()
    r = subprocess.run([str(ROOT / "tools" / "arm64-env"), "python"], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == str(arm64.python)


def test_tool_without_qemu_says_what_to_install(tmp_path: Path) -> None:
    """Host only: with qemu-aarch64-static off PATH the build stops at once (exit 3) and names the packages."""
    r = subprocess.run([sys.executable, str(TOOL), "build"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PATH": str(tmp_path), "EDGEKIT_ARM64_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 3, r.stderr
    assert "qemu-aarch64-static (Debian package qemu-user-static)" in r.stderr
    assert "apt-get install -y qemu-user-static" in r.stderr and "scripts/setup.sh" in r.stderr
    assert not (tmp_path / "cache").exists()  # nothing built or downloaded


# ------------------------------------------------------------------------------------------------ doctor


def _doctor_command(arm64: Arm64) -> list[str | Path]:
    """The installed ``edge-agent doctor`` console script of the emulated venv."""
    return [arm64.bin("edge-agent"), "doctor"]


def test_doctor_rpi5_reports_what_emulation_lacks_without_crashing(
        arm64: Arm64, arm_bundles: dict[str, Path], broker: Mosquitto, tmp_path: Path) -> None:  # noqa: F811
    state = tmp_path / "state"
    state.mkdir()
    pub = tmp_path / "trusted" / "trusted.pub"  # alone, as on a device (the doctor warns of a private key beside)
    pub.parent.mkdir()
    pub.write_bytes(arm_bundles["pub"].read_bytes())
    r = arm64.run("doctor --profile rpi5", [*_doctor_command(arm64), "--profile", "rpi5", "--state-dir", state,
                                            "--mqtt", broker.address, "--pubkey", pub, "--json"], tmp_path)
    assert r.returncode in (0, 1), f"exit {r.returncode}: {r.stderr[-4000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    doc = json.loads(r.stdout)
    checks = doc["checks"] if isinstance(doc, dict) else doc
    assert checks and all({"name", "status", "detail", "note"} <= set(c) for c in checks), checks
    statuses = {c["name"]: c["status"] for c in checks}
    assert set(statuses.values()) <= {"pass", "warn", "fail", "absent", "skip"}, statuses
    assert not [c for c in checks if "internal error" in c["detail"]], checks
    # what emulation really has works: aarch64 Python, LiteRT and XNNPACK, the broker, the state folder, the key
    for name in ("python", "runtime", "delegate:xnnpack", "broker", "state-dir", "pubkey"):
        if name in statuses:
            assert statuses[name] == "pass", [c for c in checks if c["name"] == name]
    assert "python" in statuses and "aarch64" in next(c["detail"] for c in checks if c["name"] == "python")
    # what it cannot have (the PMIC's vcgencmd, Pi thermal zones) is reported, not crashed on
    assert statuses.get("power") in ("absent", "fail"), statuses
    assert r.returncode == (1 if "fail" in statuses.values() else 0)


# ------------------------------------------------------------------------------------------------ infer / bench


@pytest.mark.realmodels
def test_infer_mobilenet_dog_is_258(arm64: Arm64, arm_bundles: dict[str, Path], realmodels: Path,
                                    tmp_path: Path) -> None:
    out = _infer(arm64, arm_bundles, "mobilenet", realmodels / DOG, tmp_path, "infer mobilenet_v2 (dog)")
    (o,) = out["outputs"]
    assert o["shape"] == [1, 1000] and o["dtype"] == "int8"
    assert int(np.argmax(o["raw"])) == 258


@pytest.mark.realmodels
@pytest.mark.parametrize(("word", "index"), [("yes", 2), ("no", 3)])
def test_infer_micro_speech_yes_no(arm64: Arm64, arm_bundles: dict[str, Path], realmodels: Path, tmp_path: Path,
                                   word: str, index: int) -> None:
    features = realmodels / "micro_speech" / f"{word}_features_int8_1x1960.npy"
    (o,) = _infer(arm64, arm_bundles, "micro", features, tmp_path, f"infer micro_speech ({word})")["outputs"]
    assert o["shape"] == [1, 4] and int(np.argmax(o["raw"])) == index


@pytest.mark.realmodels
def test_infer_hello_world_matches_x86(arm64: Arm64, arm_bundles: dict[str, Path], tmp_path: Path) -> None:
    from edge_agent.cli import infer

    x = tmp_path / "x.npy"
    np.save(x, np.array([math.pi / 2], np.float32))  # float input, quantized by the agent
    (arm,) = _infer(arm64, arm_bundles, "hello", x, tmp_path, "infer hello_world")["outputs"]
    (host,) = infer(str(arm_bundles["hello"]), str(arm_bundles["pub"]), str(x)).outputs  # x86-64, in process
    assert arm["dtype"] == host["dtype"] == "int8" and arm["shape"] == host["shape"] == [1, 1]
    assert abs(arm["raw"][0][0] - host["raw"][0][0]) <= HELLO_TOLERANCE_STEPS, (arm, host)
    assert abs(arm["dequantized"][0][0] - 1.0) < 0.1  # sin(pi/2)


@pytest.mark.realmodels
def test_bench_mobilenet_delegates_every_node_to_xnnpack(arm64: Arm64, arm_bundles: dict[str, Path],
                                                         tmp_path: Path) -> None:
    r = arm64.agent("bench mobilenet_v2 --count 10", "bench", "--bundle", arm_bundles["mobilenet"],
                    "--pubkey", arm_bundles["pub"], "--warmup", "2", "--count", "10", "--power", "none", "--json",
                    cwd=tmp_path)
    out = _json(r)
    assert out["engine"] == "litert" and out["delegate"] == "xnnpack" and out["degraded"] is False
    assert out["delegated_nodes"] == out["total_nodes"] == 84
    assert out["count"] == 10 and out["threads"] == 2 and out["bundle"]["profile"] == "rpi5"
    assert 0 < out["latency_ms"]["p50"] <= out["latency_ms"]["max"]
    assert out["device"]["profile"] == "rpi5"


# ------------------------------------------------------------------------------------------------ run + spool


def _windows(sub: Collector, n: int, timeout: float = 60.0) -> list[dict[str, Any]]:
    return [sub.wait_for(lambda t, m: t.endswith("/telemetry"), timeout=timeout)[1] for _ in range(n)]


def _stop(p: subprocess.Popen[str]) -> tuple[str, str]:
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-4000:]
    return out, err


@pytest.mark.mqtt
@pytest.mark.realmodels
def test_run_sigkilled_during_outage_delivers_spooled_windows_after_restart(
        arm64: Arm64, arm_bundles: dict[str, Path], tmp_path: Path) -> None:
    """The spool on aarch64: windows made while the broker is down survive a SIGKILL of the agent and
    arrive, in order and marked historical, after a restart; seq continues; nothing is left behind."""
    state = tmp_path / "state"
    device = "arm64-spool"
    args = ("run", "--bundle", arm_bundles["micro"], "--pubkey", arm_bundles["pub"], "--device-id", device,
            "--window", "0.5", "--state-dir", state, "--json", "--power", "none")
    b = Mosquitto(tmp_path / "broker", persistence=True, extra_config=PERSIST).start()
    sub = Collector(b.host, b.port, f"edgekit/{device}/telemetry", client_id="arm64-monitor", persistent=True)
    p = None
    try:
        t0 = time.monotonic()
        p = arm64.popen_agent(*args, "--mqtt", b.address, cwd=tmp_path)
        got = _windows(sub, 2)
        time.sleep(1.2)  # the broker saves the monitor's session (autosave_interval 1)
        b.kill()
        time.sleep(2.0)  # ~4 windows while the broker is gone: they wait in the spool
        p.kill()  # SIGKILL during the outage
        _, err1 = p.communicate(timeout=60)
        arm64.times.append(("run #1 (until SIGKILL)", time.monotonic() - t0))
        spooled = spool_seqs(state)  # the aarch64 agent's SQLite spool, read on the host
        assert len(spooled) >= 2, (spooled, err1[-2000:])
        last_before_kill = spooled[-1]
        b.start()
        assert sub.wait_subscribed(30)
        t0 = time.monotonic()
        p = arm64.popen_agent(*args, "--mqtt", b.address, cwd=tmp_path)
        got = collect_until(sub, last_before_kill + 2, got)
        out2, _ = _stop(p)
        arm64.times.append(("run #2 (restart, SIGTERM)", time.monotonic() - t0))
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.communicate(timeout=30)
    second = [json.loads(line) for line in out2.splitlines() if line.strip()]
    assert second[0]["seq"] == last_before_kill + 1  # seq continues after the SIGKILL
    got = collect_until(sub, second[-1]["seq"], got)
    sub.close()
    b.stop()
    seqs = [w["seq"] for w in got]
    assert list(dict.fromkeys(seqs)) == list(range(second[-1]["seq"] + 1)), seqs  # every window, in order
    assert len(seqs) - len(set(seqs)) <= 2, seqs  # QoS 1: at most the windows in flight when the broker died
    assert all(validate_window(w) == [] for w in got)
    replayed = [w for w in got if w["seq"] in spooled]
    assert replayed and all(w["historical"] for w in replayed)
    assert all(w["engine"] == "litert" and w["delegate"] == "xnnpack" for w in second)
    assert all(w["count"] > 0 for w in second[:-1])  # the last, cut short by SIGTERM, may hold none
    assert spool_seqs(state) == []  # everything acknowledged


# ------------------------------------------------------------------------------------------------ import path

# Runs in ONE emulated process: the run path (offline, spooled), hello_world over a sweep, the onnxruntime
# backend, then every edge_agent module; then reports what got imported and what is installed.
CHECK = r"""
import importlib, importlib.metadata as md, json, pkgutil, platform, sys
import edge_agent
from edge_agent import cli
from edge_agent.service import open_session

hello, onnx_bundle, pub, xs, ones, state = sys.argv[1:7]
rc = cli.main(["run", "--bundle", hello, "--pubkey", pub, "--source", "npy:" + xs, "--duration", "0.6",
               "--window", "0.3", "--state-dir", state, "--json", "--power", "none"])
with open_session(hello, pub, source="npy:" + xs) as s:
    hello_raw = [int(s.backend.run(s.source.next())[0].reshape(-1)[0]) for _ in range(len(s.source))]
    hello_info = s.backend.info()
with open_session(onnx_bundle, pub, source="npy:" + ones) as s:
    onnx_out = s.backend.run(s.source.next())[0].reshape(-1).tolist()
    onnx_info = s.backend.info()
failed = {}
for m in pkgutil.walk_packages(edge_agent.__path__, "edge_agent."):
    if not m.name.endswith("__main__"):
        try:
            importlib.import_module(m.name)
        except Exception as e:
            failed[m.name] = f"{type(e).__name__}: {e}"
print("@@arm64 " + json.dumps({
    "rc": rc, "machine": platform.machine(), "edge_agent": edge_agent.__file__, "hello_raw": hello_raw,
    "hello_info": hello_info, "onnx_out": onnx_out, "onnx_providers": onnx_info.get("providers"),
    "import_failed": failed, "modules": sorted({m.split(".")[0] for m in sys.modules}),
    "dists": sorted(d.metadata["Name"].lower() for d in md.distributions())}, default=str))
"""


@pytest.mark.realmodels
def test_run_path_imports_nothing_host_only_and_matches_x86(arm64: Arm64, arm_bundles: dict[str, Path],
                                                            tmp_path: Path) -> None:
    from edge_agent.service import open_session

    xs = np.linspace(0, 2 * math.pi, 256, dtype=np.float32).reshape(256, 1)  # hello_world's input range
    np.save(tmp_path / "xs.npy", xs)
    np.save(tmp_path / "ones.npy", np.ones((1, 16), np.float32))
    r = arm64.run("run path + hello sweep + onnxruntime + import check", [
        arm64.python, "-c", CHECK, arm_bundles["hello"], arm_bundles["onnx"], arm_bundles["pub"],
        tmp_path / "xs.npy", tmp_path / "ones.npy", tmp_path / "state"], tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    lines = r.stdout.splitlines()
    report = json.loads(next(line for line in lines if line.startswith("@@arm64 "))[len("@@arm64 "):])
    windows = [json.loads(line) for line in lines if line.startswith("{")]
    assert report["rc"] == 0 and report["machine"] == "aarch64"
    assert str(arm64.venv) in report["edge_agent"]  # the installed agent, not the checkout
    assert windows and all(validate_window(w) == [] and w["count"] > 0 for w in windows)
    assert not report["import_failed"], report["import_failed"]
    pulled = sorted(set(report["modules"]) & set(HOST_ONLY_MODULES))
    assert not pulled, f"the agent's import path pulled host-only packages on aarch64: {pulled}"
    installed = set(report["dists"]) & {"tensorflow", "tensorflow-cpu", "onnx", "tf-keras", "keras"}
    assert not installed, f"host-only packages installed in the aarch64 venv: {installed}"
    # hello_world int8 over 256 inputs vs x86-64 (same bundle, same agent code, in this process)
    with open_session(arm_bundles["hello"], arm_bundles["pub"], source=f"npy:{tmp_path / 'xs.npy'}") as s:
        host_raw = [int(s.backend.run(s.source.next())[0].reshape(-1)[0]) for _ in range(len(s.source))]
    diff = np.abs(np.array(report["hello_raw"]) - np.array(host_raw))
    assert len(diff) == 256 and diff.max() <= HELLO_TOLERANCE_STEPS, (diff.max(), int((diff > 0).sum()))
    assert report["hello_info"]["delegate"] == "xnnpack"
    # onnxruntime's aarch64 wheel runs the agent's onnx backend; float32 close to x86-64
    with open_session(arm_bundles["onnx"], arm_bundles["pub"], source=f"npy:{tmp_path / 'ones.npy'}") as s:
        host_onnx = s.backend.run(s.source.next())[0].reshape(-1)
    assert np.allclose(report["onnx_out"], host_onnx, rtol=1e-4, atol=1e-5), (report["onnx_out"], host_onnx)
    assert report["onnx_providers"] == ["CPUExecutionProvider"]
