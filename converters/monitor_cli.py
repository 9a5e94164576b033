"""`edgekit monitor` and `edgekit report`: the command-line side of converters/monitor.py and report.py.

``register(subparsers)`` adds both subcommands to edgekit's parser (converters/cli.py). Handlers return
the exit code (0 ok) and raise EdgekitError for the rest (1: failure of the work, e.g. an unreachable
broker; 2: bad input); with ``--json`` scripts read one JSON document (``--once``, ``report``) or JSON lines
(``--headless``) on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from converters.monitor import (
    DEFAULT_THROTTLE_C,
    MAX_MESSAGE_BYTES,
    Alert,
    Monitor,
    TlsOptions,
    compute_alerts,
    default_client_id,
    run_headless,
)
from edge_agent.errors import InputError

DEFAULT_STORE = "edgekit-telemetry.db"


def parse_broker(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit():
        raise InputError(f"--broker {text!r} is not HOST:PORT", hint="e.g. --broker broker.local:1883")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InputError(f"--broker {text!r}: port {port} is not from 1 to 65535",
                         hint="e.g. --broker broker.local:1883")
    return host, port


def _read_password(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read --password-file {path}: {e}",
                         hint="a file holding the MQTT password on its first line (mode 600)") from e
    return lines[0] if lines else ""


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _num(v: Any, fmt: str = "{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def fleet_table(rows: list[dict[str, Any]], alerts: list[Alert], counters: dict[str, int] | None = None) -> Any:
    """The fleet as a rich Table (one row per device); devices with an alert are highlighted."""
    from rich.table import Table

    kinds: dict[str, list[str]] = {}
    for a in alerts:
        kinds.setdefault(a.device, []).append(a.kind)
    caption = None
    if counters is not None:
        bad = sum(counters[k] for k in ("malformed", "oversized", "wrong_schema", "device_mismatch", "errors"))
        caption = (f"received {counters['received']}  stored {counters['stored']}  duplicates "
                   f"{counters['duplicates']}  rejected {bad}  store errors {counters['store_errors']}")
    table = Table(title=f"edgekit fleet: {len(rows)} devices, {len(alerts)} alerts", caption=caption)
    for col, justify in (("device", "left"), ("state", "left"), ("profile", "left"), ("model", "left"),
                         ("p50 ms", "right"), ("p99 ms", "right"), ("fps", "right"), ("W", "right"),
                         ("mJ/inf", "right"), ("°C", "right"), ("throttled", "left"), ("dropped", "right"),
                         ("last seen", "right"), ("spool", "right"), ("alerts", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        dev_alerts = kinds.get(r["device"], [])
        state = r["state"]
        state_txt = f"[green]{state}[/]" if state == "online" else f"[red]{state}[/]"
        if "offline" in dev_alerts:
            state_txt = "[red]offline[/]"
        model = f"{r['model']} {r['model_version']}" if r["model"] else "-"
        table.add_row(
            r["device"], state_txt, r["profile"] or "-", model, _num(r["p50_ms"]), _num(r["p99_ms"]),
            _num(r["fps"], "{:.1f}"), _num(r["power_w"]), _num(r["energy_mj_per_inference"]),
            _num(r["temp_c"], "{:.1f}"), "-" if r["throttled"] is None else ("yes" if r["throttled"] else "no"),
            _num(r["dropped"], "{}"), _ago(r["last_seen_ago_s"]), _num(r["spool_depth"], "{}"),
            f"[bold red]{', '.join(dev_alerts)}[/]" if dev_alerts else "",
            style="on grey15" if dev_alerts else None,
        )
    return table


# --------------------------------------------------------------------------------------------------
# monitor


def _make_monitor(args: argparse.Namespace, *, once: bool) -> Monitor:
    from converters.store import open_store

    host, port = parse_broker(args.broker)
    tls = None
    if args.tls or args.tls_ca or args.tls_cert or args.tls_key:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise InputError("--tls-cert and --tls-key go together", hint="give both for a client certificate")
        tls = TlsOptions(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, insecure=args.tls_insecure)
    password = _read_password(args.password_file)
    if password is not None and args.username is None:
        raise InputError("--password-file needs --username")
    # --once is a short look: it must not take over the long-running monitor's persistent session
    # (same client id), so it uses a throwaway id and a clean session unless --client-id is given.
    persistent = not once or args.client_id is not None
    client_id = args.client_id or (f"{default_client_id()}-once-{os.getpid()}" if once
                                   else default_client_id())
    store = None if args.no_store else open_store(args.store)
    return Monitor(host, port, store=store, prefix=args.prefix, client_id=client_id,
                   share_group=args.share_group, devices=args.devices, persistent=persistent,
                   session_expiry=args.session_expiry, tls=tls, username=args.username, password=password,
                   max_bytes=args.max_bytes, profiles_dir=args.profiles_dir)


def _close(mon: Monitor) -> None:
    mon.stop()
    if mon.store is not None:
        mon.store.close()


def cmd_monitor(args: argparse.Namespace) -> int:
    if args.once and args.headless:
        raise InputError("--once and --headless exclude each other")
    if args.slo_ms is not None and args.slo_ms <= 0:
        raise InputError(f"--slo-ms {args.slo_ms} must be > 0")
    mon = _make_monitor(args, once=args.once)
    try:
        mon.start(timeout=args.connect_timeout)
        if args.once:
            return _once(mon, args)
        if args.headless:
            return _headless(mon, args)
        return _live(mon, args)
    finally:
        _close(mon)


def _once(mon: Monitor, args: argparse.Namespace) -> int:
    time.sleep(args.wait)
    mon.flush(10.0)
    now = time.time()
    rows = mon.rows(now)
    alerts = compute_alerts(mon.fleet(), now, slo_ms=args.slo_ms, throttle_c=args.temp_c)
    if args.json:
        _print_json({"broker": args.broker, "collected_s": args.wait, "devices": rows,
                     "alerts": [a.to_dict() for a in alerts], "counters": mon.counters.to_dict(),
                     "store": None if mon.store is None else mon.store.url})
    else:
        from rich.console import Console

        Console().print(fleet_table(rows, alerts, mon.counters.to_dict()))
    return 0


@contextlib.contextmanager
def _stop_event(duration: float | None) -> Iterator[threading.Event]:
    """An event set by SIGTERM (a service stop) or after ``duration`` s; the old SIGTERM handler is restored."""
    stop = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set()) if main else None
    timer = None
    if duration is not None:
        timer = threading.Timer(duration, stop.set)
        timer.daemon = True
        timer.start()
    try:
        yield stop
    finally:
        stop.set()
        if timer is not None:
            timer.cancel()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _headless(mon: Monitor, args: argparse.Namespace) -> int:
    def emit(event: dict[str, Any]) -> None:
        ts = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if args.json:
            line = json.dumps({"ts": ts, **event})
        elif event["event"] == "counters":
            line = f"{ts} COUNTERS " + " ".join(f"{k}={v}" for k, v in event.items() if k != "event")
        else:
            line = f"{ts} {event['event'].upper()} {event['kind']} {event['device']}: {event['message']}"
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        with _stop_event(args.duration) as stop:
            run_headless(mon, stop=stop, emit=emit, stats_every=args.stats_every, slo_ms=args.slo_ms,
                         throttle_c=args.temp_c)
    except KeyboardInterrupt:
        pass
    mon.flush(10.0)
    emit({"event": "counters", **mon.counters.to_dict()})
    return 0


def _live(mon: Monitor, args: argparse.Namespace) -> int:
    from rich.live import Live

    def render() -> Any:
        now = time.time()
        return fleet_table(mon.rows(now), compute_alerts(mon.fleet(), now, slo_ms=args.slo_ms,
                                                         throttle_c=args.temp_c), mon.counters.to_dict())

    try:
        with _stop_event(args.duration) as stop, Live(render(), refresh_per_second=2, screen=False) as live:
            while not stop.wait(0.5):
                live.update(render())
    except KeyboardInterrupt:
        pass
    return 0


# --------------------------------------------------------------------------------------------------
# report


def cmd_report(args: argparse.Namespace) -> int:
    from converters.report import parse_since, report
    from converters.store import open_store

    since = parse_since(args.since) if args.since is not None else None
    if not str(args.store).startswith(("postgres://", "postgresql://")) and not Path(
            str(args.store).removeprefix("sqlite:///")).is_file():
        raise InputError(f"store {args.store} does not exist", hint="the file edgekit monitor --store wrote")
    store = open_store(args.store)
    try:
        result = report(store, device=args.device, since=since, csv_path=args.csv, plot_path=args.plot)
    finally:
        store.close()
    if args.json:
        _print_json(result)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['windows']} windows in {args.store}")
    for col in ("device", "windows", "first", "last", "inferences", "p99 median ms", "max °C"):
        table.add_column(col)
    for d in result["devices"]:
        fmt = "%Y-%m-%d %H:%M:%S"
        table.add_row(d["device"], str(d["windows"]),
                      datetime.fromtimestamp(d["first"], timezone.utc).strftime(fmt),
                      datetime.fromtimestamp(d["last"], timezone.utc).strftime(fmt), str(d["inferences"]),
                      _num(d["p99_median_ms"]), _num(d["temp_max_c"], "{:.1f}"))
    console = Console()
    console.print(table)
    for key in ("csv", "plot"):
        if result[key]:
            console.print(f"{key}: {result[key]}")
    return 0


# --------------------------------------------------------------------------------------------------
# parser


def register(subparsers: Any) -> None:
    """Add ``monitor`` and ``report`` to edgekit's subparsers (``argparse._SubParsersAction``)."""
    m = subparsers.add_parser("monitor", help="watch the fleet's MQTT telemetry and record it",
                              description="Watch the fleet: a live table, --once for scripts, --headless for a "
                                          "service. Every window received is recorded in --store.")
    m.add_argument("--broker", default="localhost:1883", metavar="HOST:PORT",
                   help="MQTT broker (default %(default)s)")
    m.add_argument("--prefix", default="edgekit", help="topic prefix (default %(default)s)")
    m.add_argument("--devices", metavar="PATTERN", help="only devices whose id matches (fnmatch, e.g. 'pi-*')")
    m.add_argument("--store", default=DEFAULT_STORE, metavar="PATH|URL",
                   help="SQLite file or postgresql://user@host/db (default %(default)s)")
    m.add_argument("--no-store", action="store_true", help="record nothing (state and alerts only)")
    m.add_argument("--client-id", help="MQTT client id; the broker keeps its session (default "
                                       "edgekit-monitor-<host>; --once: a throwaway id)")
    m.add_argument("--share-group", metavar="G", help="split telemetry with other monitors of group G "
                                                      "($share/G/…, MQTT 5); each needs its own --client-id")
    m.add_argument("--session-expiry", type=int, default=7 * 86400, metavar="S",
                   help="how long the broker keeps the session while the monitor is away (default %(default)s s)")
    m.add_argument("--slo-ms", type=float, help="p99 SLO for alerts (default: each device profile's slo_p99_ms)")
    m.add_argument("--temp-c", type=float, help=f"throttle temperature for alerts (alert 5 °C below; default: "
                                                f"the profile's thermal.throttle_c, else {DEFAULT_THROTTLE_C:g})")
    m.add_argument("--profiles-dir", help="extra folder of profile TOMLs")
    m.add_argument("--max-bytes", type=int, default=MAX_MESSAGE_BYTES, help="larger messages are counted and "
                                                                            "skipped (default %(default)s)")
    m.add_argument("--tls", action="store_true", help="TLS with the system CAs")
    m.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) of the broker (implies --tls)")
    m.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM)")
    m.add_argument("--tls-key", metavar="FILE", help="client key (PEM)")
    m.add_argument("--tls-insecure", action="store_true", help="do not check the broker's host name")
    m.add_argument("--username", help="MQTT user name")
    m.add_argument("--password-file", metavar="FILE", help="file with the MQTT password on its first line")
    m.add_argument("--connect-timeout", type=float, default=10.0, metavar="S", help="default %(default)s s")
    mode = m.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="collect for --wait s, print the fleet, exit")
    mode.add_argument("--headless", action="store_true", help="no screen: log alert changes and counters "
                                                              "(a service, a pipe)")
    m.add_argument("--wait", type=float, default=3.0, metavar="S", help="--once: collect this long (default 3)")
    m.add_argument("--stats-every", type=float, default=60.0, metavar="S", help="--headless: counters every S s")
    m.add_argument("--duration", type=float, metavar="S", help="stop after S s (default: until Ctrl-C/SIGTERM)")
    m.add_argument("--json", action="store_true", help="--once: one JSON document; --headless: JSON lines")
    m.set_defaults(func=cmd_monitor)

    r = subparsers.add_parser("report", help="export recorded telemetry as CSV and PNG plots",
                              description="CSV (one row per window) and PNG plots from a monitor store.")
    r.add_argument("--store", default=DEFAULT_STORE, metavar="PATH|URL",
                   help="SQLite file or postgresql://… (default %(default)s)")
    r.add_argument("--device", help="one device only")
    r.add_argument("--since", metavar="T",
                   help="windows ending at or after T: 2h, 30m, 7d, ISO 8601 (UTC), UNIX s")
    r.add_argument("--csv", metavar="FILE", help="write one row per window")
    r.add_argument("--plot", metavar="FILE.png", help="latency, power and temperature over time per device")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=cmd_report)
