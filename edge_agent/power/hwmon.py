"""Any hwmon power chip, found by name (``[power] source = "hwmon:<name>"``).

The kernel's hwmon ABI (Documentation/hwmon/sysfs-interface.rst)::

    /sys/class/hwmon/hwmonN/name            chip name, e.g. "ina219", "ina226"
    /sys/class/hwmon/hwmonN/power1_input    power, µW
    /sys/class/hwmon/hwmonN/power1_average  average power, µW (some chips only have this)
    /sys/class/hwmon/hwmonN/in1_input       voltage, mV
    /sys/class/hwmon/hwmonN/curr1_input     current, mA

``power1_input`` is preferred, then ``power1_average``, then ``in1_input`` × ``curr1_input``. The
``hwmonN`` number can change between boots, so the chip is found by its name once at open. With several
chips of that name the lowest-numbered one is used and ``note`` says so.
"""

from __future__ import annotations

import re
from pathlib import Path

from edge_agent.power.base import SourceContext, absent, read_int, read_text

KIND = "hwmon"
HWMON_DIR = "class/hwmon"


def _num(p: Path) -> int:
    m = re.fullmatch(r"hwmon(\d+)", p.name)
    return int(m.group(1)) if m else 1 << 30


def chips_by_name(root: Path, ctx: SourceContext) -> list[tuple[str, Path]]:
    """(name, folder) of every hwmon chip under ``root/class/hwmon``, in hwmonN order."""
    base = root / HWMON_DIR
    if not base.is_dir():
        return []
    out = []
    for d in sorted(base.glob("hwmon*"), key=_num):
        if (d / "name").is_file():
            out.append((read_text(d / "name", ctx, KIND), d))
    return out


class HwmonSource:
    """One hwmon chip's power, through the files chosen at open."""

    energy_counter = False

    def __init__(self, chip: str, ctx: SourceContext) -> None:
        self._ctx = ctx
        self.name = f"hwmon:{chip}"
        found = chips_by_name(ctx.sysfs_root, ctx)
        matches = [d for n, d in found if n == chip]
        base = ctx.sysfs_root / HWMON_DIR
        if not matches:
            names = ", ".join(f"{d.name}={n!r}" for n, d in found) or "none"
            raise absent(ctx, KIND, f"no hwmon chip named {chip!r} (chips present: {names})",
                         [base / "hwmon*" / "name"],
                         fix="set [power] source = \"hwmon:<name>\" to one of the names present")
        self.chip_dir = d = matches[0]
        if (d / "power1_input").exists():
            self.files: tuple[Path, ...] = (d / "power1_input",)
            how = "power1_input"
        elif (d / "power1_average").exists():
            self.files = (d / "power1_average",)
            how = "power1_average"
        elif (d / "in1_input").exists() and (d / "curr1_input").exists():
            self.files = (d / "in1_input", d / "curr1_input")
            how = "in1_input × curr1_input"
        else:
            raise absent(ctx, KIND, f"hwmon chip {chip!r} at {d} has no power reading",
                         [d / "power1_input", d / "power1_average", f"{d / 'in1_input'} + {d / 'curr1_input'}"])
        self.note = f"hwmon chip {chip!r} at {d.name} ({how})"
        if len(matches) > 1:
            self.note += f"; {len(matches)} chips have this name, the lowest-numbered is used"
        self._last: float | None = None
        self.read_w()

    def read_w(self) -> float:
        if len(self.files) == 1:
            w = read_int(self.files[0], self._ctx, KIND) / 1e6
        else:
            mv, ma = (read_int(f, self._ctx, KIND) for f in self.files)
            w = mv * ma / 1e6
        self._last = w
        return w

    def read_energy_j(self) -> float | None:
        return None

    def rails(self) -> dict[str, float]:
        return {} if self._last is None else {self.name: self._last}

    def close(self) -> None:
        self._last = None


def open_source(arg: str, ctx: SourceContext) -> HwmonSource:
    return HwmonSource(arg, ctx)
