"""``edge-agent``: the device-side command line.

    edge-agent bench --bundle B [--pubkey K] [--warmup N] [--count N | --duration S --min-count N]
                     [--threads N] [--source S] [--state-dir DIR] [DEVICE OPTIONS] [--json]
    edge-agent run   [--config PATH] [--bundle B] [--pubkey K] [--duration S] [--source S] [--mqtt HOST:PORT]
                     [--device-id ID] [--window S] [--state-dir DIR] [--threads N] [DEVICE OPTIONS] [--json]
                     [--mqtt-protocol 5|3.1.1] [--mqtt-user U --mqtt-password-file F] [--mqtt-prefix P]
                     [--mqtt-tls-ca CA [--mqtt-cert C --mqtt-key K]] [--spool-max-mb M] [--spool-max-age-h H]
    edge-agent install-service [--dry-run] [--root DIR] [--user U] [--config PATH] [--profile NAME|PATH]
                     [--exec PATH] [--memory-max SIZE] [--watchdog-sec S] [--json]
    edge-agent calibrate-idle --state-dir DIR [--duration S] [--settle S] [DEVICE OPTIONS] [--json]
    edge-agent infer --bundle B [--pubkey K] --input FILE.npy [--threads N] [--json]

DEVICE OPTIONS: ``--profile NAME|PATH`` (default: the bundle manifest's profile; when it is not found the
agent runs without power/thermal settings and says so), ``--profiles-dir DIR``, ``--power SPEC`` (overrides
the profile's ``[power] source``: ``none``, ``rapl``, ``ina3221``, ``pmic``, ``hwmon:<chip>``,
``serial:<meter>``), ``--power-port PORT``, ``--sysfs-root DIR`` (default /sys), ``--vcgencmd PATH``,
``--nvpmodel PATH``. A power source the profile names but the board lacks is an error (exit 2) unless
``--power none`` is given. See ``edge_agent.hardware``.

``run --config PATH`` reads the agent's config file (edge_agent/config.py; default
/etc/edge-agent/config.toml when it exists and no ``--bundle`` is given): flags given on the command line
win over the file, the file wins over the built-in defaults. ``install-service`` writes the systemd unit
(edge_agent/systemd_unit.py), a default config when there is none, creates the service user and enables
the service; ``--root DIR`` writes under DIR and enables nothing, ``--dry-run`` only prints.

``bench`` counts: ``--count N`` alone runs exactly N timed inferences (default 500); ``--duration S`` and
``--min-count N`` (MLPerf single-stream style) run until both at least N inferences and S seconds have
passed; ``--count`` with either of them is an error.

``infer`` runs ONE input through the verified bundle and prints every output raw and dequantized
(int8/uint8 outputs with the manifest's scale and zero point; other dtypes: dequantized = raw; int8/uint8
without quantization parameters: null). The input holds exactly one sample: the input's shape, or that
shape without its batch axis; float data for an int8/uint8 input is quantized with the input's scale and
zero point (.npz with one array per input name for multi-input models). ``--json`` prints exactly
``{"outputs": [{"name", "shape", "dtype", "raw", "dequantized"}], "latency_ms"}``; the text form adds a
top-5 for classifier outputs (with labels when the bundle has a labels member).

Errors: every ``EdgekitError`` is printed on stderr with its hint and ends the process with its exit code
(2 for bad input, 1 for a failure); with ``--json`` the error is also printed as JSON on stdout. A bad
model (corrupt, or a custom op the runtime lacks) is exit 2; an accelerator the profile requires
(``cpu_fallback = false``) that cannot be loaded is a ``BackendError``, exit 1.
Anything else is a bug and is not swallowed. This module imports nothing heavy: runtimes are loaded by
the backend that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.errors import EdgekitError, InputError, SourceError

if TYPE_CHECKING:
    from edge_agent.hardware import DeviceOptions

PROG = "edge-agent"


_HOSTPORT = re.compile(r"\[(?P<v6>[0-9A-Fa-f:.]+)\](?::(?P<p6>\d+))?|(?P<host>[^\s:\[\]/]+)(?::(?P<port>\d+))?")


def parse_hostport(text: str, default_port: int = 1883) -> tuple[str, int]:
    """``HOST:PORT``, ``HOST`` (port 1883) or ``[IPv6]:PORT`` -> (host, port); InputError otherwise."""
    m = _HOSTPORT.fullmatch(text)
    if not m:
        raise InputError(f"--mqtt {text!r} is not HOST:PORT", hint="e.g. --mqtt broker.local:1883")
    host = m.group("v6") or m.group("host")
    port_s = m.group("p6") or m.group("port")
    if port_s is None:
        return host, default_port
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise InputError(f"--mqtt {text!r}: port {port} is not from 1 to 65535",
                         hint="e.g. --mqtt broker.local:1883")
    return host, port


def _build_parser() -> argparse.ArgumentParser:
    from edge_agent.config import DEFAULT_CONFIG_PATH, UNSET, UNSET_DESTS

    p = argparse.ArgumentParser(prog=PROG, description="edgekit device agent: run, measure and report a "
                                "signed model bundle.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_device_options(sp: argparse.ArgumentParser, default_profile: str) -> None:
        g = sp.add_argument_group("device (power, thermal, throttling)")
        g.add_argument("--profile", metavar="NAME|PATH", help=f"device profile (default: {default_profile})")
        g.add_argument("--profiles-dir", metavar="DIR", help="extra folder of <name>.toml profiles (searched "
                       "before $EDGEKIT_PROFILES_DIR and the shipped ones)")
        g.add_argument("--power", metavar="SPEC", help="power source, overriding the profile's: none, rapl, "
                       "ina3221, pmic, hwmon:<chip>, serial:um25c|um34c|ina219-csv")
        g.add_argument("--power-port", metavar="PORT", help="serial port of a USB meter (overrides the profile's)")
        g.add_argument("--sysfs-root", metavar="DIR", default="/sys", help="the folder that plays /sys for power "
                       "sensors, thermal zones and cpufreq (default /sys)")
        g.add_argument("--vcgencmd", metavar="PATH", default="vcgencmd",
                       help="Raspberry Pi vcgencmd (get_throttled, pmic_read_adc); default: on PATH")
        g.add_argument("--nvpmodel", metavar="PATH", default="nvpmodel",
                       help="Jetson nvpmodel (power mode); default: on PATH")

    def common(sp: argparse.ArgumentParser, bundle_required: bool = True) -> None:
        if bundle_required:
            sp.add_argument("--bundle", required=True, help="the signed .edgebundle to run")
        else:
            sp.add_argument("--bundle", help="run this signed .edgebundle as it is, bypassing the model store "
                            "(default: serve the store's active version in --state-dir and take new ones)")
        sp.add_argument("--pubkey", help="public key to verify the bundle with (default: "
                        "/etc/edge-agent/trusted.pub, then ~/.config/edgekit/keys/edgekit-signing.pub)")
        sp.add_argument("--threads", type=int, help="intra-op threads (default: the profile's)")
        sp.add_argument("--source", default="synthetic",
                        help="inputs: synthetic, npy:PATH (.npy/.npz) or images:DIR (default: synthetic)")
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        add_device_options(sp, "the bundle manifest's profile")

    b = sub.add_parser("bench", help="measure latency and throughput of a bundle on this device")
    common(b)
    b.add_argument("--warmup", type=int, default=20, help="inferences run before timing (default 20)")
    b.add_argument("--count", type=int, help="exactly N timed inferences (default 500 when neither --duration "
                   "nor --min-count is given; not combinable with them)")
    b.add_argument("--duration", type=float,
                   help="time at least S seconds (with --min-count: until both are met)")
    b.add_argument("--min-count", type=int,
                   help="time at least N inferences (with --duration: until both are met)")
    b.add_argument("--state-dir", help="folder holding the idle baseline (idle_power.json) to subtract")

    r = sub.add_parser("run", help="serve the model store (or one --bundle) and report telemetry windows")
    common(r, bundle_required=False)
    r.add_argument("--duration", type=float, help="seconds to run (default: until SIGTERM/SIGINT)")
    r.add_argument("--window", type=float, default=10.0, help="seconds per telemetry window (default 10)")
    r.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker for telemetry (default: offline)")
    r.add_argument("--device-id", help="device id in topics and windows (default: the host name)")
    r.add_argument("--state-dir", help="folder that keeps the model store (models/), the window sequence number "
                   "across restarts, the idle baseline (idle_power.json) and, with --mqtt, the durable telemetry "
                   "spool (spool.db); without --bundle default /var/lib/edge-agent (the service's)")
    d = r.add_argument_group("deployment (model store mode: no --bundle)")
    d.add_argument("--inbox", action="append", default=[], metavar="DIR",
                   help="folder watched for new *.edgebundle files; repeatable. The first is where `edgekit push "
                   "ssh://…` lands (files there are removed after activation, with a <file>.result.json left "
                   "beside); others, e.g. a USB stick's mount point, are only read (default: <state-dir>/inbox)")
    d.add_argument("--group", action="append", default=[], metavar="NAME",
                   help="also take bundles pushed to the MQTT group NAME (edgekit/group/NAME/deploy); repeatable")
    d.add_argument("--keep", type=int, default=3, help="model versions kept in the store (default 3)")
    d.add_argument("--health-inferences", type=int, default=50, metavar="N",
                   help="inferences a new model must run without error after the switch (default 50)")
    m = r.add_argument_group("MQTT telemetry (with --mqtt)")
    m.add_argument("--mqtt-protocol", choices=("5", "3.1.1"), default="5",
                   help="MQTT version (default 5; with 3.1.1 a broker that denies a publish by ACL drops it "
                   "silently, so denials cannot be seen)")
    m.add_argument("--mqtt-user", metavar="NAME", help="user name for the broker")
    m.add_argument("--mqtt-password-file", metavar="FILE", help="file whose first line is the password "
                   "(never on the command line)")
    m.add_argument("--mqtt-tls-ca", metavar="PEM", help="CA certificate that signed the broker's (turns TLS on)")
    m.add_argument("--mqtt-cert", metavar="PEM", help="client certificate (TLS client authentication)")
    m.add_argument("--mqtt-key", metavar="PEM", help="client certificate's unencrypted key (mode 600)")
    m.add_argument("--spool-max-mb", type=float, default=64.0,
                   help="bound of the telemetry spool in MiB; beyond it the oldest windows are dropped "
                   "(default 64)")
    m.add_argument("--spool-max-age-h", type=float, default=168.0,
                   help="windows older than this many hours are dropped from the spool (default 168 = 7 days)")
    m.add_argument("--mqtt-prefix", metavar="PREFIX", default="edgekit",
                   help="topic prefix: PREFIX/<device>/telemetry … (default edgekit)")
    r.add_argument("--config", metavar="PATH", help="the agent's config file (TOML; default: "
                   f"{DEFAULT_CONFIG_PATH} when it exists and no --bundle is given); flags given here win over it")
    # "not given" must be told from "given with the default value": the config file fills what is UNSET
    r.set_defaults(**{dest: UNSET for dest in UNSET_DESTS})

    s = sub.add_parser("install-service", help="install the agent as a systemd service (unit, config, user)")
    s.add_argument("--dry-run", action="store_true", help="print what would be written and run; change nothing")
    s.add_argument("--root", default="/", metavar="DIR", help="write every file under DIR instead of / and "
                   "enable nothing (packaging, tests)")
    s.add_argument("--user", default="edge-agent", help="the dedicated system user the service runs as "
                   "(created with useradd --system when missing; default edge-agent)")
    s.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), metavar="PATH",
                   help=f"the config file the service reads (default {DEFAULT_CONFIG_PATH}); written with every "
                   "key at its default only when it does not exist")
    s.add_argument("--profile", metavar="NAME|PATH", help="device profile the unit's device rules follow "
                   "(default: the existing config's profile)")
    s.add_argument("--profiles-dir", metavar="DIR", help="extra folder of <name>.toml profiles")
    s.add_argument("--exec", dest="exec_path", metavar="PATH", help="the edge-agent executable the unit starts "
                   "(default: the one beside this Python, else on PATH)")
    s.add_argument("--memory-max", default="75%", metavar="SIZE",
                   help="MemoryMax= of the service: 512M, 2G, 75%% of RAM (default 75%%)")
    s.add_argument("--watchdog-sec", type=int, default=30, metavar="S",
                   help="WatchdogSec=: a loop that does not ping for S seconds is restarted (default 30)")
    s.add_argument("--json", action="store_true", help="print the steps as JSON")

    c = sub.add_parser("calibrate-idle", help="measure the board's idle power (no inference) for energy figures")
    c.add_argument("--state-dir", required=True, help="folder to write idle_power.json to (the one run/bench "
                   "get with --state-dir)")
    c.add_argument("--duration", type=float, default=10.0, help="seconds to measure (default 10)")
    c.add_argument("--settle", type=float, default=2.0, help="seconds to wait before measuring (default 2)")
    c.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    add_device_options(c, "none: give --profile or --power")

    i = sub.add_parser("infer", help="run one input through a bundle and print its outputs")
    i.add_argument("--bundle", required=True, help="the signed .edgebundle to run")
    i.add_argument("--pubkey", help="public key to verify the bundle with (default: as for run)")
    i.add_argument("--input", required=True, help="one sample: .npy of the input's shape (batch axis optional), "
                   "or .npz with one array per input name")
    i.add_argument("--threads", type=int, help="intra-op threads (default: the profile's)")
    i.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    from edge_agent.models_cli import add_models_parser

    add_models_parser(sub)  # models list | activate VERSION | rollback (edge_agent/models_cli.py)
    from edge_agent.doctor import add_doctor_parser

    add_doctor_parser(sub)  # doctor: the board against its profile (edge_agent/doctor.py)
    return p


def _print_bench(result: dict[str, Any]) -> None:
    b = result["bundle"]
    lat = result["latency_ms"]
    rows = [
        ("bundle", f"{b['name']} {b['version']} (profile {b['profile']})"),
        ("engine", result["engine"]),
        ("providers", (", ".join(result["providers"]) or "none")
         + (f"  (requested: {', '.join(result['providers_requested'])})"
            if result["providers"] != result["providers_requested"] else "")),
        ("degraded", f"yes: {result['degraded_reason']}" if result["degraded"] else "no"),
        *((("delegated", f"{result['delegated_nodes']} of {result['total_nodes']} nodes "
            f"({result['delegate'] or 'no delegate'})"),) if result.get("total_nodes") is not None else ()),
        ("threads", str(result["threads"] or "default")),
        ("init", f"{result['init_ms']:.1f} ms"),
        ("first inference", f"{result['first_inference_ms']:.3f} ms"),
        ("golden check", _golden_text(result.get("golden_check"))),
        ("warm-up / timed", f"{result['warmup']} / {result['count']} in {result['wall_s']:.3f} s"
         + (f" (until >= {result['stop_rule']['min_count']} and >= {result['stop_rule']['duration_s']:g} s)"
            if "min_count" in result["stop_rule"] else "")),
        *((f"latency {k}", f"{lat[k]:.4f} ms") for k in ("p50", "p90", "p95", "p99", "p999", "max", "mean",
                                                          "std")),
        ("throughput", f"{result['throughput_ips']:.1f} inferences/s"),
        ("peak RSS", f"{result['peak_rss_mb']:.1f} MiB"),
        *_device_rows(result),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _fmt_opt(value: float | None, fmt: str, unit: str) -> str:
    return "-" if value is None else f"{value:{fmt}} {unit}"


def _device_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    dev = result["device"]
    power = result["power"]
    rows = [("device profile", dev["profile"] or f"none ({dev['profile_note']})")]
    if power is None:
        rows.append(("power", "- (no power source)"))
    else:
        rows.append(("power", f"{_fmt_opt(power['mean_w'], '.3f', 'W')} mean ({power['source']}, "
                              f"{power['samples']} samples at {power['sample_hz']:g} Hz)"))
        rows.append(("idle power", _fmt_opt(power["idle_w"], ".3f", "W") if power["idle_w"] is not None
                     else "- (no baseline: run calibrate-idle)"))
        energy = _fmt_opt(power["energy_mj_per_inference"], ".4f", "mJ")
        rows.append(("energy/inference", energy + (" (idle-subtracted)" if power["idle_w"] is not None else "")))
    rows.append(("temperature", f"{_fmt_opt(result['temp_c_start'], '.1f', 'C')} -> "
                                f"{_fmt_opt(result['temp_c_end'], '.1f', 'C')}"))
    rows.append(("cpu frequency", f"{_fmt_opt(result['cpu_mhz_start'], '.0f', 'MHz')} -> "
                                  f"{_fmt_opt(result['cpu_mhz_end'], '.0f', 'MHz')}"))
    seen = result["throttled_seen"]
    rows.append(("throttled", "- (unknown)" if seen is None else
                 ("yes: " + "; ".join(result["throttle_reasons"])) if seen else "no"))
    if dev["power_mode"] is not None:
        rows.append(("power mode", f"{dev['power_mode']['name']} (id {dev['power_mode']['id']})"))
    return rows


def device_options(args: argparse.Namespace) -> DeviceOptions:
    from edge_agent.hardware import DeviceOptions

    return DeviceOptions(profile=args.profile, profiles_dir=args.profiles_dir, power=args.power,
                         power_port=args.power_port, sysfs_root=Path(args.sysfs_root), vcgencmd=args.vcgencmd,
                         nvpmodel=args.nvpmodel)


def _cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.benchmark import bench

    result = bench(args.bundle, args.pubkey, warmup=args.warmup, count=args.count, threads=args.threads,
                   source=args.source, duration_s=args.duration, min_count=args.min_count,
                   hardware=device_options(args), state_dir=args.state_dir)
    if args.json:
        print(json.dumps(result))
    else:
        _print_bench(result)
    return 0


def _read_password(path: str) -> str:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise InputError(f"cannot read the MQTT password file {path}: {e.strerror}") from e
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise InputError(f"the MQTT password file {path} is empty", hint="write the password on its first line")
    return lines[0]


def mqtt_settings(args: argparse.Namespace) -> Any:
    """The MQTT options of ``run`` as ``MqttSettings``; InputError (exit 2) for unusable ones.

    Errors name the flag, or the config key and file when the value came from ``--config``.
    """
    from edge_agent.config import check_private_file, option_label
    from edge_agent.telemetry.mqtt import MqttSettings, TlsOptions

    def label(dest: str) -> str:
        return option_label(args, dest, "--" + dest.replace("_", "-"))

    used = [label(d) for d in ("mqtt_user", "mqtt_password_file", "mqtt_tls_ca", "mqtt_cert", "mqtt_key")
            if getattr(args, d) is not None]
    if args.mqtt is None:
        if used:
            raise InputError(f"{', '.join(used)} need --mqtt HOST:PORT")
        return None
    if args.mqtt_password_file is not None and args.mqtt_user is None:
        raise InputError(f"{label('mqtt_password_file')} needs --mqtt-user")
    if (args.mqtt_cert is None) != (args.mqtt_key is None):
        raise InputError("--mqtt-cert and --mqtt-key go together")
    if args.mqtt_cert is not None and args.mqtt_tls_ca is None:
        raise InputError("--mqtt-cert needs --mqtt-tls-ca (the CA that signed the broker's certificate)")
    for dest in ("mqtt_tls_ca", "mqtt_cert", "mqtt_key", "mqtt_password_file"):
        value = getattr(args, dest)
        if value is not None and not Path(value).is_file():
            raise InputError(f"{label(dest)} {value} does not exist")
    for dest in ("mqtt_key", "mqtt_password_file"):
        if getattr(args, dest) is not None:
            check_private_file(getattr(args, dest), label(dest))
    tls = None
    if args.mqtt_tls_ca is not None:
        tls = TlsOptions(Path(args.mqtt_tls_ca), None if args.mqtt_cert is None else Path(args.mqtt_cert),
                         None if args.mqtt_key is None else Path(args.mqtt_key))
    password = None if args.mqtt_password_file is None else _read_password(args.mqtt_password_file)
    return MqttSettings(protocol=5 if args.mqtt_protocol == "5" else 4, username=args.mqtt_user,
                        password=password, tls=tls)


def run_config(args: argparse.Namespace) -> argparse.Namespace:
    """``run``'s args merged with its config file (``--config``, else the default one when it exists and no
    ``--bundle`` is given): flags given win, then the file, then built-in defaults. The config in use (or
    None) is ``args.agent_config``; its ``log_level`` applies unless -v was given."""
    from edge_agent.config import DEFAULT_CONFIG_PATH, load_config, merge

    path = args.config
    if path is None and args.bundle is None and DEFAULT_CONFIG_PATH.is_file():
        path = str(DEFAULT_CONFIG_PATH)
    config = load_config(path) if path is not None else None
    merged = merge(args, config)
    merged.agent_config = config
    if config is not None:
        logging.getLogger(PROG).info("config %s", config.source_file)
        if args.verbose == 0:
            logging.getLogger().setLevel(config.log_level.upper())
    return merged


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.service import _summary, run_agent

    args = run_config(args)
    mqtt = parse_hostport(args.mqtt) if args.mqtt is not None else None
    settings = mqtt_settings(args)
    if args.spool_max_mb <= 0 or args.spool_max_age_h <= 0:
        raise InputError("--spool-max-mb and --spool-max-age-h must be greater than 0")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logging.getLogger(PROG).info("signal %d: finishing the current window", signum)
        stop.set()

    def on_window(window: dict[str, Any]) -> None:
        print(json.dumps(window) if args.json else _summary(window), flush=True)

    hup = threading.Event()

    def on_hup(signum: int, frame: Any) -> None:
        hup.set()

    def reloader() -> dict[str, Any]:
        from edge_agent.config import diff, load_config

        old = args.agent_config
        assert old is not None
        new = load_config(old.source_file)  # a bad file raises: the agent goes on with the old config
        live, restart = diff(old, new)
        if restart:
            logging.getLogger(PROG).warning("config %s: %s changed; that takes effect at the next restart "
                                            "(systemctl restart edge-agent)", new.source_file, ", ".join(restart))
        if "log_level" in live and args.verbose == 0:
            logging.getLogger().setLevel(str(live["log_level"]).upper())
        args.agent_config = new
        return live

    from edge_agent.sdnotify import Notifier

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    try:
        run_agent(args.bundle, args.pubkey, source=args.source, duration=args.duration, window_s=args.window,
                  mqtt=mqtt, device_id=args.device_id or socket.gethostname(), state_dir=args.state_dir,
                  threads=args.threads, on_window=on_window, stop=stop, hardware=device_options(args),
                  mqtt_settings=settings, spool_max_bytes=int(args.spool_max_mb * 2**20),
                  spool_max_age_s=args.spool_max_age_h * 3600.0, inboxes=args.inbox, groups=args.group,
                  keep=args.keep, health_n=args.health_inferences, topic_prefix=args.mqtt_prefix,
                  notifier=Notifier.from_env(), reload=hup,
                  reloader=reloader if args.agent_config is not None else None)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def _cmd_install_service(args: argparse.Namespace) -> int:
    from edge_agent.systemd_unit import install_service

    steps = install_service(args.root, dry_run=args.dry_run, user=args.user, config=args.config,
                            profile=args.profile, profiles_dir=args.profiles_dir, exec_path=args.exec_path,
                            memory_max=args.memory_max, watchdog_s=args.watchdog_sec)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "root": args.root,
                          "steps": [step._asdict() for step in steps]}))
        return 0
    for step in steps:
        if step.action == "write" and args.dry_run:
            print(f"----- would write {step.target} -----")
            print(step.content, end="" if step.content.endswith("\n") else "\n")
            print(f"----- end of {step.target} -----")
        elif step.action == "write":
            print(f"wrote {step.target}")
        elif step.action == "keep":
            print(f"{'would keep' if args.dry_run else 'kept'} {step.target} ({step.content})")
        elif step.action == "run":
            print(f"{'would run' if args.dry_run else 'ran'}: {step.target}")
        else:
            print(f"note: {step.content}")
    return 0


def _cmd_calibrate_idle(args: argparse.Namespace) -> int:
    from edge_agent.hardware import calibrate_idle, idle_path, resolve_device

    config = resolve_device(device_options(args), None)
    if config.profile_note and args.power is None:
        raise InputError("calibrate-idle needs to know the power source: pass --profile NAME|PATH or --power SPEC",
                         hint="e.g. --profile x86-64 (RAPL) or --power hwmon:ina219")
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if not args.json:
            print(f"measuring idle power with {config.power_spec}: settle {args.settle:g} s, then "
                  f"{args.duration:g} s; keep the board idle", file=sys.stderr, flush=True)
        idle = calibrate_idle(config, args.state_dir, duration_s=args.duration, settle_s=args.settle, stop=stop)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    path = idle_path(args.state_dir)
    if args.json:
        print(json.dumps({**idle.to_dict(), "path": str(path)}))
    else:
        std = "-" if idle.std_w is None else f"{idle.std_w:.4f}"
        print(f"idle power {idle.mean_w:.4f} W (std {std} W, {idle.samples} samples over {idle.duration_s:g} s, "
              f"source {idle.source}) written to {path}")
    return 0


# --------------------------------------------------------------------------------------------------
# infer


TOP_K = 5
_QUANTIZED = ("int8", "uint8")


@dataclass
class InferResult:
    """One inference: ``outputs`` as printed by ``--json``, plus what the text form shows."""

    outputs: list[dict[str, Any]]
    latency_ms: float
    bundle: dict[str, str]
    backend: dict[str, Any]
    inputs: list[dict[str, Any]]
    output_specs: list[dict[str, Any]]
    labels: list[str] | None

    def to_json(self) -> dict[str, Any]:
        return {"outputs": self.outputs, "latency_ms": self.latency_ms}


def _output_entry(name: str, arr: Any, scale: float | None, zero_point: int | None) -> dict[str, Any]:
    import numpy as np

    from edge_agent.preprocess import dequantize

    arr = np.asarray(arr)
    if arr.dtype.name in _QUANTIZED:
        deq = None if scale is None or zero_point is None else dequantize(arr, scale, zero_point).tolist()
    else:
        deq = arr.tolist()
    return {"name": name, "shape": list(arr.shape), "dtype": arr.dtype.name, "raw": arr.tolist(),
            "dequantized": deq}


def _read_labels(root: Path | None, member: str | None) -> list[str] | None:
    if root is None or member is None:
        return None
    path = root / member
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"labels member {member!r} of the bundle cannot be read: {e}",
                         hint="rebuild the bundle with a UTF-8 labels file, one class per line") from e
    return [line.strip() for line in text.splitlines()]


def infer(bundle: str, pubkey: str | None, input_path: str, *, threads: int | None = None) -> InferResult:
    """Verify and unpack ``bundle``, run the one sample in ``input_path``, return the outputs."""
    from edge_agent.service import open_session

    path = Path(input_path).expanduser()
    if not path.is_file():
        raise SourceError(f"--input {path} does not exist or is not a file",
                          hint="pass a .npy file holding one sample of the model's input")
    with open_session(bundle, pubkey, source=f"npy:{path}", threads=threads) as sess:
        count = len(sess.source) if isinstance(sess.source, Sized) else 1
        if count != 1:
            specs = sess.backend.inputs
            want = ", ".join(f"{t.name!r} {tuple(1 if d < 0 else d for d in t.shape)} "
                             f"(or {tuple(1 if d < 0 else d for d in t.shape[1:])} without the batch axis)"
                             for t in specs)
            raise SourceError(f"{path}: holds {count} samples; infer runs exactly one, shaped like input {want}",
                              hint="save a single sample, e.g. numpy.save(path, samples[0])")
        feeds = sess.source.next()
        t0 = time.perf_counter_ns()
        raw = sess.backend.run(feeds)
        latency_ms = (time.perf_counter_ns() - t0) / 1e6
        m = sess.manifest
        outputs = [_output_entry(spec.name, arr, spec.scale, spec.zero_point)
                   for spec, arr in zip(sess.backend.outputs, raw, strict=True)]
        return InferResult(
            outputs=outputs, latency_ms=round(latency_ms, 4),
            bundle={"name": m.name, "version": m.version, "profile": m.profile},
            backend=sess.backend.info(),
            inputs=[{"name": t.name, "shape": list(f.shape), "dtype": f.dtype.name}
                    for t, f in zip(sess.backend.inputs, feeds, strict=True)],
            output_specs=[t.to_dict() for t in sess.backend.outputs],
            labels=_read_labels(sess.root, m.labels),
        )


def top_k(scores: Sequence[float], k: int = TOP_K) -> list[tuple[int, float]]:
    """The ``k`` highest (index, score) pairs, best first; ties by lower index."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return [(i, scores[i]) for i in order[:k]]


def _is_classifier(shape: Sequence[int]) -> bool:
    """One row of at least two scores: (N,) or (1, N) / (1, 1, N)."""
    return len(shape) >= 1 and shape[-1] >= 2 and all(d == 1 for d in shape[:-1])


def _flat(values: Any) -> list[Any]:
    out: list[Any] = []
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(reversed(v))
        else:
            out.append(v)
    return out


def _fmt_value(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _fmt_values(values: list[Any]) -> str:
    return "[" + ", ".join(map(_fmt_value, values)) + "]"


def _print_infer(result: InferResult, input_path: str) -> None:
    b, info = result.bundle, result.backend
    engine = info["engine"] + (f" ({info['runtime']})" if info.get("runtime") else "")
    if info.get("total_nodes") is not None:
        engine += (f"; {info['delegated_nodes']} of {info['total_nodes']} nodes delegated"
                   f" ({info['delegate'] or 'no delegate'})")
    elif info.get("providers"):
        engine += f"; {', '.join(info['providers'])}"
    rows = [("bundle", f"{b['name']} {b['version']} (profile {b['profile']})"), ("engine", engine)]
    if info["degraded"]:
        rows.append(("degraded", f"yes: {info['degraded_reason']}"))
    rows += [("input", f"{input_path} -> " + ", ".join(f"{i['name']} {tuple(i['shape'])} {i['dtype']}"
                                                     for i in result.inputs)),
             ("latency", f"{result.latency_ms:.3f} ms")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    for out, spec in zip(result.outputs, result.output_specs, strict=True):
        quant = (f", scale {spec['scale']:.6g} zero point {spec['zero_point']}"
                 if out["dtype"] in _QUANTIZED and spec.get("scale") is not None else "")
        print(f"\noutput {out['name']}: shape {tuple(out['shape'])} {out['dtype']}{quant}")
        raw = _flat(out["raw"])
        deq = _flat(out["dequantized"]) if out["dequantized"] is not None else None
        scores = deq if deq is not None else raw
        if _is_classifier(out["shape"]):
            labels = result.labels
            print(f"  top-{min(TOP_K, len(scores))}")
            print(f"  {'rank':<5} {'index':>6}  {'raw':>12}  {'score':>12}  label")
            for rank, (i, score) in enumerate(top_k(scores), 1):
                label = labels[i] if labels is not None and i < len(labels) else "-"
                print(f"  {rank:<5} {i:>6}  {_fmt_value(raw[i]):>12}  {score:>12.6g}  {label}")
        elif len(raw) <= 16:
            print(f"  raw          {_fmt_values(raw)}")
            print(f"  dequantized  {_fmt_values(deq) if deq is not None else '- (no scale/zero point)'}")
        else:
            print(f"  {len(raw)} values; dequantized min {min(scores):.6g} max {max(scores):.6g} "
                  f"mean {sum(scores) / len(scores):.6g}")


def _cmd_infer(args: argparse.Namespace) -> int:
    result = infer(args.bundle, args.pubkey, args.input, threads=args.threads)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _print_infer(result, args.input)
    return 0



def _golden_text(g: dict | None) -> str:
    if g is None:
        return "no golden data in the bundle"
    verdict = "ok" if g["within_atol"] else "DIFFERS beyond the tolerance"
    return f"{verdict} (max |diff| {g['max_abs_diff']:.4g}, tolerance {g['atol']})"

def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command == "models":
        from edge_agent.models_cli import run_models

        return run_models(args)  # prints its own errors
    if args.command == "doctor":
        from edge_agent.doctor import run_doctor

        return run_doctor(args)  # prints its own errors
    handler = {"bench": _cmd_bench, "run": _cmd_run, "infer": _cmd_infer,
               "calibrate-idle": _cmd_calibrate_idle, "install-service": _cmd_install_service}[args.command]
    try:
        return handler(args)
    except EdgekitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(e.to_dict()), flush=True)
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
