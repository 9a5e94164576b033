"""edge_agent.thermal against a fake sysfs tree laid out as /sys/class/thermal/thermal_zoneN/{type,temp}."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.thermal import ThermalReader, discover_zones, read_temps


def _zone(root: Path, n: int, kind: str, temp: str | None) -> Path:
    z = root / f"thermal_zone{n}"
    z.mkdir(parents=True)
    (z / "type").write_text(kind + "\n")
    if temp is not None:
        (z / "temp").write_text(temp + "\n")
    return z


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys" / "class" / "thermal"
    _zone(root, 0, "acpitz", "27800")
    _zone(root, 1, "x86_pkg_temp", "54000")
    _zone(root, 2, "cpu-thermal", "-5250")  # below zero: the kernel writes a signed value
    _zone(root, 10, "acpitz", "31000")  # a second zone of the same type
    (root / "cooling_device0").mkdir()  # not a zone
    (root / "cooling_device0" / "type").write_text("Processor\n")
    return root


def test_reads_millidegrees_as_celsius(sysfs: Path) -> None:
    temps = read_temps(sysfs)
    assert temps == {"acpitz": 27.8, "x86_pkg_temp": 54.0, "cpu-thermal": -5.25, "acpitz@thermal_zone10": 31.0}


def test_zone_filter_by_type(sysfs: Path) -> None:
    assert read_temps(sysfs, zones=["x86_pkg_temp"]) == {"x86_pkg_temp": 54.0}
    assert read_temps(sysfs, zones=["gpu-thermal"]) == {}


def test_missing_root_is_empty_not_an_error(tmp_path: Path) -> None:
    assert read_temps(tmp_path / "nope") == {}
    assert ThermalReader(tmp_path / "nope").max_c() is None


def test_unreadable_zone_is_left_out(sysfs: Path) -> None:
    (sysfs / "thermal_zone1" / "temp").write_text("garbage\n")
    reader = ThermalReader(sysfs)
    assert "x86_pkg_temp" not in reader.read()
    assert reader.max_c() == 31.0


def test_zone_without_temp_is_not_discovered(sysfs: Path) -> None:
    _zone(sysfs, 3, "battery", None)
    assert "battery" not in [label for label, _ in discover_zones(sysfs)]


def test_discover_once_read_many(sysfs: Path) -> None:
    reader = ThermalReader(sysfs, zones=["cpu-thermal"])
    assert reader.max_c() == -5.25
    (sysfs / "thermal_zone2" / "temp").write_text("71500\n")
    assert reader.max_c() == 71.5


def test_real_sysfs_does_not_raise() -> None:
    temps = read_temps()
    assert all(isinstance(v, float) for v in temps.values())
