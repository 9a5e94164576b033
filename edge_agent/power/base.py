"""What every power source shares: the ``PowerSource`` protocol, the open context and the errors.

A source module (``ina3221``, ``hwmon``, ``rapl``, ``pmic``, ``serial_meter``) exposes
``open_source(arg, ctx) -> PowerSource``. It discovers its hardware once, under the roots in ``ctx``
(never from environment variables), checks it with one reading and keeps the file paths or the open port
for the many readings that follow.

Every failure is a ``SourceError`` (exit code 2: the user fixes the profile or the board). The message
names what was looked for (exact paths, the command, the port); the hint points at the power section of
the board's firmware note and says that ``[power] source = "none"`` runs the agent with power reported as
null.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from edge_agent.errors import SourceError

SYSFS_ROOT = Path("/sys")

# The note to read when the profile is not known, by source kind (firmware_notes/README.md lists all).
DEFAULT_NOTES: dict[str, tuple[str, ...]] = {
    "ina3221": ("jetson-orin-nano", "jetson-nano"),
    "rapl": ("x86-64",),
    "pmic": ("rpi5",),
    "serial": ("rpi4", "coral-usb"),
    "hwmon": (),
}
NOTE_ANCHOR = "power-measurement"


@runtime_checkable
class PowerSource(Protocol):
    """One opened power sensor.

    ``name`` is the profile's spec (``ina3221``, ``hwmon:ina219``, ``serial:um25c``, ...). ``note`` says
    what the figure covers (input rail, sum of rails, SoC side only, package only). ``energy_counter`` is
    true for sources whose hardware integrates energy itself (RAPL): the sampler then uses counter
    differences instead of integrating watts.
    """

    name: str
    note: str
    energy_counter: bool

    def read_w(self) -> float:
        """Total watts now (for an energy counter: the mean since the previous ``read_w``)."""
        ...

    def read_energy_j(self) -> float | None:
        """Cumulative joules since the source was opened (monotonic), or None without a counter."""
        ...

    def rails(self) -> dict[str, float]:
        """Watts per rail at the last reading (``{}`` when the sensor has no rails)."""
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True)
class SourceContext:
    """Where a source looks for its hardware; every root is injected so tests use fake trees."""

    sysfs_root: Path = SYSFS_ROOT
    serial_port: str = ""
    vcgencmd: str = "vcgencmd"
    profile: str | None = None

    def note(self, kind: str) -> str:
        """The firmware note section(s) that explain this source's setup."""
        if self.profile:
            return f"firmware_notes/{self.profile}.md#{NOTE_ANCHOR}"
        boards = DEFAULT_NOTES.get(kind, ())
        if not boards:
            return "firmware_notes/README.md (the note of your board, section 'Power measurement')"
        return " or ".join(f"firmware_notes/{b}.md#{NOTE_ANCHOR}" for b in boards)

    def hint(self, kind: str, fix: str = "") -> str:
        first = f"{fix}; " if fix else ""
        return (f"{first}see {self.note(kind)}. To run without power figures, set [power] source = \"none\" "
                f"in the profile: power is then reported as null")


def absent(ctx: SourceContext, kind: str, what: str, looked_for: Iterable[str | Path],
           fix: str = "") -> SourceError:
    """The error for a configured source whose hardware is not there."""
    places = ", ".join(str(p) for p in looked_for)
    return SourceError(f"power source {kind!r}: {what}; looked for: {places}", hint=ctx.hint(kind, fix))


def read_text(path: Path, ctx: SourceContext, kind: str) -> str:
    """A sysfs attribute, stripped; an unreadable file is a ``SourceError`` naming it."""
    try:
        return path.read_text().strip()
    except PermissionError as e:
        raise SourceError(f"power source {kind!r}: permission denied reading {path}",
                          hint=ctx.hint(kind, "give the agent's user read access to that file")) from e
    except OSError as e:
        raise SourceError(f"power source {kind!r}: cannot read {path}: {e.strerror or e}",
                          hint=ctx.hint(kind)) from e


def read_int(path: Path, ctx: SourceContext, kind: str) -> int:
    """A sysfs attribute holding one integer (sysfs numbers are integers in fixed units)."""
    text = read_text(path, ctx, kind)
    try:
        return int(text)
    except ValueError as e:
        raise SourceError(f"power source {kind!r}: {path} holds {text!r}, not an integer",
                          hint=ctx.hint(kind)) from e
