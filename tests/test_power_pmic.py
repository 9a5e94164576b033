"""edge_agent.power.pmic: the pmic_read_adc parser on a real capture, and a fake vcgencmd on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edge_agent.errors import SourceError
from edge_agent.power import open_power_source
from edge_agent.power.pmic import PmicSource, parse_pmic_adc

# A real `vcgencmd pmic_read_adc` capture from a Raspberry Pi 5 Model B Rev 1.0 (2 GB), Raspberry Pi OS
# bookworm, four busy cores, as published in ml-energy/zeus, tests/device/machine/test_rpi.py
# (commit 09de54d90c81dac3b480212e0be76436faa62886, PMIC_OUTPUT). Kept byte for byte: leading spaces,
# channel numbers that differ between a rail's current and voltage, and the voltage-only EXT5V/BATT.
CAPTURE = """\
 3V7_WL_SW_A current(0)=0.09368929A
   3V3_SYS_A current(1)=0.08783370A
   1V8_SYS_A current(2)=0.18054710A
  DDR_VDD2_A current(3)=0.22543980A
  DDR_VDDQ_A current(4)=0.06666720A
   1V1_SYS_A current(5)=0.17566740A
    0V8_SW_A current(6)=0.37670900A
  VDD_CORE_A current(7)=6.22421000A
   3V3_DAC_A current(17)=0.00006105A
   3V3_ADC_A current(18)=0.00036630A
   0V8_AON_A current(16)=0.00305250A
      HDMI_A current(22)=0.02417580A
 3V7_WL_SW_V volt(8)=3.69977600V
   3V3_SYS_V volt(9)=3.31003300V
   1V8_SYS_V volt(10)=1.80512600V
  DDR_VDD2_V volt(11)=1.10476100V
  DDR_VDDQ_V volt(12)=0.60146460V
   1V1_SYS_V volt(13)=1.11025500V
    0V8_SW_V volt(14)=0.80146440V
  VDD_CORE_V volt(15)=0.86173300V
   3V3_DAC_V volt(20)=3.31318300V
   3V3_ADC_V volt(21)=3.30677300V
   0V8_AON_V volt(19)=0.80029220V
      HDMI_V volt(23)=5.08664000V
     EXT5V_V volt(24)=5.09066000V
      BATT_V volt(25)=0.00000000V
"""

# (A, V) per rail, read off the capture by hand
PAIRS = {
    "3V7_WL_SW": (0.09368929, 3.69977600), "3V3_SYS": (0.08783370, 3.31003300),
    "1V8_SYS": (0.18054710, 1.80512600), "DDR_VDD2": (0.22543980, 1.10476100),
    "DDR_VDDQ": (0.06666720, 0.60146460), "1V1_SYS": (0.17566740, 1.11025500),
    "0V8_SW": (0.37670900, 0.80146440), "VDD_CORE": (6.22421000, 0.86173300),
    "3V3_DAC": (0.00006105, 3.31318300), "3V3_ADC": (0.00036630, 3.30677300),
    "0V8_AON": (0.00305250, 0.80029220), "HDMI": (0.02417580, 5.08664000),
}


def test_parser_pairs_the_twelve_rails_by_name() -> None:
    reading = parse_pmic_adc(CAPTURE)
    assert set(reading.rails_w) == set(PAIRS)
    for rail, (amps, volts) in PAIRS.items():
        assert reading.rails_w[rail] == pytest.approx(amps * volts, rel=1e-12)
    assert reading.rails_w["VDD_CORE"] == pytest.approx(5.3636, abs=1e-4)  # 6.22421 A × 0.861733 V


def test_total_is_the_sum_of_v_times_i() -> None:
    reading = parse_pmic_adc(CAPTURE)
    assert reading.total_w == pytest.approx(sum(a * v for a, v in PAIRS.values()), rel=1e-12)
    assert reading.total_w == pytest.approx(7.2398, abs=1e-4)  # a loaded Pi 5, SoC side


def test_voltage_only_channels_are_unpaired_not_power() -> None:
    reading = parse_pmic_adc(CAPTURE)
    assert reading.unpaired == ["BATT", "EXT5V"]
    assert reading.volts["EXT5V"] == pytest.approx(5.09066)
    assert "EXT5V" not in reading.rails_w


def test_parser_ignores_other_lines_and_rejects_mismatched_units() -> None:
    text = ('error=1 error_msg="Command not registered"\n\n'
            "  VDD_CORE_A current(7)=2.0V\n  VDD_CORE_V volt(15)=0.8V\n")
    reading = parse_pmic_adc(text)
    assert reading.currents == {}  # "_A ... =2.0V" is not a current line
    assert reading.rails_w == {}


def _fake_vcgencmd(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "vcgencmd"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


@pytest.fixture
def vcgencmd(tmp_path: Path) -> Path:
    """A vcgencmd that prints the capture for `pmic_read_adc` and fails for anything else."""
    (tmp_path / "capture.txt").write_text(CAPTURE)
    return _fake_vcgencmd(tmp_path / "bin", f"""\
if [ "$1" != "pmic_read_adc" ]; then echo "error=2 error_msg=\\"Invalid arguments\\"" >&2; exit 2; fi
cat "{tmp_path / 'capture.txt'}"
""")


def test_source_through_the_injected_command(vcgencmd: Path, tmp_path: Path) -> None:
    src = open_power_source("pmic", vcgencmd=str(vcgencmd))
    assert isinstance(src, PmicSource)
    assert src.command == (str(vcgencmd), "pmic_read_adc")
    assert src.read_w() == pytest.approx(sum(a * v for a, v in PAIRS.values()))
    assert set(src.rails()) == set(PAIRS)
    assert "not wall power" in src.note
    # read many: every reading runs the command again
    (tmp_path / "capture.txt").write_text(
        "  VDD_CORE_A current(7)=2.00000000A\n  VDD_CORE_V volt(15)=0.80000000V\n")
    assert src.read_w() == pytest.approx(1.6)
    assert src.rails() == pytest.approx({"VDD_CORE": 1.6})


def test_command_found_on_path(vcgencmd: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{vcgencmd.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    src = open_power_source("pmic")
    assert src is not None and src.read_w() > 6.0


def test_missing_vcgencmd_names_the_command_and_the_note(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_power_source("pmic", vcgencmd=str(tmp_path / "nope" / "vcgencmd"), profile="rpi5")
    msg = str(err.value)
    assert str(tmp_path / "nope" / "vcgencmd") in msg and "firmware_notes/rpi5.md#power-measurement" in msg


def test_failing_vcgencmd_reports_what_it_said(tmp_path: Path) -> None:
    script = _fake_vcgencmd(tmp_path, 'echo "Can\'t open device file: /dev/vcio" >&2; exit 255\n')
    with pytest.raises(SourceError) as err:
        open_power_source("pmic", vcgencmd=str(script))
    msg = str(err.value)
    assert "exited with 255" in msg and "/dev/vcio" in msg and "video" in msg


def test_a_pi_without_the_pmic_command(tmp_path: Path) -> None:
    script = _fake_vcgencmd(tmp_path, "echo 'error=1 error_msg=\"Command not registered\"'\n")
    with pytest.raises(SourceError, match="printed no rail") as err:
        open_power_source("pmic", vcgencmd=str(script))
    assert "Command not registered" in str(err.value)


def test_output_going_bad_after_open_is_an_error(vcgencmd: Path, tmp_path: Path) -> None:
    src = open_power_source("pmic", vcgencmd=str(vcgencmd))
    assert src is not None
    (tmp_path / "capture.txt").write_text("     EXT5V_V volt(24)=5.09066000V\n")
    with pytest.raises(SourceError, match="no paired rail"):
        src.read_w()
