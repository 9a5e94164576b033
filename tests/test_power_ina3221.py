"""edge_agent.power.ina3221 against fake /sys trees in both layouts (JetPack 5/6 hwmon, JetPack 4 iio)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.errors import SourceError
from edge_agent.power import open_power_source
from edge_agent.power.ina3221 import HWMON_GLOB, IIO_GLOB, Ina3221Source, is_skipped_label
from tests.fakes_sysfs import ina3221_hwmon, ina3221_iio, jetson_nano, jetson_orin_nano, write


def test_orin_nano_total_is_vdd_in_not_the_sum(tmp_path: Path) -> None:
    jetson_orin_nano(tmp_path)
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert isinstance(src, Ina3221Source)
    assert src.read_w() == pytest.approx(5072 * 1320 / 1e6)  # VDD_IN only: 6.695 W
    assert src.rails() == pytest.approx({
        "VDD_IN": 5072 * 1320 / 1e6, "VDD_CPU_GPU_CV": 5064 * 312 / 1e6, "VDD_SOC": 5064 * 504 / 1e6})
    assert src.input_rail == "VDD_IN"
    assert "VDD_IN" in src.note and "not added" in src.note


def test_sum_channel_and_unlabelled_shunts_are_not_rails(tmp_path: Path) -> None:
    jetson_orin_nano(tmp_path)
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    assert "sum of shunt voltages" not in src.rails()
    assert set(src.rails()) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}  # in4..in6 have no label
    assert any("summation channel" in s for s in src.skipped)


def test_nano_iio_layout_uses_in_power_mw(tmp_path: Path) -> None:
    jetson_nano(tmp_path)
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    assert src.read_w() == pytest.approx(3.154)  # POM_5V_IN in_power0_input = 3154 mW
    assert src.rails() == pytest.approx({"POM_5V_IN": 3.154, "POM_5V_GPU": 0.079, "POM_5V_CPU": 0.637})
    assert "POM_5V_IN" in src.note


def test_without_an_input_rail_total_is_the_sum_and_note_says_so(tmp_path: Path) -> None:
    # An AGX-Orin-like pair of chips: no VDD_IN; the second chip has NC channels.
    ina3221_hwmon(tmp_path, "1-0040", "hwmon2", {
        1: ("VDD_GPU_SOC", 12008, 280), 2: ("VDD_CPU_CV", 12008, 40), 3: ("VIN_SYS_5V0", 4968, 980)})
    ina3221_hwmon(tmp_path, "1-0041", "hwmon3", {
        1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 4968, 120), 3: ("NC", 0, 0)}, sum_channel=False)
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    rails = src.rails()
    assert set(rails) == {"VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"}
    assert src.read_w() == pytest.approx((12008 * 280 + 12008 * 40 + 4968 * 980 + 4968 * 120) / 1e6)
    assert src.input_rail is None
    assert "sum of" in src.note and "VDD_IN" in src.note
    assert sum("not connected" in s for s in src.skipped) == 2


def test_nc_rail_in_iio_layout_is_skipped(tmp_path: Path) -> None:
    jetson_nano(tmp_path)
    ina3221_iio(tmp_path, "7-0041", "iio:device1", {0: ("NC", 0, 0, 0), 1: ("VDD_EXTRA", 500, 100, 5000)})
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    assert "NC" not in src.rails() and "VDD_EXTRA" in src.rails()
    assert src.read_w() == pytest.approx(3.154)  # still the input rail alone


def test_duplicate_labels_on_two_chips_get_the_chip_name(tmp_path: Path) -> None:
    ina3221_hwmon(tmp_path, "1-0040", "hwmon1", {1: ("VDD_5V", 5000, 100)})
    ina3221_hwmon(tmp_path, "1-0041", "hwmon2", {1: ("VDD_5V", 5000, 300)})
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    assert src.rails() == pytest.approx({"VDD_5V@1-0040": 0.5, "VDD_5V@1-0041": 1.5})


def test_disabled_channel_without_input_files_is_skipped(tmp_path: Path) -> None:
    ina3221_hwmon(tmp_path, "1-0040", "hwmon1", {1: ("VDD_IN", 5000, 1000), 2: ("VDD_OFF", None, None)})
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    assert set(src.rails()) == {"VDD_IN"}
    assert any("VDD_OFF" in s and "disabled" in s for s in src.skipped)


def test_discover_once_read_many(tmp_path: Path) -> None:
    d = jetson_orin_nano(tmp_path)
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    write(d / "in1_input", 5000)
    write(d / "curr1_input", 2000)
    assert src.read_w() == pytest.approx(10.0)  # the same files, read again
    ina3221_hwmon(tmp_path, "1-0041", "hwmon7", {1: ("VDD_LATE", 5000, 100)})
    assert "VDD_LATE" not in src.rails()  # found after open: not rediscovered


def test_vanished_file_is_a_source_error_naming_it(tmp_path: Path) -> None:
    d = jetson_orin_nano(tmp_path)
    src = open_power_source("ina3221", sysfs_root=tmp_path)
    assert src is not None
    (d / "curr2_input").unlink()
    with pytest.raises(SourceError, match="curr2_input"):
        src.read_w()


def test_absent_names_both_layouts_and_the_note(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_power_source("ina3221", sysfs_root=tmp_path, profile="jetson-orin-nano")
    msg = str(err.value)
    assert str(tmp_path / HWMON_GLOB) in msg and str(tmp_path / IIO_GLOB) in msg
    assert "firmware_notes/jetson-orin-nano.md#power-measurement" in msg
    assert 'source = "none"' in msg and "null" in msg


def test_chip_with_only_nc_rails_is_an_error(tmp_path: Path) -> None:
    ina3221_hwmon(tmp_path, "1-0040", "hwmon1", {1: ("NC", 0, 0)}, sum_channel=True)
    with pytest.raises(SourceError, match="no readable rail"):
        open_power_source("ina3221", sysfs_root=tmp_path)


@pytest.mark.parametrize(("label", "skipped"), [
    ("NC", True), (" nc\n", True), ("sum of shunt voltages", True), ("Sum of shunt voltages", True),
    ("VDD_IN", False), ("VDD_SYNC", False), ("POM_5V_IN", False)])
def test_skipped_labels(label: str, skipped: bool) -> None:
    assert (is_skipped_label(label) is not None) is skipped
