"""The systemd unit: rendered for every shipped profile, checked by the real ``systemd-analyze verify`` and
``systemd-analyze security --offline`` (skipped where systemd-analyze is missing), and
``edge-agent install-service`` through the real CLI (``--root DIR`` and ``--dry-run``)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_agent.config import AgentConfig, default_config_text, load_config
from edge_agent.errors import InputError
from edge_agent.profiles import available_profiles, load_profile
from edge_agent.systemd_unit import (
    JETSON_NODES,
    device_rules,
    install_service,
    render_unit,
)
from tests.test_agent_cli import AGENT, ROOT

PROFILES = sorted(available_profiles())
EXEC = Path(AGENT[0]) if Path(AGENT[0]).name == "edge-agent" else Path(sys.executable)
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed here")
# systemd-analyze security's levels, best first; "OK" (exposure <= 4.9) or better is the bar
GOOD_LEVELS = ("PERFECT", "SAFE", "OK")


def unit(name: str, config: AgentConfig | None = None, **kw: object) -> str:
    return render_unit(load_profile(name), exec_path=EXEC, config=config, **kw)  # type: ignore[arg-type]


def directives(text: str) -> list[tuple[str, str]]:
    return [tuple(line.split("=", 1)) for line in text.splitlines()  # type: ignore[misc]
            if "=" in line and not line.startswith("#")]


def values(text: str, key: str) -> list[str]:
    return [v for k, v in directives(text) if k == key]


def device_allow(text: str) -> list[str]:
    return values(text, "DeviceAllow")


# ------------------------------------------------------------------------------------------------ rendering


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_renders_every_required_directive(name: str) -> None:
    text = unit(name)
    d = dict(directives(text))
    expected = {
        "Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "StartLimitBurst": "5",
        "StartLimitIntervalSec": "10min", "WatchdogSec": "30s", "User": "edge-agent",
        "StateDirectory": "edge-agent", "ReadWritePaths": "/var/lib/edge-agent", "NoNewPrivileges": "yes",
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes", "DevicePolicy": "closed",
        "MemoryMax": "75%", "CapabilityBoundingSet": "", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "ProtectClock": "yes", "ProtectHostname": "yes", "ProtectProc": "invisible", "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "UMask": "0027", "ExecReload": "/bin/kill -HUP $MAINPID",
        "WantedBy": "multi-user.target",
    }
    for key, value in expected.items():
        assert d.get(key) == value, (key, d.get(key))
    assert d["ExecStart"] == f"{EXEC} run --config /etc/edge-agent/config.toml"
    assert values(text, "SystemCallFilter") == ["@system-service", "~@privileged"]
    assert d["RestrictAddressFamilies"].split()[:3] == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert "ProcSubset" not in d  # XNNPACK/cpuinfo read /proc/cpuinfo
    assert f"profile {name}" in d["Description"]
    # DeviceAllow only with DevicePolicy=closed; no devices at all -> PrivateDevices=yes
    assert d["PrivateDevices"] == ("no" if device_allow(text) else "yes")


def test_rpi5_and_coral_usb_devices() -> None:
    rpi5 = unit("rpi5")
    assert device_allow(rpi5) == ["/dev/vcio rw"]  # vcgencmd: get_throttled and the PMIC
    assert dict(directives(rpi5))["MemoryDenyWriteExecute"] == "yes"
    coral = unit("coral-usb")
    assert device_allow(coral) == ["char-usb_device rw", "/dev/vcio rw"]
    assert dict(directives(coral))["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert "/dev/apex_0" not in coral


def test_coral_devboard_uses_the_pcie_tpu() -> None:
    text = unit("coral-devboard")
    assert device_allow(text) == ["/dev/apex_0 rw"]
    assert "AF_NETLINK" not in text


def test_jetson_gets_the_gpu_nodes_and_no_w_x_ban() -> None:
    for name in ("jetson-nano", "jetson-orin-nano"):
        text = unit(name)
        allowed = device_allow(text)
        assert allowed == [f"{n} rw" for n in JETSON_NODES]
        assert "/dev/nvmap rw" in allowed and "/dev/nvhost-ctrl-gpu rw" in allowed
        assert "/dev/nvgpu/igpu0/ctrl rw" in allowed
        d = dict(directives(text))
        assert d["MemoryDenyWriteExecute"] == "no" and d["TimeoutStartSec"] == "30min"  # TensorRT builds


def test_x86_64_cpu_box_sees_no_devices() -> None:
    text = unit("x86-64")
    assert device_allow(text) == [] and dict(directives(text))["PrivateDevices"] == "yes"


def test_config_source_and_power_meter_add_device_groups() -> None:
    cam = unit("x86-64", AgentConfig(source="camera:/dev/video2"))
    assert device_allow(cam) == ["char-video4linux rw"]
    meter = unit("rpi4", AgentConfig(power="serial:ina219-csv", power_port="/dev/ttyUSB0"))
    assert device_allow(meter) == ["/dev/vcio rw", "char-ttyUSB rw"]
    bt = unit("rpi4", AgentConfig(power="serial:um25c", power_port="/dev/rfcomm0"))
    assert "char-rfcomm rw" in device_allow(bt)
    unknown_port = unit("x86-64", AgentConfig(power="serial:um34c"))
    assert device_allow(unknown_port) == ["char-ttyUSB rw", "char-ttyACM rw", "char-rfcomm rw"]
    sensor = unit("x86-64", AgentConfig(source="serial:/dev/ttyACM0?window=128"))
    assert device_allow(sensor) == ["char-ttyACM rw"]
    rules = device_rules(load_profile("coral-usb"), AgentConfig(source="camera:0"))
    assert {r.spec: r.group for r in rules} == {"char-usb_device": "plugdev", "/dev/vcio": "video",
                                                "char-video4linux": "video"}


def test_state_outside_var_lib_and_trt_cache_are_writable() -> None:
    cfg = AgentConfig(state_dir="/data/edge", store=AgentConfig().store.__class__(inboxes=("/srv/inbox",)))
    text = unit("jetson-orin-nano", cfg)
    assert values(text, "ReadWritePaths") == ["-/data/edge", "-/var/lib/edge-agent/trt-cache", "-/srv/inbox"]


def test_render_options_and_errors(tmp_path: Path) -> None:
    text = render_unit(load_profile("rpi4"), user="agent_2", exec_path="/opt/edge kit/bin/edge-agent",
                       config_path="/etc/edge-agent/100%.toml", memory_max="512M", watchdog_s=10)
    d = dict(directives(text))
    assert d["User"] == "agent_2" and d["MemoryMax"] == "512M" and d["WatchdogSec"] == "10s"
    assert d["ExecStart"] == '"/opt/edge kit/bin/edge-agent" run --config /etc/edge-agent/100%%.toml'
    home = render_unit(load_profile("rpi4"), exec_path="/home/pi/venv/bin/edge-agent")
    assert dict(directives(home))["ProtectHome"] == "read-only"  # the venv must stay visible
    p = load_profile("rpi4")
    for kw, what in ((dict(user="Bad User"), "not a valid system user name"),
                     (dict(exec_path="bin/edge-agent"), "absolute path"),
                     (dict(memory_max="lots"), "not a size systemd reads"),
                     (dict(watchdog_s=0), "at least 1 s")):
        with pytest.raises(InputError, match=what):
            render_unit(p, **{"exec_path": "/usr/bin/edge-agent", **kw})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ systemd-analyze


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, timeout=120)


def write_unit(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edge-agent.service"
    path.write_text(text)
    return path


@needs_analyze
@pytest.mark.parametrize("name", PROFILES)
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, name: str) -> None:
    path = write_unit(tmp_path, unit(name, AgentConfig(source="camera:0")))
    r = analyze("verify", str(path))
    assert r.returncode == 0, r.stderr
    assert "edge-agent.service" not in r.stderr, r.stderr  # no warning about any line of it


@needs_analyze
def test_systemd_analyze_verify_does_check(tmp_path: Path) -> None:
    """The negative control: verify does fail a unit with a wrong directive value or a missing program."""
    bad = unit("rpi5").replace(f"ExecStart={EXEC}", "ExecStart=/nonexistent/edge-agent")
    r = analyze("verify", str(write_unit(tmp_path, bad)))
    assert r.returncode != 0 and "/nonexistent/edge-agent" in r.stderr
    typo = unit("rpi5").replace("ProtectSystem=strict", "ProtectSystm=strict")
    r = analyze("verify", str(write_unit(tmp_path, typo)))
    assert "Unknown key" in r.stderr and "ProtectSystm" in r.stderr


_EXPOSURE = re.compile(r"Overall exposure level for edge-agent\.service: (\d+(?:\.\d+)?) (\w+)")


def exposure(path: Path, *extra: str) -> tuple[float, str]:
    r = analyze("security", "--offline=true", *extra, str(path))
    m = _EXPOSURE.search(r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    return float(m.group(1)), m.group(2)


@needs_analyze
@pytest.mark.parametrize("name", PROFILES)
def test_systemd_analyze_security_rates_it_ok_or_better(tmp_path: Path, name: str,
                                                        record_property: pytest.RecordProperty) -> None:
    version = re.match(r"systemd (\d+)", analyze("--version").stdout)
    if version is None or int(version.group(1)) < 252:
        pytest.skip("systemd-analyze security --offline needs systemd >= 252")
    score, level = exposure(write_unit(tmp_path, unit(name)))
    record_property("exposure", score)
    print(f"\nsystemd-analyze security --offline: {name}: {score} {level}")
    assert level in GOOD_LEVELS and score <= 4.9, (score, level)


# ------------------------------------------------------------------------------------------------ install_service


def forbid(cmd: Sequence[str]) -> None:
    raise AssertionError(f"ran {cmd} though nothing may be enabled")


def test_install_under_a_root_writes_files_and_enables_nothing(tmp_path: Path) -> None:
    steps = install_service(tmp_path, profile="coral-usb", exec_path=EXEC, runner=forbid)
    unit_file = tmp_path / "etc/systemd/system/edge-agent.service"
    config_file = tmp_path / "etc/edge-agent/config.toml"
    assert unit_file.read_text() == unit("coral-usb", load_config(config_file))
    assert config_file.read_text() == default_config_text("coral-usb")
    assert load_config(config_file).profile == "coral-usb"
    assert oct(unit_file.stat().st_mode & 0o777) == "0o644"
    assert [s.action for s in steps if s.action in ("write", "run")] == ["write", "write"]
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()} == {
        "etc/systemd/system/edge-agent.service", "etc/edge-agent/config.toml"}


def test_an_existing_config_is_kept_and_shapes_the_unit(tmp_path: Path) -> None:
    config_file = tmp_path / "etc/edge-agent/config.toml"
    config_file.parent.mkdir(parents=True)
    text = 'profile = "rpi4"\nsource = "camera:0"\n'
    config_file.write_text(text)
    steps = install_service(tmp_path, exec_path=EXEC, runner=forbid)  # the profile comes from the config
    assert config_file.read_text() == text
    assert ("keep", str(config_file)) in [(s.action, s.target) for s in steps]
    rendered = (tmp_path / "etc/systemd/system/edge-agent.service").read_text()
    assert "profile rpi4" in rendered and "DeviceAllow=char-video4linux rw" in rendered


def test_install_needs_a_profile(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="needs the device profile"):
        install_service(tmp_path, exec_path=EXEC, runner=forbid)
    with pytest.raises(InputError, match="unknown profile"):
        install_service(tmp_path, profile="rpi9", exec_path=EXEC, runner=forbid)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    steps = install_service(tmp_path, dry_run=True, profile="rpi5", exec_path=EXEC, runner=forbid)
    assert list(tmp_path.iterdir()) == []
    writes = [s for s in steps if s.action == "write"]
    assert [Path(s.target).name for s in writes] == ["edge-agent.service", "config.toml"]
    assert "Type=notify" in writes[0].content


def test_enabling_creates_the_user_and_starts_the_service(tmp_path: Path) -> None:
    """The system commands, recorded instead of run (the test must not touch this machine's users)."""
    ran: list[list[str]] = []
    user = "edgekit-test-nouser"
    install_service(tmp_path, profile="coral-usb", user=user, exec_path=EXEC, enable=True,
                    runner=lambda c: ran.append(list(c)))
    assert ran[0][:2] == ["useradd", "--system"] and ran[0][-1] == user
    assert "--shell" in ran[0] and "/usr/sbin/nologin" in ran[0]
    state, inbox = tmp_path / "var/lib/edge-agent", tmp_path / "var/lib/edge-agent/inbox"
    assert ["install", "-d", "-m", "0750", "-o", user, "-g", user, str(state)] in ran
    assert ["install", "-d", "-m", "2770", "-o", user, "-g", user, str(inbox)] in ran
    groups = [c for c in ran if c[0] == "usermod"]
    wanted = [g for g in ("plugdev", "video") if _group_exists(g)]
    assert groups == ([["usermod", "--append", "--groups", ",".join(wanted), user]] if wanted else [])
    # no trusted key yet: enabled, not started
    assert ran[-2:] == [["systemctl", "daemon-reload"], ["systemctl", "enable", "edge-agent.service"]]
    key = tmp_path / "etc/edge-agent/trusted.pub"
    key.write_text("key")
    ran.clear()
    install_service(tmp_path, user=user, exec_path=EXEC, enable=True, runner=lambda c: ran.append(list(c)))
    assert ran[-1] == ["systemctl", "enable", "--now", "edge-agent.service"]


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the real CLI


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ))


def test_cli_install_service_root(tmp_path: Path) -> None:
    r = cli("install-service", "--root", str(tmp_path), "--profile", "coral-usb", "--exec", str(EXEC))
    assert r.returncode == 0, r.stderr
    unit_file = tmp_path / "etc/systemd/system/edge-agent.service"
    assert f"wrote {unit_file}" in r.stdout and "nothing enabled" in r.stdout
    assert "DeviceAllow=char-usb_device rw" in unit_file.read_text()
    assert load_config(tmp_path / "etc/edge-agent/config.toml").profile == "coral-usb"
    # again, without --profile: the config is kept and names the profile
    r = cli("install-service", "--root", str(tmp_path), "--exec", str(EXEC), "--json")
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)["steps"]
    assert {"action": "keep", "target": str(tmp_path / "etc/edge-agent/config.toml"),
            "content": "exists: kept as it is"} in steps
    assert not [s for s in steps if s["action"] == "run"]


@needs_analyze
def test_cli_root_install_passes_systemd_analyze(tmp_path: Path) -> None:
    r = cli("install-service", "--root", str(tmp_path), "--profile", "rpi5", "--exec", str(EXEC))
    assert r.returncode == 0, r.stderr
    unit_file = tmp_path / "etc/systemd/system/edge-agent.service"
    v = analyze("verify", str(unit_file))
    assert v.returncode == 0 and "edge-agent.service" not in v.stderr, v.stderr
    score, level = exposure(unit_file)
    assert level in GOOD_LEVELS, (score, level)
    # the same answer when systemd-analyze looks for the unit under the root, as a packager would
    assert exposure(Path("edge-agent.service"), f"--root={tmp_path}") == (score, level)


def test_cli_dry_run_prints_and_writes_nothing(tmp_path: Path) -> None:
    r = cli("install-service", "--dry-run", "--root", str(tmp_path), "--profile", "rpi5", "--exec", str(EXEC))
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []
    assert f"----- would write {tmp_path}/etc/systemd/system/edge-agent.service -----" in r.stdout
    assert "Type=notify" in r.stdout and "DeviceAllow=/dev/vcio rw" in r.stdout
    assert 'profile = "rpi5"' in r.stdout and "would run" not in r.stdout


def test_cli_dry_run_on_this_system_changes_nothing() -> None:
    """Without --root the dry run shows the system steps (user, groups, systemctl) and does none of them."""
    unit_file = Path("/etc/systemd/system/edge-agent.service")
    before = unit_file.exists()
    r = cli("install-service", "--dry-run", "--profile", "x86-64", "--user", "edgekit-test-nouser",
            "--exec", str(EXEC))
    assert r.returncode == 0, r.stderr
    assert "would run: useradd --system" in r.stdout and "edgekit-test-nouser" in r.stdout
    assert "would run: systemctl daemon-reload" in r.stdout and "would run: systemctl enable" in r.stdout
    assert unit_file.exists() == before
    import pwd

    with pytest.raises(KeyError):
        pwd.getpwnam("edgekit-test-nouser")


def test_cli_errors(tmp_path: Path) -> None:
    r = cli("install-service", "--root", str(tmp_path), "--exec", str(EXEC))
    assert r.returncode == 2 and "needs the device profile" in r.stderr and "hint:" in r.stderr
    r = cli("install-service", "--root", str(tmp_path), "--profile", "rpi5", "--user", "Root User")
    assert r.returncode == 2 and "not a valid system user name" in r.stderr
    r = cli("install-service", "--root", str(tmp_path), "--profile", "rpi5", "--memory-max", "lots")
    assert r.returncode == 2 and "MemoryMax" not in r.stderr and "not a size" in r.stderr


# ------------------------------------------------------------------------------------------------ W^X


_MDWE_PROBE = r"""
import ctypes, mmap, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
# systemd's MemoryDenyWriteExecute seccomp rules (x86-64): mmap W+X, mprotect/pkey_mprotect +X, shmat SHM_EXEC
def ins(code, jt, jf, k): return struct.pack("HBBI", code, jt, jf, k)
LD, JEQ, JSET, RET, AND = 0x20, 0x15, 0x45, 0x06, 0x54
ALLOW, DENY = 0x7FFF0000, 0x00050001
prog = [ins(LD, 0, 0, 4), ins(JEQ, 1, 0, 0xC000003E), ins(RET, 0, 0, ALLOW), ins(LD, 0, 0, 0),
        ins(JEQ, 4, 0, 10), ins(JEQ, 3, 0, 329), ins(JEQ, 6, 0, 9), ins(JEQ, 10, 0, 30), ins(RET, 0, 0, ALLOW),
        ins(LD, 0, 0, 32), ins(JSET, 0, 1, 4), ins(RET, 0, 0, DENY), ins(RET, 0, 0, ALLOW),
        ins(LD, 0, 0, 32), ins(AND, 0, 0, 6), ins(JEQ, 0, 1, 6), ins(RET, 0, 0, DENY), ins(RET, 0, 0, ALLOW),
        ins(LD, 0, 0, 32), ins(JSET, 0, 1, 0o100000), ins(RET, 0, 0, DENY), ins(RET, 0, 0, ALLOW)]
buf = ctypes.create_string_buffer(b"".join(prog))
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fp = Fprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fp), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    sys.exit("the filter does not refuse W+X memory")
except OSError:
    pass
import numpy as np
import onnxruntime as ort
from ai_edge_litert.interpreter import Interpreter
onnx_path, tflite_path = sys.argv[1:3]
s = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
x = np.zeros([d if isinstance(d, int) else 1 for d in s.get_inputs()[0].shape], np.float32)
s.run(None, {s.get_inputs()[0].name: x})
it = Interpreter(tflite_path, num_threads=2)  # XNNPACK is applied by default
it.allocate_tensors()
it.invoke()
print("ok")
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or sys.platform != "linux",
                    reason="the seccomp program is written for x86-64 Linux")
def test_runtimes_run_under_memory_deny_write_execute(tmp_path: Path, realmodels: Path) -> None:
    """The unit's MemoryDenyWriteExecute=yes claim: onnxruntime (CPU) and LiteRT + XNNPACK do not need W+X
    memory. The probe installs systemd's seccomp rules for it, then loads and runs a real model on each."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("ai_edge_litert")
    onnx_model = realmodels / "onnx_mnist" / "mnist_opset8.onnx"
    tflite_model = realmodels / "mobilenet_v2_int8" / "mobilenet_v2_quantized_1x3x224x224.tflite"
    r = subprocess.run([sys.executable, "-c", _MDWE_PROBE, str(onnx_model), str(tflite_model)],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
