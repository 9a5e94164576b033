"""CPU frequency and throttling: cpufreq from an injected sysfs root, ``vcgencmd`` and ``nvpmodel`` as commands.

cpufreq (Documentation/admin-guide/pm/cpufreq.rst)::

    <root>/devices/system/cpu/cpuN/cpufreq/scaling_cur_freq   current frequency, kHz
    <root>/devices/system/cpu/cpuN/cpufreq/scaling_max_freq   the governor's upper limit, kHz

Raspberry Pi firmware, ``vcgencmd get_throttled`` prints one line, ``throttled=0x50005``: a bit mask
(Raspberry Pi documentation, "vcgencmd", get_throttled)::

    bit  0  under-voltage detected now          bit 16  under-voltage has occurred (since boot)
    bit  1  arm frequency capped now            bit 17  arm frequency capping has occurred
    bit  2  currently throttled                 bit 18  throttling has occurred
    bit  3  soft temperature limit active now   bit 19  soft temperature limit has occurred

NVIDIA Jetson, ``nvpmodel -q`` prints the power mode's name and id (some JetPacks print a fan-mode or a
``NVPM WARN`` line first)::

    NV Power Mode: MAXN
    0

Everything is discovered once and read many times. A command that is not installed gives no reader (the
figure is then ``None``), never an error: these are optional on every board. A command that is installed
but fails or prints something unexpected is logged (once per distinct problem) and read as ``None``.

``ThrottleMonitor`` combines the thermal zones, cpufreq and ``get_throttled`` into one ``Reading``:
``throttled`` is true when a "now" bit is set, when a "has occurred" bit appeared since the previous
reading, or when a thermal zone is at or above the profile's ``throttle_c``; false when at least one of
those could be read and none says so; ``None`` when none could be read.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.thermal import ThermalReader

log = logging.getLogger(__name__)

SYSFS_ROOT = Path("/sys")
CPU_DIR = "devices/system/cpu"
COMMAND_TIMEOUT_S = 2.0

NOW_BITS: dict[int, str] = {0: "under_voltage", 1: "arm_freq_capped", 2: "throttled", 3: "soft_temp_limit"}
OCCURRED_SHIFT = 16  # bit 16 + k says "bit k has occurred since boot"
_NOW_MASK = sum(1 << b for b in NOW_BITS)
_OCCURRED_MASK = _NOW_MASK << OCCURRED_SHIFT

_THROTTLED_LINE = re.compile(r"^\s*throttled=(0x[0-9a-fA-F]+|\d+)\s*$")
_POWER_MODE_LINE = re.compile(r"^\s*NV Power Mode:\s*(?P<name>\S.*?)\s*$")


# --------------------------------------------------------------------------------------------------
# cpufreq


def _cpu_index(path: Path) -> int:
    m = re.fullmatch(r"cpu(\d+)", path.name)
    return int(m.group(1)) if m else 1 << 30


@dataclass(frozen=True)
class CpuFreq:
    """One cpufreq reading: MHz per core (readable cores only)."""

    cur_mhz: dict[str, float]
    max_mhz: dict[str, float]

    @property
    def mean_mhz(self) -> float | None:
        """The mean current frequency across the cores read (None: none readable)."""
        return sum(self.cur_mhz.values()) / len(self.cur_mhz) if self.cur_mhz else None

    @property
    def top_max_mhz(self) -> float | None:
        return max(self.max_mhz.values()) if self.max_mhz else None


class CpuFreqReader:
    """``scaling_cur_freq`` / ``scaling_max_freq`` of every core under ``<sysfs_root>/devices/system/cpu``.

    Cores are found once; an offline core (its files vanish or answer an error) is left out of a reading.
    A machine without cpufreq (containers, most VMs) has no cores and reads as ``None``.
    """

    def __init__(self, sysfs_root: Path = SYSFS_ROOT) -> None:
        base = Path(sysfs_root) / CPU_DIR
        cpus = sorted((d for d in base.glob("cpu[0-9]*") if _cpu_index(d) < 1 << 30), key=_cpu_index)
        self.cores: list[tuple[str, Path, Path]] = [
            (d.name, d / "cpufreq" / "scaling_cur_freq", d / "cpufreq" / "scaling_max_freq")
            for d in cpus if (d / "cpufreq" / "scaling_cur_freq").exists()]

    @staticmethod
    def _khz(path: Path) -> float | None:
        try:
            return int(path.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            return None

    def read(self) -> CpuFreq | None:
        cur: dict[str, float] = {}
        top: dict[str, float] = {}
        for name, cur_file, max_file in self.cores:
            mhz = self._khz(cur_file)
            if mhz is None:
                continue
            cur[name] = mhz
            limit = self._khz(max_file)
            if limit is not None:
                top[name] = limit
        return CpuFreq(cur, top) if cur else None

    def mean_mhz(self) -> float | None:
        reading = self.read()
        return None if reading is None else reading.mean_mhz


# --------------------------------------------------------------------------------------------------
# vcgencmd get_throttled


@dataclass(frozen=True)
class ThrottleState:
    """A decoded ``get_throttled`` mask."""

    value: int

    @property
    def now(self) -> tuple[str, ...]:
        """Names of the conditions active now (bits 0-3)."""
        return tuple(name for bit, name in NOW_BITS.items() if self.value & (1 << bit))

    @property
    def occurred(self) -> tuple[str, ...]:
        """Names of the conditions that have occurred since boot (bits 16-19)."""
        return tuple(name for bit, name in NOW_BITS.items() if self.value & (1 << (bit + OCCURRED_SHIFT)))

    @property
    def active(self) -> bool:
        return bool(self.value & _NOW_MASK)

    @property
    def occurred_mask(self) -> int:
        return self.value & _OCCURRED_MASK

    def to_dict(self) -> dict[str, object]:
        return {"value": f"0x{self.value:x}", "now": list(self.now), "occurred": list(self.occurred)}


def parse_get_throttled(text: str) -> ThrottleState:
    """``"throttled=0x50005"`` -> ``ThrottleState(0x50005)`` (pure). Anything else is a ``ValueError``."""
    for line in text.splitlines():
        m = _THROTTLED_LINE.match(line)
        if m:
            raw = m.group(1)
            return ThrottleState(int(raw, 16) if raw.lower().startswith("0x") else int(raw))
    raise ValueError(f"no 'throttled=0x...' line in {text.strip()[:80]!r}")


# --------------------------------------------------------------------------------------------------
# nvpmodel -q


@dataclass(frozen=True)
class PowerMode:
    """A Jetson power mode: its name (``MAXN``, ``15W``) and numeric id (None when not printed)."""

    name: str
    id: int | None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "id": self.id}


def parse_nvpmodel(text: str) -> PowerMode:
    """``"NV Power Mode: MAXN\\n0"`` -> ``PowerMode("MAXN", 0)`` (pure); no mode line is a ``ValueError``.

    Lines before the mode line (``NV Fan Mode:quiet``, ``NVPM WARN ...``) are ignored; the id is the first
    line after it that is a bare integer.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _POWER_MODE_LINE.match(line)
        if m:
            mode_id = next((int(s.strip()) for s in lines[i + 1:] if s.strip().isdigit()), None)
            return PowerMode(m.group("name"), mode_id)
    raise ValueError(f"no 'NV Power Mode:' line in {text.strip()[:80]!r}")


# --------------------------------------------------------------------------------------------------
# commands


class CommandReader:
    """Runs ``<command> <args>`` on demand; the command is resolved once (``available`` False: not installed).

    A failure (timeout, non-zero exit, output the parser refuses) is logged once per distinct message and
    gives ``None``; it never raises into the caller's loop.
    """

    def __init__(self, command: str, args: Sequence[str]) -> None:
        self.requested = command
        self.args = tuple(args)
        self.path = shutil.which(command)
        self._warned: set[str] = set()

    @property
    def available(self) -> bool:
        return self.path is not None

    def describe(self) -> str:
        return " ".join((self.path or self.requested, *self.args))

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def output(self) -> str | None:
        if self.path is None:
            return None
        cmd = (self.path, *self.args)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            self._warn_once(f"`{self.describe()}` did not answer within {COMMAND_TIMEOUT_S} s; "
                            "reading it as unknown")
            return None
        except OSError as e:
            self._warn_once(f"cannot run `{self.describe()}`: {e.strerror or e}; reading it as unknown")
            return None
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
            self._warn_once(f"`{self.describe()}` exited with {done.returncode}: {said}; reading it as unknown")
            return None
        return done.stdout


class VcgencmdThrottle(CommandReader):
    """``vcgencmd get_throttled`` (Raspberry Pi)."""

    def __init__(self, command: str = "vcgencmd") -> None:
        super().__init__(command, ("get_throttled",))

    def read(self) -> ThrottleState | None:
        text = self.output()
        if text is None:
            return None
        try:
            return parse_get_throttled(text)
        except ValueError as e:
            self._warn_once(f"`{self.describe()}`: {e}; reading it as unknown")
            return None


class NvpmodelQuery(CommandReader):
    """``nvpmodel -q`` (NVIDIA Jetson)."""

    def __init__(self, command: str = "nvpmodel") -> None:
        super().__init__(command, ("-q",))

    def read(self) -> PowerMode | None:
        text = self.output()
        if text is None:
            return None
        try:
            return parse_nvpmodel(text)
        except ValueError as e:
            self._warn_once(f"`{self.describe()}`: {e}; reading it as unknown")
            return None


# --------------------------------------------------------------------------------------------------
# one reading of everything


@dataclass(frozen=True)
class Reading:
    """Temperatures, CPU frequency and throttling at one moment."""

    temps: dict[str, float]
    cpu: CpuFreq | None
    state: ThrottleState | None  # get_throttled, when vcgencmd answered
    throttled: bool | None
    reasons: tuple[str, ...] = field(default=())  # why ``throttled`` is true

    @property
    def temp_c(self) -> float | None:
        return max(self.temps.values()) if self.temps else None

    @property
    def cpu_mhz(self) -> float | None:
        return None if self.cpu is None else self.cpu.mean_mhz


class ThrottleMonitor:
    """Reads thermal zones, cpufreq and ``vcgencmd get_throttled`` together (see the module docstring).

    ``throttle_c`` is the profile's ``[thermal] throttle_c``; ``None`` (no profile) leaves temperatures out
    of the throttling decision. The first reading never counts "has occurred" bits (they may date from
    boot); later ones count a bit that appeared since the previous reading.
    """

    def __init__(self, thermal: ThermalReader, cpufreq: CpuFreqReader, vcgencmd: VcgencmdThrottle | None,
                 throttle_c: float | None) -> None:
        self.thermal = thermal
        self.cpufreq = cpufreq
        self.vcgencmd = vcgencmd if vcgencmd is not None and vcgencmd.available else None
        self.throttle_c = throttle_c
        self._prev_occurred: int | None = None

    def read(self) -> Reading:
        temps = self.thermal.read()
        cpu = self.cpufreq.read()
        state = self.vcgencmd.read() if self.vcgencmd is not None else None
        known = False
        reasons: list[str] = []
        if state is not None:
            known = True
            reasons += [f"{name} (get_throttled)" for name in state.now]
            if self._prev_occurred is not None:
                new = state.occurred_mask & ~self._prev_occurred
                reasons += [f"{name} occurred (get_throttled)" for name in ThrottleState(new).occurred]
            self._prev_occurred = state.occurred_mask
        if temps and self.throttle_c is not None:
            known = True
            reasons += [f"{label} at {c:g} C >= {self.throttle_c:g} C" for label, c in temps.items()
                        if c >= self.throttle_c]
        throttled = bool(reasons) if known else None
        return Reading(temps, cpu, state, throttled, tuple(reasons))

    def sources(self) -> list[str]:
        """What this monitor can read, for the log."""
        out = []
        if self.thermal.zones:
            out.append(f"thermal zones {', '.join(label for label, _ in self.thermal.zones)}"
                       + (f" (throttle at {self.throttle_c:g} C)" if self.throttle_c is not None else ""))
        if self.cpufreq.cores:
            out.append(f"cpufreq of {len(self.cpufreq.cores)} cores")
        if self.vcgencmd is not None:
            out.append(f"`{self.vcgencmd.describe()}`")
        return out
