"""The board side of a run: the device profile, the power source and its sampler, thermal zones,
throttling and the idle power baseline.

Which profile (``resolve_device``):
  1. ``--profile NAME|PATH`` when given (an unknown or invalid profile is an error),
  2. else the bundle manifest's ``profile``, looked up in ``--profiles-dir``, ``$EDGEKIT_PROFILES_DIR`` and
     the shipped profiles. When it is not found the agent runs **without** power and thermal settings
     (power ``none`` unless ``--power``, every thermal zone, no throttle temperature) and says so in the
     log and in ``describe()`` (``profile_note``); an invalid profile file is still an error.

From the profile: ``[power] source / sample_hz / serial_port`` and ``[thermal] zones / throttle_c``.
Overrides: ``--power SPEC`` (``none`` turns power off), ``--power-port``; hardware roots: ``--sysfs-root``
(plays ``/sys``: power sources, ``class/thermal``, ``devices/system/cpu``), ``--vcgencmd``, ``--nvpmodel``.

``open_device`` opens the power source once (a configured source whose hardware is absent is the power
package's ``SourceError``, exit 2) and starts a ``PowerSampler`` at ``sample_hz``; ``Device.close`` stops
it and closes the source.

Idle baseline: ``edge-agent calibrate-idle`` samples the source with no inference running and writes
``<state-dir>/idle_power.json`` (``{"mean_w", "std_w", "samples", "source", "measured_at", "duration_s"}``,
temp file + rename). ``run``/``bench`` with the same ``--state-dir`` subtract ``mean_w`` from the power when
computing energy per inference, but only when ``source`` matches the source in use (a mismatch is logged
and the baseline is not used).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import InputError, SourceError
from edge_agent.power import SYSFS_ROOT, PowerSource, open_power_source, parse_spec
from edge_agent.power.sampler import PowerSampler, telemetry_power
from edge_agent.profiles import PowerSection, Profile, available_profiles, load_profile, load_profile_file
from edge_agent.telemetry.schema import energy_mj_per_inference
from edge_agent.thermal import ThermalReader
from edge_agent.throttle import CpuFreqReader, NvpmodelQuery, PowerMode, Reading, ThrottleMonitor, VcgencmdThrottle

log = logging.getLogger(__name__)

IDLE_FILE = "idle_power.json"
IDLE_KEYS = ("mean_w", "std_w", "samples", "source", "measured_at", "duration_s")
DEFAULT_SAMPLE_HZ: float = next(f.default for f in dataclasses.fields(PowerSection) if f.name == "sample_hz")
DEFAULT_SETTLE_S = 2.0
READ_TIMEOUT_S = 2.5  # the slowest source read (a serial meter's timeout) plus slack


# --------------------------------------------------------------------------------------------------
# options and the resolved configuration


@dataclass(frozen=True)
class DeviceOptions:
    """What the command line says about the board (every field optional)."""

    profile: str | None = None  # name or path; None: the bundle manifest's profile
    profiles_dir: str | None = None
    power: str | None = None  # overrides [power] source ("none" turns power off)
    power_port: str | None = None  # overrides [power] serial_port
    sysfs_root: Path = SYSFS_ROOT
    vcgencmd: str = "vcgencmd"
    nvpmodel: str = "nvpmodel"


@dataclass(frozen=True)
class DeviceConfig:
    """The settings in force: from the profile, overridden by the options."""

    profile: str | None  # the profile in use, None without one
    profile_file: str | None
    profile_note: str | None  # why there is no profile (None when there is one)
    power_spec: str
    sample_hz: float
    serial_port: str
    zones: tuple[str, ...]
    throttle_c: float | None
    sysfs_root: Path
    vcgencmd: str
    nvpmodel: str


def _find_profile(options: DeviceOptions, bundle_profile: str | None) -> tuple[Profile | None, str | None]:
    if options.profile:
        return load_profile(options.profile, options.profiles_dir), None
    if not bundle_profile:
        return None, "no device profile (pass --profile NAME|PATH)"
    found = available_profiles(options.profiles_dir)
    if bundle_profile in found:
        return load_profile_file(found[bundle_profile]), None
    where = ", ".join(sorted(found)) or "none"
    return None, (f"the bundle's profile {bundle_profile!r} is not among the profiles found (known: {where}); "
                  "running without its power and thermal settings (add it with --profiles-dir, or pass "
                  "--profile)")


def resolve_device(options: DeviceOptions, bundle_profile: str | None) -> DeviceConfig:
    """The profile and overrides in force (pure apart from reading the profile file)."""
    profile, note = _find_profile(options, bundle_profile)
    spec = options.power if options.power is not None else (profile.power.source if profile else "none")
    kind, _ = parse_spec(spec)  # an unknown spec is a SourceError naming the allowed ones
    if options.power_port is not None and kind != "serial":
        raise InputError(f"--power-port is for serial meters, but the power source is {spec!r}",
                         hint="pass --power serial:um25c (or um34c, ina219-csv) with it, or drop --power-port")
    port = options.power_port if options.power_port is not None else (profile.power.serial_port if profile else "")
    return DeviceConfig(
        profile=profile.name if profile else None,
        profile_file=profile.source_file if profile else None,
        profile_note=note,
        power_spec=spec,
        sample_hz=profile.power.sample_hz if profile else DEFAULT_SAMPLE_HZ,
        serial_port=port,
        zones=profile.thermal.zones if profile else (),
        throttle_c=profile.thermal.throttle_c if profile else None,
        sysfs_root=Path(options.sysfs_root),
        vcgencmd=options.vcgencmd,
        nvpmodel=options.nvpmodel,
    )


def open_power(config: DeviceConfig) -> PowerSource | None:
    """The configured power source (None for ``none``); an absent one is the power package's error."""
    try:
        return open_power_source(config.power_spec, sysfs_root=config.sysfs_root, serial_port=config.serial_port,
                                 vcgencmd=config.vcgencmd, profile=config.profile)
    except SourceError as e:
        hint = f"{e.hint}; or pass --power none" if e.hint else "pass --power none to run without power figures"
        raise SourceError(e.message, hint=hint) from e


# --------------------------------------------------------------------------------------------------
# idle baseline


@dataclass(frozen=True)
class IdleBaseline:
    """Board power with no inference running, as measured by ``calibrate_idle``."""

    mean_w: float
    std_w: float | None
    samples: int
    source: str
    measured_at: float  # UNIX seconds
    duration_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def idle_path(state_dir: str | os.PathLike) -> Path:
    return Path(state_dir) / IDLE_FILE


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_idle(data: Any, where: str) -> IdleBaseline:
    """Validate the content of an idle file (pure)."""
    bad = (lambda what: InputError(f"{where}: {what}",  # noqa: E731
                                   hint="run `edge-agent calibrate-idle` again, or delete the file"))
    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    missing = [k for k in IDLE_KEYS if k not in data]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    if not _num(data["mean_w"]) or not _num(data["measured_at"]) or not _num(data["duration_s"]):
        raise bad("mean_w, measured_at and duration_s must be numbers")
    if data["std_w"] is not None and not _num(data["std_w"]):
        raise bad("std_w must be a number or null")
    if not isinstance(data["samples"], int) or isinstance(data["samples"], bool) or data["samples"] < 1:
        raise bad("samples must be an integer >= 1")
    if not isinstance(data["source"], str) or not data["source"]:
        raise bad("source must be a power source name")
    return IdleBaseline(float(data["mean_w"]), None if data["std_w"] is None else float(data["std_w"]),
                        data["samples"], data["source"], float(data["measured_at"]), float(data["duration_s"]))


def read_idle(state_dir: str | os.PathLike) -> IdleBaseline | None:
    """The baseline stored in ``state_dir`` (None when there is none); a corrupt file is an ``InputError``."""
    path = idle_path(state_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", hint="check the --state-dir permissions") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not JSON: {e}",
                         hint="run `edge-agent calibrate-idle` again, or delete the file") from e
    return parse_idle(data, str(path))


def load_idle(state_dir: str | os.PathLike | None, source: str | None) -> IdleBaseline | None:
    """The baseline to subtract for ``source``: None without a state dir, a file or a matching source."""
    if state_dir is None:
        return None
    idle = read_idle(state_dir)
    path = idle_path(state_dir)
    if idle is None:
        if source is not None:
            log.info("no idle baseline in %s: energy per inference is the board's whole energy "
                     "(run `edge-agent calibrate-idle` to measure one)", path)
        return None
    if source is None:
        log.info("idle baseline in %s not used: no power source in this run", path)
        return None
    if idle.source != source:
        log.warning("idle baseline in %s was measured with power source %r, this run measures %r: not used "
                    "(run `edge-agent calibrate-idle` with this source)", path, idle.source, source)
        return None
    log.info("idle baseline %.4f W (%s, %d samples over %.1f s) subtracted from energy per inference",
             idle.mean_w, idle.source, idle.samples, idle.duration_s)
    return idle


def save_idle(state_dir: str | os.PathLike, idle: IdleBaseline) -> Path:
    """Write the baseline atomically (temp file, fsync, rename)."""
    folder = Path(state_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path = idle_path(folder)
        tmp = path.with_name(f".{IDLE_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(idle.to_dict(), indent=2, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write the idle baseline in {folder}: {e.strerror}",
                         hint="check the --state-dir permissions") from e
    return path


def power_std_w(samples: Sequence[tuple[int, float]], counter: bool) -> float | None:
    """Standard deviation of the power seen in ``samples`` (pure; None with too few samples).

    Watt sources: of the sampled watts. Energy counters (cumulative joules): of the mean power of each
    interval between two samples.
    """
    if counter:
        values = [(b[1] - a[1]) / ((b[0] - a[0]) / 1e9) for a, b in itertools.pairwise(samples)
                  if b[0] > a[0]]
    else:
        values = [v for _, v in samples]
    return statistics.pstdev(values) if len(values) >= 2 else None


def _wait(stop: threading.Event, seconds: float) -> None:
    if seconds > 0 and stop.wait(seconds):
        raise InputError("idle calibration interrupted; nothing was written")


def calibrate_idle(config: DeviceConfig, state_dir: str | os.PathLike, *, duration_s: float = 10.0,
                   settle_s: float = DEFAULT_SETTLE_S, stop: threading.Event | None = None) -> IdleBaseline:
    """Sample the power source with nothing running; store and return the baseline.

    Waits ``settle_s`` first (the board calms down after start-up), then measures ``duration_s``.
    """
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise InputError(f"--duration must be longer than 0 s, got {duration_s}")
    if not (settle_s >= 0 and math.isfinite(settle_s)):
        raise InputError(f"--settle must be 0 s or more, got {settle_s}")
    stop = stop or threading.Event()
    source = open_power(config)
    if source is None:
        why = "the profile's [power] source is 'none'" if config.profile else "no power source is configured"
        raise InputError(f"calibrate-idle needs a power source, but {why}",
                         hint="pass --profile NAME (a board with a power sensor) or --power SPEC "
                              "(rapl, ina3221, pmic, hwmon:<chip>, serial:<meter>)")
    try:
        sampler = PowerSampler(source, config.sample_hz).start()
        try:
            _wait(stop, settle_s)
            t0 = time.monotonic_ns()
            _wait(stop, duration_s)
            t1 = time.monotonic_ns()
        finally:
            sampler.stop()
        window = sampler.window(t0, t1)
        inside = [s for s in sampler.samples() if t0 <= s[0] <= t1]
    finally:
        source.close()
    if window["errors"]:
        log.warning("%d of the power readings failed during calibration (last: %s)", window["errors"],
                    sampler.last_error)
    if window["mean_w"] is None:
        raise SourceError(f"power source {source.name!r}: too few readings in {duration_s:g} s at "
                          f"{config.sample_hz:g} Hz to measure idle power ({window['samples']} samples)",
                          hint="calibrate for longer (--duration), or check the sensor")
    idle = IdleBaseline(mean_w=round(window["mean_w"], 6), std_w=_round(power_std_w(inside, sampler.counter), 6),
                        samples=window["samples"], source=source.name, measured_at=round(time.time(), 3),
                        duration_s=round((t1 - t0) / 1e9, 3))
    save_idle(state_dir, idle)
    return idle


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


# --------------------------------------------------------------------------------------------------
# the opened device


class Device:
    """The power sampler, thermal/throttle monitor and idle baseline of one run (see ``open_device``)."""

    def __init__(self, config: DeviceConfig, source: PowerSource | None, sampler: PowerSampler | None,
                 idle: IdleBaseline | None, monitor: ThrottleMonitor, power_mode: PowerMode | None) -> None:
        self.config = config
        self.source = source
        self.sampler = sampler
        self.idle = idle
        self.monitor = monitor
        self.power_mode = power_mode

    @property
    def idle_w(self) -> float | None:
        return None if self.idle is None else self.idle.mean_w

    @property
    def power_source(self) -> str:
        return "none" if self.source is None else self.source.name

    def read(self) -> Reading:
        """Temperatures, CPU frequency and throttling now."""
        return self.monitor.read()

    def window_power(self, t0_ns: int, t1_ns: int) -> dict[str, Any] | None:
        """``build_window``'s ``power`` for ``[t0_ns, t1_ns]`` (``time.monotonic_ns``); None without a source."""
        if self.sampler is None or self.source is None:
            return None
        w = self.sampler.window(t0_ns, t1_ns)
        if w["errors"]:
            log.warning("%d power readings failed in this window (last: %s)", w["errors"], self.sampler.last_error)
        return telemetry_power(self.source.name, w, self.idle_w)

    def span_power(self, t0_ns: int, t1_ns: int, count: int, wall_s: float) -> dict[str, Any] | None:
        """Power over a timed loop that ran from ``t0_ns`` to ``t1_ns`` (monotonic) with ``count`` inferences.

        A short loop may fall between two samples, so the span is widened to the last sample at or before
        its start and the first at or after its end (waiting up to about one sampling period for it). The
        mean covers that span; energy per inference is mean (minus idle) × ``wall_s`` / ``count``.
        """
        if self.sampler is None or self.source is None:
            return None
        sampler = self.sampler
        deadline = time.monotonic_ns() + 2 * sampler.period_ns + int(READ_TIMEOUT_S * 1e9)
        while True:
            samples = sampler.samples()
            after = [t for t, _ in samples if t >= t1_ns]
            if after or time.monotonic_ns() >= deadline or not sampler.running:
                break
            time.sleep(sampler.period_ns / 4e9)
        before = [t for t, _ in samples if t <= t0_ns]
        w = sampler.window(before[-1] if before else t0_ns, after[0] if after else t1_ns)
        if w["errors"]:
            log.warning("%d power readings failed during the benchmark (last: %s)", w["errors"],
                        sampler.last_error)
        energy = energy_mj_per_inference(w["mean_w"], self.idle_w, wall_s, count)
        return {"source": self.source.name, "mean_w": _round(w["mean_w"], 4), "idle_w": _round(self.idle_w, 4),
                "energy_mj_per_inference": _round(energy, 6), "samples": w["samples"],
                "span_s": round(w["span_s"], 3), "sample_hz": sampler.hz, "note": self.source.note}

    def describe(self) -> dict[str, Any]:
        """What the run measures with, for the bench report, the MQTT birth and the log."""
        c = self.config
        return {
            "profile": c.profile,
            "profile_file": c.profile_file,
            "profile_note": c.profile_note,
            "power_source": self.power_source,
            "power_note": None if self.source is None else self.source.note,
            "sample_hz": None if self.sampler is None else self.sampler.hz,
            "idle_w": self.idle_w,
            "thermal_zones": [label for label, _ in self.monitor.thermal.zones],
            "throttle_c": c.throttle_c,
            "cpufreq_cores": len(self.monitor.cpufreq.cores),
            "get_throttled": self.monitor.vcgencmd is not None,
            "power_mode": None if self.power_mode is None else self.power_mode.to_dict(),
        }

    def log_summary(self) -> None:
        c = self.config
        if c.profile_note:
            log.warning("%s", c.profile_note)
        else:
            log.info("device profile %s (%s)", c.profile, c.profile_file)
        if self.source is None:
            log.info("power: none (power figures are null)")
        else:
            log.info("power: %s at %g Hz: %s", self.source.name, self.sampler.hz if self.sampler else 0,
                     self.source.note)
        missing = self.monitor.thermal.missing
        if missing:
            log.warning("thermal zones %s of the profile not found under %s: their temperatures are null",
                        ", ".join(missing), self.monitor.thermal.root)
        readers = self.monitor.sources()
        log.info("thermal/throttling: %s", "; ".join(readers) if readers else "nothing readable (null)")
        if self.power_mode is not None:
            log.info("Jetson power mode: %s (id %s)", self.power_mode.name, self.power_mode.id)

    def close(self) -> None:
        """Stop the sampler and close the source (re-raises a failure that killed the sampler)."""
        try:
            if self.sampler is not None:
                self.sampler.stop()
        finally:
            if self.source is not None:
                self.source.close()


def open_device(config: DeviceConfig, state_dir: str | os.PathLike | None = None) -> Device:
    """Open the power source (starting its sampler), the thermal/throttle readers and the idle baseline."""
    source = open_power(config)
    sampler: PowerSampler | None = None
    try:
        if source is not None:
            sampler = PowerSampler(source, config.sample_hz).start()
        idle = load_idle(state_dir, None if source is None else source.name)
        thermal = ThermalReader(config.sysfs_root / "class" / "thermal", config.zones)
        monitor = ThrottleMonitor(thermal, CpuFreqReader(config.sysfs_root), VcgencmdThrottle(config.vcgencmd),
                                  config.throttle_c)
        nvp = NvpmodelQuery(config.nvpmodel)
        power_mode = nvp.read() if nvp.available else None
    except BaseException:
        if sampler is not None:
            sampler.stop()
        if source is not None:
            source.close()
        raise
    device = Device(config, source, sampler, idle, monitor, power_mode)
    device.log_summary()
    return device
