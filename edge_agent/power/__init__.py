"""Power measurement: one module per sensor behind the small ``PowerSource`` protocol.

``open_power_source(spec)`` opens the source a profile names in ``[power] source``:

| spec | module | hardware |
|---|---|---|
| ``ina3221`` | ``ina3221`` | Jetson on-module INA3221 (JetPack 5/6 hwmon layout, JetPack 4 iio layout) |
| ``hwmon:<name>`` | ``hwmon`` | any hwmon chip whose ``name`` file says ``<name>`` |
| ``rapl`` | ``rapl`` | Intel RAPL package energy counter (powercap) |
| ``pmic`` | ``pmic`` | Raspberry Pi 5 PMIC rails via ``vcgencmd pmic_read_adc`` |
| ``serial:um25c`` / ``serial:um34c`` / ``serial:ina219-csv`` | ``serial_meter`` | USB meters on a serial port |
| ``none`` | (none) | ``open_power_source`` returns ``None`` |

``"none"`` gives ``None``, not a placeholder object: a caller that gets ``None`` has no power source and
reports power as null (``power_w.mean = null``, ``energy_mj_per_inference = null``). A source that is
configured but absent (no such sysfs path, no ``vcgencmd``, no serial port) raises ``SourceError`` naming
what was looked for and the board's firmware note; it never falls back to ``None`` silently.

Modules are imported only when a profile names them (the registry maps a kind to a module path), and every
hardware root is a parameter: ``sysfs_root`` plays the role of ``/sys``, ``vcgencmd`` is the command to
run, ``serial_port`` the device or pyserial URL. Sources discover their hardware once at open and then
read the same files, command or port many times. ``PowerSampler`` (``edge_agent.power.sampler``) samples a
source on a thread and integrates energy over a window.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from edge_agent.errors import SourceError
from edge_agent.power.base import SYSFS_ROOT, PowerSource, SourceContext
from edge_agent.profiles import POWER_SOURCES, SERIAL_METERS

__all__ = ["REGISTRY", "SYSFS_ROOT", "PowerSource", "SourceContext", "open_power_source", "parse_spec"]

# kind -> module implementing ``open_source(arg, ctx)``
REGISTRY: dict[str, str] = {
    "ina3221": "edge_agent.power.ina3221",
    "hwmon": "edge_agent.power.hwmon",
    "rapl": "edge_agent.power.rapl",
    "pmic": "edge_agent.power.pmic",
    "serial": "edge_agent.power.serial_meter",
}
_WITH_ARG = {"hwmon", "serial"}
_ALLOWED = (*POWER_SOURCES, "hwmon:<chip name>", *(f"serial:{m}" for m in SERIAL_METERS))


def parse_spec(spec: str) -> tuple[str, str]:
    """``"hwmon:ina219"`` -> ``("hwmon", "ina219")``; ``"rapl"`` -> ``("rapl", "")``.

    Raises ``SourceError`` for a spec the registry does not know (the profile validator normally
    catches these first).
    """
    kind, sep, arg = spec.partition(":")
    bad = SourceError(f"unknown power source {spec!r}; allowed: {', '.join(_ALLOWED)}",
                      hint="fix [power] source in the profile")
    if kind == "none" and not sep:
        return kind, ""
    if kind not in REGISTRY:
        raise bad
    if kind in _WITH_ARG:
        if not arg:
            raise bad
        if kind == "serial" and arg not in SERIAL_METERS:
            raise bad
    elif sep:
        raise bad
    return kind, arg


def open_power_source(spec: str, *, sysfs_root: Path = SYSFS_ROOT, serial_port: str = "",
                      vcgencmd: str = "vcgencmd", profile: str | None = None) -> PowerSource | None:
    """Open the power source named by a profile's ``[power] source`` (``None`` for ``"none"``).

    ``profile`` is the profile's name; error hints then point at ``firmware_notes/<profile>.md``.
    """
    kind, arg = parse_spec(spec)
    if kind == "none":
        return None
    ctx = SourceContext(sysfs_root=Path(sysfs_root), serial_port=serial_port, vcgencmd=vcgencmd,
                        profile=profile)
    module = importlib.import_module(REGISTRY[kind])
    return module.open_source(arg, ctx)
