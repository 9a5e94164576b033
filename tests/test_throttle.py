"""edge_agent.throttle: cpufreq against a fake /sys/devices/system/cpu tree, `vcgencmd get_throttled` and
`nvpmodel -q` parsed from their documented output and run as fake commands (injected and on PATH), and the
monitor's throttled / not throttled / unknown decision."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from edge_agent.thermal import ThermalReader
from edge_agent.throttle import (
    CpuFreqReader,
    NvpmodelQuery,
    PowerMode,
    ThrottleMonitor,
    ThrottleState,
    VcgencmdThrottle,
    parse_get_throttled,
    parse_nvpmodel,
)
from tests.fakes_sysfs import write

# Outputs as the tools print them (Raspberry Pi documentation, "vcgencmd" get_throttled; NVIDIA Jetson
# Linux Developer Guide, "Power Management", nvpmodel -q). 0x50005 = under-voltage and throttled now, and
# both have occurred since boot.
THROTTLED_NONE = "throttled=0x0\n"
THROTTLED_UV = "throttled=0x50005\n"
NVPMODEL_Q = "NV Power Mode: MAXN\n0\n"
NVPMODEL_Q_WITH_FAN = "NV Fan Mode:quiet\nNV Power Mode: 15W\n2\n"
NVPMODEL_Q_WARN = "NVPM WARN: fan mode is not set!\nNV Power Mode: MODE_10W\n1\n"


def fake_command(folder: Path, name: str, subcommand: str, output_file: Path) -> Path:
    """An executable ``name`` that prints ``output_file`` for ``subcommand`` and fails for anything else."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"""#!/bin/sh
if [ "$1" != "{subcommand}" ]; then echo "error=2 error_msg=\\"Invalid arguments\\"" >&2; exit 2; fi
cat "{output_file}"
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def fake_vcgencmd(tmp_path: Path, output: str) -> tuple[Path, Path]:
    """(script, the file it prints: rewrite it to change the next answer)."""
    out = tmp_path / "get_throttled.txt"
    out.write_text(output)
    return fake_command(tmp_path / "bin", "vcgencmd", "get_throttled", out), out


def cpufreq_tree(root: Path, cores: dict[int, tuple[int, int] | None]) -> Path:
    """<root>/devices/system/cpu/cpuN/cpufreq/{scaling_cur_freq,scaling_max_freq} in kHz; None: no cpufreq."""
    base = root / "devices" / "system" / "cpu"
    for n, freqs in cores.items():
        (base / f"cpu{n}").mkdir(parents=True, exist_ok=True)
        write(base / f"cpu{n}" / "online", 1)
        if freqs is not None:
            write(base / f"cpu{n}" / "cpufreq" / "scaling_cur_freq", freqs[0])
            write(base / f"cpu{n}" / "cpufreq" / "scaling_max_freq", freqs[1])
            write(base / f"cpu{n}" / "cpufreq" / "cpuinfo_max_freq", freqs[1])
    write(base / "cpufreq" / "policy0" / "scaling_cur_freq", 1)  # not a core
    write(base / "cpuidle" / "current_driver", "psci_idle")  # not a core
    write(base / "online", "0-3")
    return base


# --------------------------------------------------------------------------------------------------
# get_throttled


def test_get_throttled_zero() -> None:
    s = parse_get_throttled(THROTTLED_NONE)
    assert s == ThrottleState(0)
    assert s.now == () and s.occurred == () and s.active is False
    assert s.to_dict() == {"value": "0x0", "now": [], "occurred": []}


def test_get_throttled_undervoltage_now_and_since_boot() -> None:
    s = parse_get_throttled(THROTTLED_UV)
    assert s.value == 0x50005
    assert s.now == ("under_voltage", "throttled")
    assert s.occurred == ("under_voltage", "throttled")
    assert s.active is True


@pytest.mark.parametrize("value, now, occurred", [
    (0x1, ("under_voltage",), ()),
    (0x2, ("arm_freq_capped",), ()),
    (0x4, ("throttled",), ()),
    (0x8, ("soft_temp_limit",), ()),
    (0x10000, (), ("under_voltage",)),
    (0x20000, (), ("arm_freq_capped",)),
    (0x40000, (), ("throttled",)),
    (0x80000, (), ("soft_temp_limit",)),
    (0xF000F, ("under_voltage", "arm_freq_capped", "throttled", "soft_temp_limit"),
     ("under_voltage", "arm_freq_capped", "throttled", "soft_temp_limit")),
])
def test_every_documented_bit(value: int, now: tuple[str, ...], occurred: tuple[str, ...]) -> None:
    s = parse_get_throttled(f"throttled={value:#x}\n")
    assert (s.now, s.occurred, s.active) == (now, occurred, bool(now))


@pytest.mark.parametrize("text", ["", "throttled=\n", "error=1 error_msg=\"Command not registered\"\n",
                                  "throttled=0xZZ\n", "temp=48.3'C\n"])
def test_get_throttled_garbage_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="throttled=0x"):
        parse_get_throttled(text)


# --------------------------------------------------------------------------------------------------
# nvpmodel -q


@pytest.mark.parametrize("text, mode", [(NVPMODEL_Q, PowerMode("MAXN", 0)),
                                        (NVPMODEL_Q_WITH_FAN, PowerMode("15W", 2)),
                                        (NVPMODEL_Q_WARN, PowerMode("MODE_10W", 1)),
                                        ("NV Power Mode: MAXN\n", PowerMode("MAXN", None))])
def test_nvpmodel_output(text: str, mode: PowerMode) -> None:
    assert parse_nvpmodel(text) == mode


def test_nvpmodel_without_a_mode_line() -> None:
    with pytest.raises(ValueError, match="NV Power Mode"):
        parse_nvpmodel("nvpmodel: command failed\n")


def test_nvpmodel_as_a_fake_command(tmp_path: Path) -> None:
    (tmp_path / "q.txt").write_text(NVPMODEL_Q)
    q = NvpmodelQuery(str(fake_command(tmp_path / "bin", "nvpmodel", "-q", tmp_path / "q.txt")))
    assert q.available and q.read() == PowerMode("MAXN", 0)
    assert NvpmodelQuery(str(tmp_path / "nope")).read() is None


# --------------------------------------------------------------------------------------------------
# cpufreq


def test_cpufreq_mean_of_the_cores_in_mhz(tmp_path: Path) -> None:
    cpufreq_tree(tmp_path, {0: (1_500_000, 1_800_000), 1: (600_000, 1_800_000), 2: None, 10: (900_000, 2_400_000)})
    reader = CpuFreqReader(tmp_path)
    assert [name for name, _, _ in reader.cores] == ["cpu0", "cpu1", "cpu10"]  # cpu2 has no cpufreq
    reading = reader.read()
    assert reading is not None
    assert reading.cur_mhz == {"cpu0": 1500.0, "cpu1": 600.0, "cpu10": 900.0}
    assert reading.mean_mhz == pytest.approx(1000.0)
    assert reading.top_max_mhz == 2400.0
    assert reader.mean_mhz() == pytest.approx(1000.0)


def test_cpufreq_reads_many_and_skips_a_core_gone_offline(tmp_path: Path) -> None:
    base = cpufreq_tree(tmp_path, {0: (1_500_000, 1_800_000), 1: (600_000, 1_800_000)})
    reader = CpuFreqReader(tmp_path)
    write(base / "cpu0" / "cpufreq" / "scaling_cur_freq", 700_000)
    (base / "cpu1" / "cpufreq" / "scaling_cur_freq").unlink()  # hot-unplugged
    assert reader.mean_mhz() == 700.0


def test_no_cpufreq_reads_as_none(tmp_path: Path) -> None:
    assert CpuFreqReader(tmp_path).read() is None
    assert CpuFreqReader(tmp_path / "missing").mean_mhz() is None


# --------------------------------------------------------------------------------------------------
# vcgencmd as a command


def test_vcgencmd_injected_path(tmp_path: Path) -> None:
    script, out = fake_vcgencmd(tmp_path, THROTTLED_UV)
    v = VcgencmdThrottle(str(script))
    assert v.available and v.describe() == f"{script} get_throttled"
    assert v.read() == ThrottleState(0x50005)
    out.write_text(THROTTLED_NONE)
    assert v.read() == ThrottleState(0)


def test_vcgencmd_found_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    script, _ = fake_vcgencmd(tmp_path, THROTTLED_NONE)
    monkeypatch.setenv("PATH", f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    v = VcgencmdThrottle()
    assert v.path == str(script) and v.read() == ThrottleState(0)


def test_absent_vcgencmd_is_no_reader(tmp_path: Path) -> None:
    v = VcgencmdThrottle(str(tmp_path / "bin" / "vcgencmd"))
    assert not v.available and v.read() is None


def test_failing_or_garbled_vcgencmd_reads_as_unknown_and_warns_once(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "vcgencmd"
    script.write_text("#!/bin/sh\necho \"VCHI initialization failed\" >&2\nexit 255\n")
    script.chmod(0o755)
    v = VcgencmdThrottle(str(script))
    with caplog.at_level(logging.WARNING, logger="edge_agent.throttle"):
        assert v.read() is None and v.read() is None
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "exited with 255: VCHI initialization failed" in warnings[0]
    script.write_text("#!/bin/sh\necho 'temp=48.3'\n")
    with caplog.at_level(logging.WARNING, logger="edge_agent.throttle"):
        assert v.read() is None
    assert "no 'throttled=0x...' line" in caplog.records[-1].getMessage()


# --------------------------------------------------------------------------------------------------
# the monitor


def thermal(root: Path, zones: dict[str, int]) -> Path:
    base = root / "class" / "thermal"
    for n, (kind, millic) in enumerate(zones.items()):
        write(base / f"thermal_zone{n}" / "type", kind)
        write(base / f"thermal_zone{n}" / "temp", millic)
    return base


def test_monitor_temperature_against_throttle_c(tmp_path: Path) -> None:
    base = thermal(tmp_path, {"cpu-thermal": 79_500, "gpu-thermal": 99_000})
    m = ThrottleMonitor(ThermalReader(base, ["cpu-thermal"]), CpuFreqReader(tmp_path), None, 80.0)
    r = m.read()
    assert r.temps == {"cpu-thermal": 79.5} and r.temp_c == 79.5  # gpu-thermal is not a profile zone
    assert r.throttled is False and r.reasons == () and r.cpu_mhz is None
    write(base / "thermal_zone0" / "temp", 80_000)
    r = m.read()
    assert r.throttled is True and r.reasons == ("cpu-thermal at 80 C >= 80 C",)


def test_monitor_with_nothing_readable_is_unknown(tmp_path: Path) -> None:
    m = ThrottleMonitor(ThermalReader(tmp_path / "none"), CpuFreqReader(tmp_path),
                        VcgencmdThrottle(str(tmp_path / "nope")), 80.0)
    assert m.vcgencmd is None
    r = m.read()
    assert r.throttled is None and r.temp_c is None and r.cpu_mhz is None


def test_monitor_temperatures_without_a_throttle_temperature_are_unknown(tmp_path: Path) -> None:
    base = thermal(tmp_path, {"cpu-thermal": 99_000})
    m = ThrottleMonitor(ThermalReader(base), CpuFreqReader(tmp_path), None, None)  # no profile
    r = m.read()
    assert r.temp_c == 99.0 and r.throttled is None


def test_monitor_get_throttled_now_bits(tmp_path: Path) -> None:
    script, out = fake_vcgencmd(tmp_path, THROTTLED_NONE)
    m = ThrottleMonitor(ThermalReader(tmp_path / "none"), CpuFreqReader(tmp_path), VcgencmdThrottle(str(script)),
                        None)
    r = m.read()
    assert r.throttled is False and r.state == ThrottleState(0)
    out.write_text(THROTTLED_UV)
    r = m.read()
    assert r.throttled is True
    assert r.reasons == ("under_voltage (get_throttled)", "throttled (get_throttled)",  # now
                         "under_voltage occurred (get_throttled)", "throttled occurred (get_throttled)")  # new


def test_monitor_counts_occurred_bits_that_appear_between_readings(tmp_path: Path) -> None:
    script, out = fake_vcgencmd(tmp_path, "throttled=0x50000\n")  # happened before we started: not ours
    m = ThrottleMonitor(ThermalReader(tmp_path / "none"), CpuFreqReader(tmp_path), VcgencmdThrottle(str(script)),
                        None)
    assert m.read().throttled is False
    assert m.read().throttled is False  # still the same history
    out.write_text("throttled=0xd0000\n")  # soft temperature limit hit (and cleared) since the last reading
    r = m.read()
    assert r.throttled is True and r.reasons == ("soft_temp_limit occurred (get_throttled)",)
    assert m.read().throttled is False  # reported once


def test_monitor_cpu_mhz(tmp_path: Path) -> None:
    cpufreq_tree(tmp_path, {0: (1_200_000, 1_800_000), 1: (1_800_000, 1_800_000)})
    m = ThrottleMonitor(ThermalReader(tmp_path / "none"), CpuFreqReader(tmp_path), None, 80.0)
    assert m.read().cpu_mhz == 1500.0
    assert m.sources() == ["cpufreq of 2 cores"]
