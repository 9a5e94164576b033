"""Jetson on-module INA3221 power monitor, in both layouts the kernels lay it out.

JetPack 5/6 (mainline ``ina3221`` hwmon driver)::

    /sys/bus/i2c/drivers/ina3221/<bus-addr>/hwmon/hwmonN/
        name            "ina3221"
        inK_label       rail name (K = 1..3), "NC" for a channel that is not connected
        inK_input       bus voltage, mV
        currK_input     current, mA
        in4..6_input    shunt voltages (µV, no label): not rails
        in7_label       "sum of shunt voltages" (with in7_input, curr4_input): not a rail

JetPack 4 (NVIDIA's ``ina3221x`` iio driver)::

    /sys/bus/i2c/drivers/ina3221x/<bus-addr>/iio:deviceN/
        rail_name_K         rail name (K = 0..2)
        in_powerK_input     power, mW
        in_currentK_input   current, mA
        in_voltageK_input   voltage, mV

Rails labelled ``NC`` and the summation channel are skipped. The total is the board input rail
(``VDD_IN`` on Orin/Xavier, ``POM_5V_IN`` on Nano) when there is one: the other rails are parts of it
and are never added on top. Without an input rail the total is the sum of the rails, and ``note`` says
so. Jetson Orin Nano has VDD_IN, VDD_CPU_GPU_CV, VDD_SOC; Jetson Nano has POM_5V_IN, POM_5V_GPU,
POM_5V_CPU. The ``hwmonN`` / ``iio:deviceN`` numbers change between boots, so rails are found by label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import SourceError
from edge_agent.power.base import SourceContext, absent, read_int, read_text

KIND = "ina3221"
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
HWMON_GLOB = "bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
IIO_GLOB = "bus/i2c/drivers/ina3221x/*/iio:device*"


def _index(path: Path, pattern: str) -> int:
    m = re.fullmatch(pattern, path.name)
    return int(m.group(1)) if m else -1


def is_skipped_label(label: str) -> str | None:
    """Why a channel with this label is not a rail (None: it is one)."""
    if label.strip().upper() == "NC":
        return "not connected (NC)"
    if label.strip().lower().startswith("sum of shunt"):
        return "summation channel"
    return None


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: where its figures are and how to turn them into watts."""

    label: str
    chip: str  # the i2c bus-addr folder, e.g. "1-0040"
    layout: str  # "hwmon" or "iio"
    files: tuple[Path, ...]  # hwmon: (mV, mA); iio: (mW,) or (mV, mA)

    def read_w(self, ctx: SourceContext) -> float:
        if len(self.files) == 1:
            return read_int(self.files[0], ctx, KIND) / 1000.0
        mv, ma = (read_int(f, ctx, KIND) for f in self.files)
        return mv * ma / 1e6


def _chip_of(device_dir: Path, depth: int) -> str:
    return device_dir.parents[depth].name


def discover(root: Path, ctx: SourceContext) -> tuple[list[Rail], list[str], list[Path]]:
    """(rails, skipped channels with the reason, chip folders found) under ``root`` (plays /sys)."""
    rails: list[Rail] = []
    skipped: list[str] = []
    chips: list[Path] = []
    for hw in sorted(root.glob(HWMON_GLOB)):
        name_file = hw / "name"
        if name_file.exists() and read_text(name_file, ctx, KIND) != "ina3221":
            continue
        chips.append(hw)
        chip = _chip_of(hw, 1)
        for label_file in sorted(hw.glob("in*_label"), key=lambda p: _index(p, r"in(\d+)_label")):
            k = _index(label_file, r"in(\d+)_label")
            label = read_text(label_file, ctx, KIND)
            why = is_skipped_label(label)
            if why is None and not ((hw / f"in{k}_input").exists() and (hw / f"curr{k}_input").exists()):
                why = f"no in{k}_input / curr{k}_input (channel disabled)"
            if why:
                skipped.append(f"{label_file}: {label!r} ({why})")
                continue
            rails.append(Rail(label, chip, "hwmon", (hw / f"in{k}_input", hw / f"curr{k}_input")))
    for dev in sorted(root.glob(IIO_GLOB)):
        chips.append(dev)
        chip = _chip_of(dev, 0)
        for name_file in sorted(dev.glob("rail_name_*"), key=lambda p: _index(p, r"rail_name_(\d+)")):
            k = _index(name_file, r"rail_name_(\d+)")
            label = read_text(name_file, ctx, KIND)
            why = is_skipped_label(label)
            power = dev / f"in_power{k}_input"
            volts, amps = dev / f"in_voltage{k}_input", dev / f"in_current{k}_input"
            if why is None:
                if power.exists():
                    files: tuple[Path, ...] = (power,)
                elif volts.exists() and amps.exists():
                    files = (volts, amps)
                else:
                    why = f"no in_power{k}_input"
            if why:
                skipped.append(f"{name_file}: {label!r} ({why})")
                continue
            rails.append(Rail(label, chip, "iio", files))
    return _unique_labels(rails), skipped, chips


def _unique_labels(rails: list[Rail]) -> list[Rail]:
    counts: dict[str, int] = {}
    for r in rails:
        counts[r.label] = counts.get(r.label, 0) + 1
    return [r if counts[r.label] == 1 else Rail(f"{r.label}@{r.chip}", r.chip, r.layout, r.files)
            for r in rails]


class Ina3221Source:
    """Reads the rails found once at open; ``read_w`` is the input rail, or the sum without one."""

    name = KIND
    energy_counter = False

    def __init__(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        root = ctx.sysfs_root
        self.rails_found, self.skipped, chips = discover(root, ctx)
        if not chips:
            raise absent(ctx, KIND, "no INA3221 found", [root / HWMON_GLOB, root / IIO_GLOB],
                         fix="check that the ina3221 (JetPack 5/6) or ina3221x (JetPack 4) driver is loaded")
        if not self.rails_found:
            raise SourceError(
                f"power source {KIND!r}: INA3221 found at {', '.join(map(str, chips))} but no readable rail; "
                f"skipped: {'; '.join(self.skipped) or 'nothing'}",
                hint=ctx.hint(KIND))
        labels = [r.label for r in self.rails_found]
        self.input_rail = next((r.label for r in self.rails_found if r.label in INPUT_RAILS), None)
        if self.input_rail:
            self.note = (f"{self.input_rail}: the module's input rail; the other rails "
                         f"({', '.join(x for x in labels if x != self.input_rail) or 'none'}) are parts of it "
                         "and are not added")
        else:
            self.note = (f"no input rail ({' / '.join(INPUT_RAILS)}) on this module: total = sum of "
                         f"{', '.join(labels)}; parts of the board outside these rails are not seen")
        self._last: dict[str, float] = {}
        self.read_w()

    def read_w(self) -> float:
        last = {r.label: r.read_w(self._ctx) for r in self.rails_found}
        self._last = last
        if self.input_rail:
            return last[self.input_rail]
        return sum(last.values())

    def read_energy_j(self) -> float | None:
        return None

    def rails(self) -> dict[str, float]:
        return dict(self._last)

    def close(self) -> None:
        self._last = {}


def open_source(arg: str, ctx: SourceContext) -> Ina3221Source:
    return Ina3221Source(ctx)
