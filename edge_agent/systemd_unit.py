"""The systemd service: ``render_unit`` (pure) and ``install_service`` (``edge-agent install-service``).

The unit runs ``edge-agent run --config /etc/edge-agent/config.toml`` as a dedicated system user with
``Type=notify`` (READY=1 once serving, edge_agent/sdnotify.py) and ``WatchdogSec`` (WATCHDOG=1 from the
inference loop: a hung runtime is killed and restarted, a busy one keeps pinging between inferences).
``Restart=on-failure`` within a start limit; SIGHUP (``systemctl reload``) reloads the config.

Sandbox: the file system is read-only except the state folder (``ProtectSystem=strict``,
``ReadWritePaths``); ``/sys`` stays readable for power and thermal sensors; no capabilities, no new
privileges, a system-call allow list, and ``DevicePolicy=closed`` with ``DeviceAllow`` only for what the
profile and the config need (``device_rules``):

| need | DeviceAllow | group the user joins |
|---|---|---|
| Edge TPU on PCIe (``edgetpu`` delegate, ``edgetpu_device`` pci / empty) | ``/dev/apex_N rw`` | apex |
| Edge TPU on USB (``edgetpu_device`` usb / empty) | ``char-usb_device rw`` (+ AF_NETLINK for libusb) | plugdev |
| camera source (``camera:N``, ``/dev/video*``) | ``char-video4linux rw`` | video |
| serial power meter / serial source | ``char-ttyUSB``, ``char-ttyACM``, ``char-rfcomm`` … by port | dialout |
| Raspberry Pi (``vcgencmd``: get_throttled, Pi 5 PMIC) | ``/dev/vcio rw`` | video |
| Jetson (TensorRT / CUDA providers on aarch64) | the nvhost / nvmap / nvgpu nodes | video |
| CUDA / TensorRT on x86-64 | ``char-nvidia*`` | (none: 0666) |
| LiteRT ``gpu`` delegate | ``char-drm rw`` | render, video |

Device nodes given by path are resolved when the unit starts (a missing one is skipped by systemd);
``char-<group>`` rules (``/proc/devices`` names) also cover devices plugged in later.
``MemoryDenyWriteExecute`` is on except for GPU runtimes (CUDA, TensorRT, OpenCL/GL drivers compile
kernels at run time): onnxruntime's CPU provider and LiteRT with XNNPACK run under systemd's W^X seccomp
rules (tested on x86-64); libedgetpu is a USB/PCIe driver without a code generator (not tested here).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from edge_agent import __version__
from edge_agent.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_STATE_DIR,
    AgentConfig,
    default_config_text,
    parse_config,
)
from edge_agent.errors import EdgekitError, InputError
from edge_agent.profiles import Profile, builtin_profiles_dir, load_profile

UNIT_NAME = "edge-agent.service"
UNIT_DIR = "/etc/systemd/system"
DEFAULT_USER = "edge-agent"
DEFAULT_MEMORY_MAX = "75%"
DEFAULT_WATCHDOG_S = 30
STATE_DIRECTORY = "edge-agent"  # StateDirectory= -> /var/lib/edge-agent

# Jetson GPU nodes: L4T 32 (Nano) has /dev/nvhost-*-gpu, JetPack 5/6 (Orin) /dev/nvgpu/igpu0/* (and
# keeps some nvhost names); NVIDIA's container tooling lists the same nodes. Absent ones are skipped.
JETSON_NODES = (
    "/dev/nvmap", "/dev/nvhost-ctrl", "/dev/nvhost-ctrl-gpu", "/dev/nvhost-gpu", "/dev/nvhost-as-gpu",
    "/dev/nvhost-tsg-gpu", "/dev/nvhost-prof-gpu", "/dev/nvhost-dbg-gpu", "/dev/nvhost-sched-gpu",
    "/dev/nvgpu/igpu0/ctrl", "/dev/nvgpu/igpu0/as", "/dev/nvgpu/igpu0/channel", "/dev/nvgpu/igpu0/tsg",
    "/dev/nvgpu/igpu0/prof", "/dev/nvgpu/igpu0/sched", "/dev/nvgpu/igpu0/nvsched",
)
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
# serial device node prefix -> /proc/devices group
_SERIAL_CLASSES = (("/dev/ttyUSB", "ttyUSB"), ("/dev/ttyACM", "ttyACM"), ("/dev/rfcomm", "rfcomm"),
                   ("/dev/ttyAMA", "ttyAMA"), ("/dev/ttyS", "ttyS"))
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
_MEMORY_RE = re.compile(r"(\d+(\.\d+)?[KMGT]?|\d{1,3}(\.\d+)?%|infinity)")


@dataclass(frozen=True)
class DeviceRule:
    """One ``DeviceAllow=`` line: the node or ``char-<group>``, access (r, rw), why, and the Unix group."""

    spec: str
    access: str
    reason: str
    group: str | None = None


class Step(NamedTuple):
    """One thing ``install_service`` does: ``write`` (target = path, content = text), ``keep`` (an existing
    file, content = why), ``run`` (target = the command), ``note`` (content = advice for the user)."""

    action: str
    target: str
    content: str


# --------------------------------------------------------------------------------------------------
# what the profile and the config need


def _is_raspberry_pi(profile: Profile) -> bool:
    return profile.power.source == "pmic" or "raspberry pi" in profile.device.description.lower()


def _serial_rules(port: str, what: str) -> list[DeviceRule]:
    if port:
        for prefix, cls in _SERIAL_CLASSES:
            if port.startswith(prefix):
                return [DeviceRule(f"char-{cls}", "rw", f"{what} on {port}", "dialout")]
        if port.startswith("/dev/"):
            return [DeviceRule(port, "rw", f"{what} on {port}", "dialout")]
        return []  # a pyserial URL (rfc2217://, socket://): network, not a device
    return [DeviceRule(f"char-{cls}", "rw", f"{what} (port not configured)", "dialout")
            for cls in ("ttyUSB", "ttyACM", "rfcomm")]


def _source_rules(source: str) -> list[DeviceRule]:
    if source.startswith("camera:"):
        return [DeviceRule("char-video4linux", "rw", f"camera source {source}", "video")]
    if source.startswith("serial:"):
        port = source[len("serial:"):].split("?", 1)[0]
        return _serial_rules(port, "serial source")
    return []


def device_rules(profile: Profile, config: AgentConfig | None = None) -> list[DeviceRule]:
    """The ``DeviceAllow`` rules the agent needs for ``profile`` and the config's source and power source."""
    rt = profile.runtime
    rules: list[DeviceRule] = []
    if "edgetpu" in rt.delegates:
        dev = rt.edgetpu_device
        if dev == "" or dev.startswith("pci"):
            n = dev.split(":", 1)[1] if dev.startswith("pci:") else "0"
            rules.append(DeviceRule(f"/dev/apex_{n}", "rw", "Edge TPU on PCIe", "apex"))
        if dev == "" or dev.startswith("usb"):
            rules.append(DeviceRule("char-usb_device", "rw", "Edge TPU on USB (libusb, /dev/bus/usb)", "plugdev"))
    if "gpu" in rt.delegates:
        rules.append(DeviceRule("char-drm", "rw", "LiteRT GPU delegate (OpenCL/OpenGL ES)", "render"))
    if any(p in rt.providers for p in _GPU_PROVIDERS):
        if profile.device.arch == "aarch64":
            rules += [DeviceRule(n, "rw", "Jetson GPU (CUDA / TensorRT)", "video") for n in JETSON_NODES]
        else:
            rules.append(DeviceRule("char-nvidia*", "rw", "NVIDIA GPU (CUDA / TensorRT)"))
    if _is_raspberry_pi(profile):
        rules.append(DeviceRule("/dev/vcio", "rw", "vcgencmd (get_throttled, PMIC)", "video"))
    power = (config.power if config is not None and config.power else "") or profile.power.source
    if power.startswith("serial:"):
        port = (config.power_port if config is not None and config.power_port else "") or profile.power.serial_port
        rules += _serial_rules(port, "USB power meter")
    if config is not None:
        rules += _source_rules(config.source)
    seen: set[str] = set()
    return [r for r in rules if not (r.spec in seen or seen.add(r.spec))]  # type: ignore[func-returns-value]


def needs_netlink(profile: Profile) -> bool:
    """libusb (the Edge TPU on USB) watches hot-plug events on a netlink socket."""
    return "edgetpu" in profile.runtime.delegates and not profile.runtime.edgetpu_device.startswith("pci")


def jit_runtime(profile: Profile) -> bool:
    """True when the runtime compiles code at run time (GPU drivers), so MemoryDenyWriteExecute must stay off."""
    return "gpu" in profile.runtime.delegates or any(p in profile.runtime.providers for p in _GPU_PROVIDERS)


# --------------------------------------------------------------------------------------------------
# the unit


def _quote(arg: str) -> str:
    """One ExecStart= argument: specifiers (%) and variables ($) escaped, quoted when needed."""
    s = arg.replace("%", "%%").replace("$", "$$")
    if re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _under(path: str, folder: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


def _under_home(path: str) -> bool:
    return any(_under(path, h) for h in ("/home", "/root", "/run/user"))


def check_user(user: str) -> str:
    if not _USER_RE.fullmatch(user):
        raise InputError(f"user name {user!r} is not a valid system user name",
                         hint="lower-case letters, digits, '-' and '_', starting with a letter (e.g. edge-agent)")
    return user


def render_unit(profile: Profile, *, user: str = DEFAULT_USER,
                config_path: str | os.PathLike = DEFAULT_CONFIG_PATH, exec_path: str | os.PathLike,
                memory_max: str = DEFAULT_MEMORY_MAX,
                config: AgentConfig | None = None, watchdog_s: int = DEFAULT_WATCHDOG_S) -> str:
    """The text of ``edge-agent.service`` for ``profile`` (and the config's state folder, source, power)."""
    check_user(user)
    exec_path, config_path = str(exec_path), str(config_path)
    for what, p in (("the edge-agent executable", exec_path), ("the config path", config_path)):
        if not os.path.isabs(p):
            raise InputError(f"{what} {p} must be an absolute path", hint="systemd needs absolute paths")
    if not _MEMORY_RE.fullmatch(memory_max):
        raise InputError(f"memory limit {memory_max!r} is not a size systemd reads",
                         hint="e.g. 512M, 2G, 75% (of the board's RAM) or infinity")
    if watchdog_s < 1:
        raise InputError(f"the watchdog interval must be at least 1 s, got {watchdog_s}")
    cfg = config if config is not None else AgentConfig(profile=profile.name)
    rules = device_rules(profile, cfg)
    families = "AF_UNIX AF_INET AF_INET6" + (" AF_NETLINK" if needs_netlink(profile) else "")
    writable = [cfg.state_dir]
    for extra in (profile.runtime.trt_cache_dir, cfg.store.inboxes[0] if cfg.store.inboxes else ""):
        if extra and not any(_under(extra, w) for w in writable):
            writable.append(extra)
    slow_start = any(p == "TensorrtExecutionProvider" for p in profile.runtime.providers)
    home_exec = _under_home(exec_path)

    lines = [
        f"# {UNIT_DIR}/{UNIT_NAME}: written by `edge-agent install-service` (edgekit {__version__}) for the",
        f"# device profile {profile.name}. The DeviceAllow= lines follow the profile and the config's source and",
        "# power source: run install-service again after changing those (the config file is kept).",
        "[Unit]",
        f"Description=edgekit device agent (profile {profile.name})",
        "After=network.target",
        "StartLimitIntervalSec=10min",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={_quote(exec_path)} run --config {_quote(config_path)}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"User={user}",
        "Restart=on-failure",
        "RestartSec=10s",
        "# a TensorRT engine is built on first start and can take minutes" if slow_start else
        "# verify + unpack + load + smoke test of the active model",
        f"TimeoutStartSec={'30min' if slow_start else '5min'}",
        "# SIGTERM: finish the current inference, flush the spool, publish offline, exit 0",
        "TimeoutStopSec=30s",
        "# WATCHDOG=1 comes from the inference loop between inferences: only a hung runtime misses it",
        f"WatchdogSec={watchdog_s}s",
        f"MemoryMax={memory_max}",
        "SyslogIdentifier=edge-agent",
        "",
        "# state: the model store, the spool, the inbox; everything else is read-only",
        f"StateDirectory={STATE_DIRECTORY}",
        "StateDirectoryMode=0750",
        *(f"ReadWritePaths={'-' if p != DEFAULT_STATE_DIR else ''}{p}" for p in writable),
        "# files the agent writes (deploy results in the inbox) are readable by its group, e.g. the ssh push user",
        "UMask=0027",
        "ProtectSystem=strict",
        *(("# the executable lives under a home folder: visible read-only (better: install into /opt)",
           "ProtectHome=read-only") if home_exec else ("ProtectHome=yes",)),
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "# /sys stays readable (power sensors, thermal zones, cpufreq); /proc/sys, /sys are read-only",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "PrivateIPC=yes",
        *(("# the GPU driver compiles kernels at run time (W+X memory)", "MemoryDenyWriteExecute=no")
          if jit_runtime(profile) else
          ("# onnxruntime (CPU) and LiteRT/XNNPACK generate no code at run time (tests/test_systemd_unit.py)",
           "MemoryDenyWriteExecute=yes")),
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
        "SystemCallFilter=~@privileged",
        "SystemCallErrorNumber=EPERM",
        *(("# AF_NETLINK: libusb hot-plug events (Edge TPU on USB)",) if needs_netlink(profile) else ()),
        f"RestrictAddressFamilies={families}",
        "",
        "# devices: only what the profile and the config need",
        "DevicePolicy=closed",
    ]
    if rules:
        lines.append("PrivateDevices=no")
        for r in rules:
            group = f" (group {r.group})" if r.group else ""
            lines += [f"# {r.reason}{group}", f"DeviceAllow={r.spec} {r.access}"]
    else:
        lines.append("PrivateDevices=yes")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# installing


def _join(root: Path, path: str | os.PathLike) -> Path:
    p = PurePosixPath(str(path))
    if not p.is_absolute():
        raise InputError(f"{path} must be an absolute path")
    return root / p.relative_to("/")


def default_exec_path() -> Path:
    """The ``edge-agent`` beside the running Python (its venv), else the one on PATH."""
    import shutil

    beside = Path(sys.executable).parent / "edge-agent"
    if beside.is_file():
        return beside.absolute()
    found = shutil.which("edge-agent")
    if found:
        return Path(found).absolute()
    raise InputError("cannot find the edge-agent executable", hint="pass --exec PATH (absolute)")


def _write_atomic(path: Path, text: str, mode: int) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except PermissionError as e:
        raise InputError(f"cannot write {path}: {e.strerror}",
                         hint="run as root (sudo edge-agent install-service …), or pass --root DIR") from e
    except OSError as e:
        raise EdgekitError(f"cannot write {path}: {e.strerror or e}") from e


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


def _run(cmd: Sequence[str]) -> None:
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except OSError as e:
        raise EdgekitError(f"cannot run {cmd[0]}: {e.strerror}",
                           hint="install-service needs systemd and the shadow utilities (useradd)") from e
    if r.returncode != 0:
        raise EdgekitError(f"`{shlex.join(cmd)}` failed (exit {r.returncode}): {r.stderr.strip()}",
                           hint="fix the cause and run install-service again (it is idempotent)")


def install_service(root: str | os.PathLike = "/", *, dry_run: bool = False, user: str = DEFAULT_USER,
                    config: str | os.PathLike = DEFAULT_CONFIG_PATH, profile: Profile | str | None = None,
                    profiles_dir: str | None = None, exec_path: str | os.PathLike | None = None,
                    memory_max: str = DEFAULT_MEMORY_MAX, watchdog_s: int = DEFAULT_WATCHDOG_S,
                    enable: bool | None = None,
                    runner: Callable[[Sequence[str]], None] = _run) -> list[Step]:
    """Write the unit and (when absent) the config under ``root``; with ``root`` "/" also create the user,
    its state folder and inbox, and enable the service. Returns the steps (done, or only planned with
    ``dry_run``).

    ``profile`` (a Profile, name or path) defaults to the existing config's ``profile``. ``enable``
    (default: ``root`` is "/") runs the system commands through ``runner``.
    """
    check_user(user)
    root_path = Path(root)
    enable = (root_path.resolve() == Path("/")) if enable is None else enable
    config_file = _join(root_path, config)
    steps: list[Step] = []
    if config_file.is_file():
        from edge_agent.config import load_config

        cfg = load_config(config_file)
        config_text = None
        steps.append(Step("keep", str(config_file), "exists: kept as it is"))
    else:
        cfg = None
        config_text = ""
    if isinstance(profile, Profile):
        prof = profile
    else:
        name = profile or (cfg.profile if cfg is not None else "")
        if not name:
            raise InputError(f"install-service needs the device profile: {config_file} names none",
                             hint="pass --profile NAME (rpi4, rpi5, coral-usb, coral-devboard, jetson-nano, "
                                  "jetson-orin-nano, x86-64) or a path to a profile .toml")
        prof = load_profile(name, profiles_dir)
    if config_text is not None:
        config_text = default_config_text(_config_profile_ref(prof))
        cfg = parse_config(_toml_loads(config_text), str(config))
    assert cfg is not None
    if config_text is None and cfg.profile and cfg.profile not in (prof.name, prof.source_file):
        steps.append(Step("note", "", f"{config_file} names profile {cfg.profile!r}, the unit is rendered for "
                                      f"{prof.name!r}: make them agree"))
    exe = Path(exec_path) if exec_path is not None else default_exec_path()
    unit_text = render_unit(prof, user=user, config_path=config, exec_path=exe, memory_max=memory_max,
                            config=cfg, watchdog_s=watchdog_s)
    unit_file = _join(root_path, f"{UNIT_DIR}/{UNIT_NAME}")
    steps.insert(0, Step("write", str(unit_file), unit_text))
    if config_text is not None:
        steps.append(Step("write", str(config_file), config_text))
    if _under_home(str(exe)):
        steps.append(Step("note", "", f"{exe} is under a home folder: the unit makes homes read-only instead of "
                                      "hiding them; a venv under /opt keeps ProtectHome=yes"))
    rules = device_rules(prof, cfg)
    groups = sorted({r.group for r in rules if r.group})
    commands: list[list[str]] = []
    if enable:
        if not _user_exists(user):
            commands.append(["useradd", "--system", "--user-group", "--home-dir", DEFAULT_STATE_DIR,
                             "--no-create-home", "--shell", "/usr/sbin/nologin", "--comment",
                             "edgekit device agent", user])
        present = [g for g in groups if _group_exists(g)]
        if present:
            commands.append(["usermod", "--append", "--groups", ",".join(present), user])
        for g in groups:
            if g not in present:
                steps.append(Step("note", "", f"group {g} does not exist: the device's udev rule decides who may "
                                              "open it (install the board's driver package first)"))
        commands.append(["install", "-d", "-m", "0750", "-o", user, "-g", user,
                         str(_join(root_path, cfg.state_dir))])
        if cfg.store.inboxes:
            commands.append(["install", "-d", "-m", "2770", "-o", user, "-g", user,
                             str(_join(root_path, cfg.store.inboxes[0]))])
    has_key = _join(root_path, cfg.pubkey).is_file()
    if enable:
        # without the key the service cannot start: enable it, start it once the key is there
        commands += [["systemctl", "daemon-reload"],
                     ["systemctl", "enable", *(("--now",) if has_key else ()), UNIT_NAME]]
    steps += [Step("run", shlex.join(c), "") for c in commands]
    if enable and cfg.store.inboxes:
        steps.append(Step("note", "", f"`edgekit push ssh://USER@device` writes into {cfg.store.inboxes[0]}: add "
                                      f"that user to the group {user} (usermod -aG {user} USER)"))
    if not has_key:
        steps.append(Step("note", "", f"install the host's public signing key as {cfg.pubkey} (the agent refuses "
                                      "to serve the model store without it)"
                                      + (f", then: systemctl start {UNIT_NAME}" if enable else "")))
    if not enable:
        steps.append(Step("note", "", f"files written under {root_path}; nothing enabled (enable on the device: "
                                      f"systemctl enable --now {UNIT_NAME})"))
    if dry_run:
        return steps
    for step in steps:
        if step.action == "write":
            _write_atomic(Path(step.target), step.content, 0o644)
    for c in commands:
        runner(c)
    return steps


def _config_profile_ref(profile: Profile) -> str:
    """How the config names the profile: its name when it ships with edgekit, else its file's path (the
    service has no --profiles-dir)."""
    src = Path(profile.source_file)
    if src.parent.resolve() == builtin_profiles_dir().resolve():
        return profile.name
    return str(src.resolve())


def _toml_loads(text: str) -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib.loads(text)
