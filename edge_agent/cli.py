"""``edge-agent``: the device-side command line.

    edge-agent bench --bundle B [--pubkey K] [--warmup N] [--count N] [--threads N] [--source S] [--json]
    edge-agent run   --bundle B [--pubkey K] [--duration S] [--source S] [--mqtt HOST:PORT]
                     [--device-id ID] [--window S] [--state-dir DIR] [--threads N] [--json]

Errors: every ``EdgekitError`` is printed on stderr with its hint and ends the process with its exit code
(2 for bad input, 1 for a failure); with ``--json`` the error is also printed as JSON on stdout.
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
from collections.abc import Sequence
from typing import Any

from edge_agent import __version__
from edge_agent.errors import EdgekitError, InputError

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
    p = argparse.ArgumentParser(prog=PROG, description="edgekit device agent: run, measure and report a "
                                "signed model bundle.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--bundle", required=True, help="the signed .edgebundle to run")
        sp.add_argument("--pubkey", help="public key to verify the bundle with (default: "
                        "/etc/edge-agent/trusted.pub, then ~/.config/edgekit/keys/edgekit-signing.pub)")
        sp.add_argument("--threads", type=int, help="intra-op threads (default: the profile's)")
        sp.add_argument("--source", default="synthetic",
                        help="inputs: synthetic, npy:PATH (.npy/.npz) or images:DIR (default: synthetic)")
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")

    b = sub.add_parser("bench", help="measure latency and throughput of a bundle on this device")
    common(b)
    b.add_argument("--warmup", type=int, default=20, help="inferences run before timing (default 20)")
    b.add_argument("--count", type=int, default=500, help="timed inferences (default 500)")

    r = sub.add_parser("run", help="run a bundle and report telemetry windows")
    common(r)
    r.add_argument("--duration", type=float, help="seconds to run (default: until SIGTERM/SIGINT)")
    r.add_argument("--window", type=float, default=10.0, help="seconds per telemetry window (default 10)")
    r.add_argument("--mqtt", metavar="HOST:PORT", help="MQTT broker for telemetry (default: offline)")
    r.add_argument("--device-id", help="device id in topics and windows (default: the host name)")
    r.add_argument("--state-dir", help="folder that keeps the window sequence number across restarts")
    return p


def _print_bench(result: dict[str, Any]) -> None:
    b = result["bundle"]
    lat = result["latency_ms"]
    rows = [
        ("bundle", f"{b['name']} {b['version']} (profile {b['profile']})"),
        ("engine", result["engine"]),
        ("providers", ", ".join(result["providers"])
         + (f"  (requested: {', '.join(result['providers_requested'])})"
            if result["providers"] != result["providers_requested"] else "")),
        ("degraded", f"yes: {result['degraded_reason']}" if result["degraded"] else "no"),
        ("threads", str(result["threads"] or "default")),
        ("init", f"{result['init_ms']:.1f} ms"),
        ("first inference", f"{result['first_inference_ms']:.3f} ms"),
        ("warm-up / timed", f"{result['warmup']} / {result['count']}"),
        *((f"latency {k}", f"{lat[k]:.4f} ms") for k in ("p50", "p90", "p95", "p99", "p999", "max", "mean",
                                                          "std")),
        ("throughput", f"{result['throughput_ips']:.1f} inferences/s"),
        ("peak RSS", f"{result['peak_rss_mb']:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _cmd_bench(args: argparse.Namespace) -> int:
    from edge_agent.benchmark import bench

    result = bench(args.bundle, args.pubkey, warmup=args.warmup, count=args.count, threads=args.threads,
                   source=args.source)
    if args.json:
        print(json.dumps(result))
    else:
        _print_bench(result)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from edge_agent.service import _summary, run_agent

    mqtt = parse_hostport(args.mqtt) if args.mqtt is not None else None
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logging.getLogger(PROG).info("signal %d: finishing the current window", signum)
        stop.set()

    def on_window(window: dict[str, Any]) -> None:
        print(json.dumps(window) if args.json else _summary(window), flush=True)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_agent(args.bundle, args.pubkey, source=args.source, duration=args.duration, window_s=args.window,
                  mqtt=mqtt, device_id=args.device_id or socket.gethostname(), state_dir=args.state_dir,
                  threads=args.threads, on_window=on_window, stop=stop)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handler = {"bench": _cmd_bench, "run": _cmd_run}[args.command]
    try:
        return handler(args)
    except EdgekitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(e.to_dict()), flush=True)
        return e.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
