"""Raspberry Pi 5 PMIC rails through ``vcgencmd pmic_read_adc`` (``[power] source = "pmic"``).

The firmware prints one line per ADC channel, current and voltage channels separately::

       3V3_SYS_A current(1)=0.08783370A
      VDD_CORE_A current(7)=6.22421000A
       3V3_SYS_V volt(9)=3.31003300V
      VDD_CORE_V volt(15)=0.86173300V
         EXT5V_V volt(24)=5.09066000V

The channel numbers of a rail's current and voltage differ, so lines are paired by rail name
(``VDD_CORE_A`` with ``VDD_CORE_V``). Power = Σ V × I over the paired rails. ``EXT5V_V`` (the 5 V input)
and ``BATT_V`` (the RTC cell) have no current channel and are left out. This is a SoC-side figure: it
covers what the PMIC's rails deliver (SoC, RAM, I/O), not wall power and not even board input (USB ports,
conversion losses). Every read forks ``vcgencmd``; keep ``sample_hz`` modest (the rpi5 profile uses 5).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from edge_agent.errors import SourceError
from edge_agent.power.base import SourceContext, absent

KIND = "pmic"
SUBCOMMAND = "pmic_read_adc"
TIMEOUT_S = 2.0
NOTE = ("Raspberry Pi 5 PMIC: Σ V×I over the rails paired in `vcgencmd pmic_read_adc` (SoC side: SoC, RAM, I/O); "
        "not wall power nor board input (USB ports and conversion losses are not seen)")

_NUM = r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
_LINE = re.compile(
    rf"^\s*(?:(?P<ra>\S+)_A\s+current\(\d+\)=(?P<a>{_NUM})A|(?P<rv>\S+)_V\s+volt\(\d+\)=(?P<v>{_NUM})V)\s*$")


@dataclass(frozen=True)
class PmicReading:
    """One ``pmic_read_adc`` capture: amps and volts by rail name."""

    currents: dict[str, float]
    volts: dict[str, float]

    @property
    def rails_w(self) -> dict[str, float]:
        """Watts of every rail that has both a current and a voltage line, in output order."""
        return {rail: amps * self.volts[rail] for rail, amps in self.currents.items() if rail in self.volts}

    @property
    def total_w(self) -> float:
        return sum(self.rails_w.values())

    @property
    def unpaired(self) -> list[str]:
        """Rails with only one of the two lines (e.g. EXT5V, BATT: voltage only)."""
        return sorted(set(self.currents) ^ set(self.volts))


def parse_pmic_adc(text: str) -> PmicReading:
    """Parse ``vcgencmd pmic_read_adc`` output (pure). Lines of any other shape are ignored."""
    currents: dict[str, float] = {}
    volts: dict[str, float] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        if m.group("ra") is not None:
            currents[m.group("ra")] = float(m.group("a"))
        else:
            volts[m.group("rv")] = float(m.group("v"))
    return PmicReading(currents, volts)


class PmicSource:
    """Runs ``<vcgencmd> pmic_read_adc`` per reading; the command is resolved once at open."""

    name = KIND
    note = NOTE
    energy_counter = False

    def __init__(self, ctx: SourceContext) -> None:
        self._ctx = ctx
        resolved = shutil.which(ctx.vcgencmd)
        if resolved is None:
            raise absent(ctx, KIND, "the vcgencmd command is not there", [f"{ctx.vcgencmd} (on PATH)"],
                         fix="vcgencmd comes with Raspberry Pi OS (package raspi-utils); pmic_read_adc needs "
                             "a Pi 5")
        self.command = (resolved, SUBCOMMAND)
        self._last: dict[str, float] = {}
        self._last_output = ""
        first = self._capture()
        if not first.rails_w:
            head = " | ".join(self._last_output.strip().splitlines()[:3]) or "(no output)"
            raise SourceError(
                f"power source {KIND!r}: `{' '.join(self.command)}` printed no rail with both a current "
                f"(<RAIL>_A current(n)=xA) and a voltage (<RAIL>_V volt(n)=yV) line; it printed: {head}",
                hint=ctx.hint(KIND, "pmic_read_adc exists on the Raspberry Pi 5 only"))
        self._last = first.rails_w

    def _capture(self) -> PmicReading:
        cmd = " ".join(self.command)
        try:
            done = subprocess.run(self.command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as e:
            raise SourceError(f"power source {KIND!r}: `{cmd}` did not answer within {TIMEOUT_S} s",
                              hint=self._ctx.hint(KIND)) from e
        except OSError as e:
            raise SourceError(f"power source {KIND!r}: cannot run `{cmd}`: {e.strerror or e}",
                              hint=self._ctx.hint(KIND)) from e
        self._last_output = done.stdout
        if done.returncode != 0:
            said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
            raise SourceError(
                f"power source {KIND!r}: `{cmd}` exited with {done.returncode}: {said}",
                hint=self._ctx.hint(KIND, "a user other than root needs the 'video' group to use /dev/vcio"))
        return parse_pmic_adc(done.stdout)

    def read_w(self) -> float:
        reading = self._capture()
        rails = reading.rails_w
        if not rails:
            raise SourceError(f"power source {KIND!r}: `{' '.join(self.command)}` printed no paired rail",
                              hint=self._ctx.hint(KIND))
        self._last = rails
        return sum(rails.values())

    def read_energy_j(self) -> float | None:
        return None

    def rails(self) -> dict[str, float]:
        return dict(self._last)

    def close(self) -> None:
        self._last = {}


def open_source(arg: str, ctx: SourceContext) -> PmicSource:
    return PmicSource(ctx)
