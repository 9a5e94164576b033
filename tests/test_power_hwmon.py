"""edge_agent.power.hwmon against fake /sys/class/hwmon/hwmonN trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import SourceError
from edge_agent.power import open_power_source
from tests.fakes_sysfs import hwmon_chip, write


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    hwmon_chip(tmp_path, 0, "acpitz", {"temp1_input": 27800})
    hwmon_chip(tmp_path, 1, "coretemp", {"temp1_input": 54000})
    return tmp_path


def test_power1_input_in_microwatts_is_preferred(sysfs: Path) -> None:
    hwmon_chip(sysfs, 3, "ina219", {"power1_input": 4113120, "power1_average": 9_000_000,
                                    "in1_input": 9999, "curr1_input": 9999})
    src = open_power_source("hwmon:ina219", sysfs_root=sysfs)
    assert src is not None
    assert src.name == "hwmon:ina219"
    assert src.read_w() == pytest.approx(4.11312)
    assert "power1_input" in src.note and "hwmon3" in src.note


def test_power1_average_when_there_is_no_power1_input(sysfs: Path) -> None:
    hwmon_chip(sysfs, 4, "amdgpu", {"power1_average": 42_500_000})
    src = open_power_source("hwmon:amdgpu", sysfs_root=sysfs)
    assert src is not None
    assert src.read_w() == pytest.approx(42.5)


def test_volts_times_amps_without_a_power_file(sysfs: Path) -> None:
    d = hwmon_chip(sysfs, 2, "ina226", {"in0_input": 12, "in1_input": 5016, "curr1_input": 820})
    src = open_power_source("hwmon:ina226", sysfs_root=sysfs)
    assert src is not None
    assert src.read_w() == pytest.approx(5016 * 820 / 1e6)
    assert src.rails() == pytest.approx({"hwmon:ina226": 5016 * 820 / 1e6})
    write(d / "curr1_input", 1000)
    assert src.read_w() == pytest.approx(5.016)  # read many from the files found once


def test_unknown_name_lists_the_chips_present(sysfs: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_power_source("hwmon:ina219", sysfs_root=sysfs)
    msg = str(err.value)
    assert "'ina219'" in msg and "hwmon0='acpitz'" in msg and "hwmon1='coretemp'" in msg
    assert str(sysfs / "class" / "hwmon" / "hwmon*" / "name") in msg
    assert 'source = "none"' in msg


def test_no_hwmon_folder_at_all(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="chips present: none"):
        open_power_source("hwmon:ina219", sysfs_root=tmp_path)


def test_chip_without_power_files_names_what_was_looked_for(sysfs: Path) -> None:
    d = hwmon_chip(sysfs, 5, "ina219", {"in1_input": 5000})  # a voltage but no current
    with pytest.raises(SourceError) as err:
        open_power_source("hwmon:ina219", sysfs_root=sysfs)
    assert str(d / "power1_input") in str(err.value) and str(d / "curr1_input") in str(err.value)


def test_several_chips_of_that_name_uses_the_lowest_and_says_so(sysfs: Path) -> None:
    hwmon_chip(sysfs, 12, "ina219", {"power1_input": 2_000_000})
    hwmon_chip(sysfs, 9, "ina219", {"power1_input": 1_000_000})
    src = open_power_source("hwmon:ina219", sysfs_root=sysfs)
    assert src is not None
    assert src.read_w() == pytest.approx(1.0)  # hwmon9 before hwmon12 (numeric, not text order)
    assert "2 chips" in src.note


def test_garbage_in_the_file_is_a_source_error(sysfs: Path) -> None:
    d = hwmon_chip(sysfs, 3, "ina219", {"power1_input": 1})
    src = open_power_source("hwmon:ina219", sysfs_root=sysfs)
    assert src is not None
    write(d / "power1_input", "N/A")
    with pytest.raises(SourceError, match="not an integer"):
        src.read_w()
