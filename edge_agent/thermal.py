"""Temperatures from the kernel's thermal zones (``/sys/class/thermal/thermal_zoneN/{type,temp}``).

``temp`` is in millidegrees Celsius (it may be negative). Zones are discovered once
(``ThermalReader``) and read many times; the root is a parameter so tests use a fake tree. A machine
without thermal zones (containers, some VMs) gives ``{}``: a missing root is not an error. A zone whose
``temp`` cannot be read (some drivers answer EINVAL/ENODATA while the sensor is off) is left out of
that reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

THERMAL_ROOT = Path("/sys/class/thermal")


def _zone_index(path: Path) -> int:
    suffix = path.name[len("thermal_zone"):]
    return int(suffix) if suffix.isdigit() else 1 << 30


def discover_zones(root: Path = THERMAL_ROOT, zones: Sequence[str] = ()) -> list[tuple[str, Path]]:
    """(label, path of ``temp``) for every zone, or only the zones whose ``type`` is in ``zones``.

    The label is the zone's type; a second zone of the same type is labelled ``type@thermal_zoneN``.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for zone in sorted(root.glob("thermal_zone*"), key=_zone_index):
        try:
            kind = (zone / "type").read_text().strip()
        except OSError:
            continue
        if zones and kind not in zones:
            continue
        if not (zone / "temp").exists():
            continue
        label = kind if kind not in seen else f"{kind}@{zone.name}"
        seen.add(kind)
        found.append((label, zone / "temp"))
    return found


class ThermalReader:
    """Reads the zones found once at construction."""

    def __init__(self, root: Path = THERMAL_ROOT, zones: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self.requested = tuple(zones)
        self.zones = discover_zones(root, zones)

    @property
    def missing(self) -> list[str]:
        """Zone types asked for (``zones``) that no zone under the root has."""
        found = {label.split("@", 1)[0] for label, _ in self.zones}
        return [z for z in self.requested if z not in found]

    def read(self) -> dict[str, float]:
        """Label -> degrees Celsius, for the zones readable right now."""
        out: dict[str, float] = {}
        for label, path in self.zones:
            try:
                out[label] = int(path.read_text().strip()) / 1000.0
            except (OSError, ValueError):
                continue
        return out

    def max_c(self) -> float | None:
        """The hottest readable zone, or None when none is readable."""
        temps = self.read()
        return max(temps.values()) if temps else None


def read_temps(root: Path = THERMAL_ROOT, zones: Sequence[str] = ()) -> dict[str, float]:
    """One reading of every (or the named) thermal zone: label -> degrees Celsius."""
    return ThermalReader(root, zones).read()
