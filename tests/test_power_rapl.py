"""edge_agent.power.rapl: the wrap-around arithmetic and the source against a fake powercap tree."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.errors import SourceError
from edge_agent.power import open_power_source
from edge_agent.power.base import SourceContext
from edge_agent.power.rapl import RaplSource, rapl_delta_uj
from tests.fakes_sysfs import rapl, write

MAX = 262143328850  # a real max_energy_range_uj (2^32 energy units of 61 µJ)


# --------------------------------------------------------------------------------------------------
# rapl_delta_uj


@pytest.mark.parametrize(("prev", "now", "max_range", "want"), [
    (0, 0, 100, 0),
    (10, 25, 100, 15),
    (0, 100, 100, 100),
    (90, 5, 100, 15),  # wrapped: 10 up to the top, 5 after it
    (100, 0, 100, 0),  # the top and zero are the same point of the circle
    (100, 1, 100, 1),
    (1, 0, 100, 99),
    (MAX - 1_000_000, 2_000_000, MAX, 3_000_000),
])
def test_known_deltas(prev: int, now: int, max_range: int, want: int) -> None:
    assert rapl_delta_uj(prev, now, max_range) == want


@given(st.integers(1, 2**40).flatmap(
    lambda m: st.tuples(st.just(m), st.integers(0, m), st.integers(0, m - 1))))
def test_any_advance_shorter_than_one_wrap_is_recovered(args: tuple[int, int, int]) -> None:
    max_range, prev, advance = args
    now = prev + advance
    if now > max_range:
        now -= max_range  # the counter wrapped once
    assert rapl_delta_uj(prev, now, max_range) == advance


@given(st.integers(1, 2**40).flatmap(
    lambda m: st.tuples(st.just(m), st.integers(0, m), st.integers(0, m))))
def test_delta_is_never_negative_nor_above_the_range(args: tuple[int, int, int]) -> None:
    max_range, prev, now = args
    assert 0 <= rapl_delta_uj(prev, now, max_range) <= max_range


@pytest.mark.parametrize(("prev", "now", "max_range"), [(-1, 0, 100), (0, 101, 100), (0, 0, 0), (5, 3, -1)])
def test_out_of_range_readings_are_refused(prev: int, now: int, max_range: int) -> None:
    with pytest.raises(ValueError):
        rapl_delta_uj(prev, now, max_range)


# --------------------------------------------------------------------------------------------------
# the source


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000_000_000

    def __call__(self) -> int:
        return self.t


def test_energy_is_monotonic_across_a_wrap(tmp_path: Path) -> None:
    zone = rapl(tmp_path, energy_uj=MAX - 3_000_000, max_range_uj=MAX)
    src = RaplSource(SourceContext(sysfs_root=tmp_path))
    assert src.read_energy_j() == 0.0
    write(zone / "energy_uj", MAX - 1_000_000)
    assert src.read_energy_j() == pytest.approx(2.0)
    write(zone / "energy_uj", 4_000_000)  # wrapped
    assert src.read_energy_j() == pytest.approx(7.0)
    write(zone / "energy_uj", 4_500_000)
    assert src.read_energy_j() == pytest.approx(7.5)


def test_read_w_is_the_mean_since_the_previous_call(tmp_path: Path) -> None:
    zone = rapl(tmp_path, energy_uj=1_000_000, max_range_uj=MAX)
    clock = FakeClock()
    src = RaplSource(SourceContext(sysfs_root=tmp_path), clock=clock)
    clock.t += 2_000_000_000
    write(zone / "energy_uj", 31_000_000)  # 30 J in 2 s
    assert src.read_w() == pytest.approx(15.0)
    assert src.rails() == pytest.approx({"package-0": 15.0})
    clock.t += 500_000_000
    write(zone / "energy_uj", 33_000_000)  # 2 J in 0.5 s
    assert src.read_w() == pytest.approx(4.0)
    assert src.read_w() == pytest.approx(4.0)  # same instant: the previous figure, no division by zero


def test_open_through_the_registry(tmp_path: Path) -> None:
    rapl(tmp_path, energy_uj=5)
    src = open_power_source("rapl", sysfs_root=tmp_path)
    assert src is not None and src.energy_counter
    assert "package-0" in src.note and "not wall power" in src.note


def test_absent_zone_names_the_file_and_the_note(tmp_path: Path) -> None:
    with pytest.raises(SourceError) as err:
        open_power_source("rapl", sysfs_root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "class" / "powercap" / "intel-rapl:0" / "energy_uj") in msg
    assert "firmware_notes/x86-64.md#power-measurement" in msg


def test_value_outside_the_range_is_an_error(tmp_path: Path) -> None:
    zone = rapl(tmp_path, energy_uj=5, max_range_uj=100)
    src = open_power_source("rapl", sysfs_root=tmp_path)
    assert src is not None
    write(zone / "energy_uj", 101)
    with pytest.raises(SourceError, match="outside"):
        src.read_energy_j()


@contextlib.contextmanager
def _unprivileged() -> Iterator[None]:
    """Drop the effective uid to nobody for the block when running as root (the file modes then bite)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_root_only_energy_uj_names_the_file_and_the_fix() -> None:
    # A world-traversable tree (pytest's tmp_path is root-only), with energy_uj 0400 root like the kernel's.
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        zone = rapl(root, energy_uj=123)
        for d in (root / "class", root / "class" / "powercap", zone):
            d.chmod(0o755)
        (zone / "energy_uj").chmod(0o400 if os.geteuid() == 0 else 0o000)
        with _unprivileged(), pytest.raises(SourceError) as err:
            open_power_source("rapl", sysfs_root=root, profile="x86-64")
    msg = str(err.value)
    assert f"permission denied reading {zone / 'energy_uj'}" in msg
    assert "firmware_notes/x86-64.md#power-measurement" in msg
    assert "group" in msg and "never to everyone" in msg
