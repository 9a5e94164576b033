"""Fake sysfs trees for the power sources, laid out as the kernel drivers lay them out.

Each builder takes the folder that plays ``/sys`` and writes attribute files the way the kernel shows
them (one value and a newline). Values are plausible readings, not captures from a board.
"""

from __future__ import annotations

from pathlib import Path


def write(path: Path, value: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")
    return path


def ina3221_hwmon(root: Path, chip: str, hwmon: str, channels: dict[int, tuple[str, int | None, int | None]],
                  *, sum_channel: bool = True) -> Path:
    """JetPack 5/6: /sys/bus/i2c/drivers/ina3221/<chip>/hwmon/<hwmon>/.

    ``channels``: K -> (label, mV or None, mA or None); None leaves the file out (a disabled channel).
    Adds the unlabelled shunt voltages in4..in6 (µV) and, with ``sum_channel``, in7 "sum of shunt
    voltages" with curr4 (the summation current), as the mainline driver does.
    """
    d = root / "bus" / "i2c" / "drivers" / "ina3221" / chip / "hwmon" / hwmon
    write(d / "name", "ina3221")
    for k, (label, mv, ma) in channels.items():
        write(d / f"in{k}_label", label)
        if mv is not None:
            write(d / f"in{k}_input", mv)
        if ma is not None:
            write(d / f"curr{k}_input", ma)
        write(d / f"in{k + 3}_input", 2400 * k)  # shunt voltage, µV, no label
        write(d / f"shunt{k}_resistor", 5000)
    if sum_channel:
        write(d / "in7_label", "sum of shunt voltages")
        write(d / "in7_input", 7200)
        write(d / "curr4_input", 1440)
    return d


def jetson_orin_nano(root: Path) -> Path:
    """Jetson Orin Nano on JetPack 6: one INA3221 at 1-0040 with VDD_IN, VDD_CPU_GPU_CV, VDD_SOC."""
    return ina3221_hwmon(root, "1-0040", "hwmon1", {
        1: ("VDD_IN", 5072, 1320),
        2: ("VDD_CPU_GPU_CV", 5064, 312),
        3: ("VDD_SOC", 5064, 504),
    })


def ina3221_iio(root: Path, chip: str, device: str, rails: dict[int, tuple[str, int, int, int]]) -> Path:
    """JetPack 4: /sys/bus/i2c/drivers/ina3221x/<chip>/<device>/ (K -> (name, mW, mA, mV))."""
    d = root / "bus" / "i2c" / "drivers" / "ina3221x" / chip / device
    write(d / "name", "ina3221x")
    for k, (name, mw, ma, mv) in rails.items():
        write(d / f"rail_name_{k}", name)
        write(d / f"in_power{k}_input", mw)
        write(d / f"in_current{k}_input", ma)
        write(d / f"in_voltage{k}_input", mv)
        write(d / f"crit_current_limit_{k}", 32760)
    return d


def jetson_nano(root: Path) -> Path:
    """Jetson Nano on JetPack 4.6: the ina3221x at 6-0040 with POM_5V_IN, POM_5V_GPU, POM_5V_CPU."""
    return ina3221_iio(root, "6-0040", "iio:device0", {
        0: ("POM_5V_IN", 3154, 632, 4992),
        1: ("POM_5V_GPU", 79, 16, 4984),
        2: ("POM_5V_CPU", 637, 128, 4984),
    })


def hwmon_chip(root: Path, n: int, name: str, files: dict[str, object]) -> Path:
    """/sys/class/hwmon/hwmon<n>/ with ``name`` and the given attribute files."""
    d = root / "class" / "hwmon" / f"hwmon{n}"
    write(d / "name", name)
    for fname, value in files.items():
        write(d / fname, value)
    return d


def rapl(root: Path, energy_uj: int, max_range_uj: int = 262143328850, name: str = "package-0") -> Path:
    """/sys/class/powercap/intel-rapl:0/{name,energy_uj,max_energy_range_uj} (+ the dram subzone)."""
    d = root / "class" / "powercap" / "intel-rapl:0"
    write(d / "name", name)
    write(d / "energy_uj", energy_uj)
    write(d / "max_energy_range_uj", max_range_uj)
    write(d / "enabled", 1)
    sub = root / "class" / "powercap" / "intel-rapl:0:0"
    write(sub / "name", "core")
    write(sub / "energy_uj", 1234)
    write(sub / "max_energy_range_uj", max_range_uj)
    return d
