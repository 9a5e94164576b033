"""Intel RAPL package energy through the powercap framework (``[power] source = "rapl"``).

Layout (Documentation/power/powercap/powercap.rst)::

    /sys/class/powercap/intel-rapl:0/name                 "package-0"
    /sys/class/powercap/intel-rapl:0/energy_uj            cumulative energy, µJ; wraps around
    /sys/class/powercap/intel-rapl:0/max_energy_range_uj  the value at which energy_uj wraps to 0

``read_energy_j`` turns the wrapping counter into a monotonic total since open (``rapl_delta_uj``
handles one wrap between two reads; at package power a wrap takes tens of minutes, far longer than any
sampling period). ``read_w`` is the mean power since the previous ``read_w`` call (the first call: since
open), so it needs no sleep; ``PowerSampler`` uses counter differences instead (``energy_counter``).

Since CVE-2020-8694 ("Platypus") ``energy_uj`` is readable by root only; the firmware note
(x86-64.md#power-measurement) shows a udev rule that grants read access to the agent's group.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from edge_agent.errors import SourceError
from edge_agent.power.base import SourceContext, absent, read_int, read_text

KIND = "rapl"
ZONE = "class/powercap/intel-rapl:0"


def rapl_delta_uj(prev: int, now: int, max_range: int) -> int:
    """µJ consumed between two reads of a counter that wraps from ``max_range`` to 0.

    ``now < prev`` means the counter wrapped once: ``max_range - prev + now``. Both readings must lie in
    ``[0, max_range]``. Two reads a whole wrap apart are indistinguishable from no change: sample faster.
    """
    if max_range <= 0:
        raise ValueError(f"max_energy_range_uj must be positive, got {max_range}")
    for label, v in (("previous", prev), ("current", now)):
        if not 0 <= v <= max_range:
            raise ValueError(f"{label} reading {v} is outside the counter range [0, {max_range}]")
    if now >= prev:
        return now - prev
    return max_range - prev + now


class RaplSource:
    """The package-0 energy counter, found once at open."""

    name = KIND
    energy_counter = True

    def __init__(self, ctx: SourceContext, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._ctx = ctx
        self._clock = clock
        zone = ctx.sysfs_root / ZONE
        self.energy_file = zone / "energy_uj"
        self.range_file = zone / "max_energy_range_uj"
        if not self.energy_file.exists():
            raise absent(ctx, KIND, "no RAPL package zone", [self.energy_file],
                         fix="RAPL needs an Intel CPU (or an AMD one with the amd_energy/rapl support) on bare "
                             "metal; VMs and containers usually have none")
        self.zone_name = read_text(zone / "name", ctx, KIND) if (zone / "name").exists() else "?"
        self.max_range = read_int(self.range_file, ctx, KIND)
        if self.max_range <= 0:
            raise SourceError(f"power source {KIND!r}: {self.range_file} holds {self.max_range}, not a range",
                              hint=ctx.hint(KIND))
        self.note = f"RAPL {self.zone_name} (intel-rapl:0): CPU package energy, not wall power"
        self._prev_uj = self._read_uj()
        self._total_uj = 0
        self._w_energy_uj = 0
        self._w_time_ns = clock()
        self._last_w: float | None = None

    def _read_uj(self) -> int:
        try:
            text = self.energy_file.read_text().strip()
        except PermissionError as e:
            raise SourceError(
                f"power source {KIND!r}: permission denied reading {self.energy_file} (root-only since "
                "CVE-2020-8694)",
                hint=self._ctx.hint(KIND, "grant read access to the agent's group only (udev rule or tmpfiles.d "
                                          "line in the note), never to everyone")) from e
        except OSError as e:
            raise SourceError(f"power source {KIND!r}: cannot read {self.energy_file}: {e.strerror or e}",
                              hint=self._ctx.hint(KIND)) from e
        try:
            value = int(text)
        except ValueError as e:
            raise SourceError(f"power source {KIND!r}: {self.energy_file} holds {text!r}, not an integer",
                              hint=self._ctx.hint(KIND)) from e
        if not 0 <= value <= self.max_range:
            raise SourceError(f"power source {KIND!r}: {self.energy_file} = {value} is outside "
                              f"[0, {self.max_range}] ({self.range_file})", hint=self._ctx.hint(KIND))
        return value

    def read_energy_j(self) -> float:
        now = self._read_uj()
        self._total_uj += rapl_delta_uj(self._prev_uj, now, self.max_range)
        self._prev_uj = now
        return self._total_uj / 1e6

    def read_w(self) -> float:
        """Mean watts since the previous call (or since open).

        Two calls at the same clock tick give the previous figure (0.0 if there is none).
        """
        self.read_energy_j()  # advances the monotonic total
        t = self._clock()
        dt_ns = t - self._w_time_ns
        if dt_ns <= 0:
            return self._last_w if self._last_w is not None else 0.0
        w = (self._total_uj - self._w_energy_uj) / 1e6 / (dt_ns / 1e9)
        self._w_energy_uj, self._w_time_ns, self._last_w = self._total_uj, t, w
        return w

    def rails(self) -> dict[str, float]:
        return {} if self._last_w is None else {self.zone_name: self._last_w}

    def close(self) -> None:
        self._last_w = None


def open_source(arg: str, ctx: SourceContext) -> RaplSource:
    return RaplSource(ctx)
