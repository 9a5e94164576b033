"""edge_agent.power: the spec parser, the lazy registry, "none", and the protocol every source meets."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.errors import InputError, SourceError
from edge_agent.power import REGISTRY, PowerSource, open_power_source, parse_spec
from edge_agent.profiles import list_profiles
from tests.fakes_sysfs import hwmon_chip, jetson_orin_nano, rapl


def test_none_gives_no_source() -> None:
    assert open_power_source("none") is None


@pytest.mark.parametrize(("spec", "want"), [
    ("none", ("none", "")), ("ina3221", ("ina3221", "")), ("rapl", ("rapl", "")), ("pmic", ("pmic", "")),
    ("hwmon:ina219", ("hwmon", "ina219")), ("serial:um25c", ("serial", "um25c")),
    ("serial:um34c", ("serial", "um34c")), ("serial:ina219-csv", ("serial", "ina219-csv"))])
def test_specs(spec: str, want: tuple[str, str]) -> None:
    assert parse_spec(spec) == want


@pytest.mark.parametrize("spec", ["", "nvml", "hwmon", "hwmon:", "serial:", "serial:um99", "rapl:1", "none:x",
                                  "ina3221:1-0040"])
def test_bad_specs_are_source_errors_listing_the_allowed(spec: str) -> None:
    with pytest.raises(SourceError, match="allowed: none, ina3221, rapl, pmic, hwmon:<chip name>") as err:
        open_power_source(spec)
    assert isinstance(err.value, InputError) and err.value.exit_code == 2


def test_every_shipped_profile_source_parses() -> None:
    for p in list_profiles():
        kind, _ = parse_spec(p.power.source)
        assert kind == "none" or kind in REGISTRY


def test_registry_modules_exist_and_expose_open_source() -> None:
    for module in REGISTRY.values():
        assert callable(importlib.import_module(module).open_source)


def test_importing_the_package_loads_no_source_module() -> None:
    code = ("import sys, edge_agent.power as p; "
            "print(sorted(m for m in sys.modules if m.startswith('edge_agent.power.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['edge_agent.power.base']"


def test_sources_meet_the_protocol(tmp_path: Path) -> None:
    jetson_orin_nano(tmp_path)
    hwmon_chip(tmp_path, 0, "ina219", {"power1_input": 1_000_000})
    rapl(tmp_path, energy_uj=1)
    for spec in ("ina3221", "hwmon:ina219", "rapl"):
        src = open_power_source(spec, sysfs_root=tmp_path)
        assert isinstance(src, PowerSource)
        assert src.name == spec and src.note
        assert isinstance(src.read_w(), float)
        assert (src.read_energy_j() is not None) is src.energy_counter
        src.close()


def test_without_a_profile_the_hint_names_the_likely_notes(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_power_source("ina3221", sysfs_root=tmp_path)
    assert err.value.hint is not None
    assert "jetson-orin-nano.md#power-measurement" in err.value.hint and "jetson-nano.md" in err.value.hint
