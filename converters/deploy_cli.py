"""`edgekit push`, `edgekit deploy` and `edgekit cmd`: deliver bundles and commands to devices.

``push`` sends an existing bundle to one or more targets at once (docs/deploy.md, "Targets") and, where
the target can report it, waits for each device's ``activated`` / ``rolled_back`` / ``deploy_rejected``
answer. ``deploy`` converts first (``edgekit convert``'s options), cached by a hash of model, calibration
data, profile, options and tool versions (``converters.deploy_cache``), so a re-deploy skips conversion.
``cmd`` sends one signed command and prints the device's answer.

Exit codes: 0 every target activated (or, for targets that cannot answer, received) the bundle; 1 any
target failed, refused, rolled back or timed out; 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgekitError, InputError
from edge_agent.telemetry.mqtt import MqttSettings, TlsOptions

DEFAULT_WAIT_S = 120.0


# --------------------------------------------------------------------------------------------------
# options shared by the three commands


def add_mqtt_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("MQTT (mqtt:// targets, edgekit cmd)")
    g.add_argument("--prefix", default="edgekit", help="topic prefix (default %(default)s)")
    g.add_argument("--tls-ca", metavar="FILE", help="CA certificate (PEM) of the broker (turns TLS on)")
    g.add_argument("--tls-cert", metavar="FILE", help="client certificate (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="client key (PEM, unencrypted)")
    g.add_argument("--username", help="MQTT user name")
    g.add_argument("--password-file", metavar="FILE", help="file with the MQTT password on its first line")


def mqtt_settings(args: argparse.Namespace) -> MqttSettings:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise InputError("--tls-cert and --tls-key go together", hint="give both for a client certificate")
    if args.tls_cert is not None and args.tls_ca is None:
        raise InputError("a client certificate needs the broker's CA", hint="add --tls-ca FILE")
    from edge_agent.config import check_private_file

    for flag, value in (("--tls-key", args.tls_key), ("--password-file", args.password_file)):
        if value is not None:
            check_private_file(value, flag)  # readable by group/others: refused (chmod 600)
    tls = None
    if args.tls_ca is not None:
        tls = TlsOptions(Path(args.tls_ca), None if args.tls_cert is None else Path(args.tls_cert),
                         None if args.tls_key is None else Path(args.tls_key))
    password = None
    if args.password_file is not None:
        try:
            password = Path(args.password_file).read_text().splitlines()[0]
        except (OSError, IndexError) as e:
            raise InputError(f"cannot read the MQTT password from {args.password_file}",
                             hint="a file whose first line is the password") from e
    return MqttSettings(username=args.username, password=password, tls=tls)


def add_push_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--to", action="append", required=True, metavar="TARGET",
                    help="ssh://[user@]host[:port][/inbox], mqtt://broker[:port]/device/ID, "
                         "mqtt://broker[:port]/group/G or dir:/folder; repeatable (pushed in parallel)")
    sp.add_argument("--wait", type=float, default=DEFAULT_WAIT_S, metavar="S",
                    help="seconds to wait for each device's answer (default %(default)s; 0: do not wait)")
    sp.add_argument("--expect", type=int, metavar="N",
                    help="mqtt group targets: stop waiting once N devices answered (default: wait --wait s)")
    sp.add_argument("--ssh", default="ssh", metavar="CMD", help="the ssh client to run (default: ssh)")
    sp.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                    help="extra argument for ssh, e.g. --ssh-option=-F --ssh-option=~/.ssh/fleet_config; "
                         "repeatable (your ~/.ssh/config, keys, agent and ProxyJump apply anyway)")
    add_mqtt_options(sp)
    sp.add_argument("--json", action="store_true", help="print one JSON document (a list of per-target results)")


# --------------------------------------------------------------------------------------------------
# pushing


def transport_options(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    if kind == "ssh":
        return {"ssh_command": args.ssh, "ssh_options": list(args.ssh_option)}
    if kind == "mqtt":
        return {"prefix": args.prefix, "settings": mqtt_settings(args), "expect": args.expect}
    return {}


def push_all(bundle: Path, targets: Sequence[str], args: argparse.Namespace, *,
             on_progress: Callable[[str, str, float | None], None] | None = None) -> list[Any]:
    """Push ``bundle`` to every target in parallel; one ``PushResult`` per target (failures included)."""
    from converters.push import PushResult, check_bundle, check_wait, create_transport, parse_target

    size = check_bundle(bundle)
    wait_s = check_wait(args.wait)
    parsed = [parse_target(t) for t in targets]  # every target is checked before anything is sent
    transports = []
    for t in parsed:
        opts = transport_options(t.kind, args)
        if t.kind == "mqtt" and t.group is None:
            opts.pop("expect")
        transports.append(create_transport(t, **opts))

    def one(tr: Any) -> Any:
        name = str(tr.target)

        waits = wait_s is not None and tr.target.kind != "dir"

        def progress(done: int, total: int) -> None:
            if on_progress is not None:
                last = "sent, waiting for the device" if waits else "sent"
                on_progress(name, "sending" if done < total else last, done / max(total, 1))
        try:
            result = tr.push(bundle, progress=progress, wait_s=wait_s if tr.target.kind != "dir" else None)
        except EdgekitError as e:
            result = PushResult(name, tr.name, size, 0.0, "failed", {"error": e.to_dict()},
                                e.message + (f" (hint: {e.hint})" if e.hint else ""))
        if on_progress is not None:
            on_progress(name, result.state, 1.0)
        return result

    with ThreadPoolExecutor(max_workers=min(16, len(transports))) as pool:
        return list(pool.map(one, transports))


def _progress(targets: Sequence[str], plain: bool) -> Any:
    from converters.cli import _progress_view

    return _progress_view(list(targets), plain=plain, transient=True, label="push")


def _print_results(bundle: Path, results: list[Any], extra: dict[str, Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"push {bundle.name}")
    for col in ("target", "via", "result", "model", "seconds", "detail"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    colour = {"activated": "green", "pushed": "green", "rolled_back": "yellow", "rejected": "red",
              "timeout": "yellow", "failed": "red"}
    for r in results:
        model = (r.detail.get("model") or {}) if isinstance(r.detail.get("model"), dict) else {}
        devices = r.detail.get("devices")
        what = r.message or r.detail.get("message") or ""
        if isinstance(devices, dict):
            answers = [f"{d}: {v.get('kind') or v.get('result')}" for d, v in sorted(devices.items())]
            what = ", ".join(answers) or what
        table.add_row(r.target, r.transport, f"[{colour.get(r.state, 'white')}]{r.state}[/]",
                      f"{model.get('name', '')} {model.get('version', '')}".strip() or "-", f"{r.seconds:.2f}",
                      str(what)[:80])
    console = Console(stderr=False)
    console.print(table)
    for r in results:  # the whole message (and hint) of what did not go well, below the table
        if not r.ok and r.message:
            console.print(f"{r.target}: {r.message}", markup=False, highlight=False)
    for key, value in (extra or {}).items():
        console.print(f"{key}: {value}", markup=False, highlight=False)


def _exit(results: list[Any]) -> int:
    return 0 if results and all(r.ok for r in results) else 1


def cmd_push(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    plain = bool(args.json) or not sys.stderr.isatty()
    with _progress(args.to, plain) as event:
        results = push_all(bundle, args.to, args, on_progress=event)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2, default=str))
    else:
        _print_results(bundle, results)
    return _exit(results)


# --------------------------------------------------------------------------------------------------
# deploy = convert (cached) + push


def _cache_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The conversion options that change the bundle (what goes into the cache key)."""
    return {k: v for k, v in kwargs.items() if k not in ("threads", "plot", "offline", "onnx2tf_env")}


def converted_bundle(args: argparse.Namespace, *, plain: bool) -> tuple[Path, bool]:
    """The bundle for ``args`` (model, profile, conversion options): from the cache, or converted now.
    Returns (bundle, from_cache)."""
    from converters.cli import _convert_kwargs, _default_key, _progress_view
    from converters.convert import convert
    from converters.deploy_cache import DeployCache, cache_key
    from edge_agent.profiles import load_profile

    key = Path(args.key) if args.key else _default_key()
    if not key.is_file():
        raise InputError(f"no signing key at {key}",
                         hint="create one with `edgekit keys init` (or pass --key PATH)")
    profile = load_profile(args.profile, args.profiles_dir)
    kwargs = _convert_kwargs(args)
    model = Path(args.model)
    from edge_agent.signing import fingerprint, load_private_key

    # the signer and the bundle's name are part of what is built (the model's file name is not in the key)
    options = {**_cache_options(kwargs), "name": kwargs.get("name") or model.stem,
               "signer": fingerprint(load_private_key(key).public_key())}
    ck = cache_key(model, args.calib, profile, options)
    cache = DeployCache(args.cache_dir)
    hit = None if args.no_cache else cache.get(ck)
    if hit is not None:
        return hit, True
    with tempfile.TemporaryDirectory(prefix="edgekit-deploy-") as tmp, \
            _progress_view([profile.name], plain=plain, transient=True) as event:
        result = convert(model, profile, args.calib, Path(tmp), key,
                         progress=lambda message, fraction=None: event("", message, fraction), **kwargs)
        cached = cache.put(ck, result.bundle)
        if args.out is not None:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cached, out / result.bundle.name)
    cache.prune()
    return cached, False


def cmd_deploy(args: argparse.Namespace) -> int:
    from converters.push import parse_target

    for t in args.to:  # a typo in a target fails before a long conversion, not after
        parse_target(t)
    plain = bool(args.json) or not sys.stderr.isatty()
    bundle, from_cache = converted_bundle(args, plain=plain)
    if not args.json:
        print(f"bundle {bundle.name} ({'cached, conversion skipped' if from_cache else 'converted'})",
              file=sys.stderr)
    with _progress(args.to, plain) as event:
        results = push_all(bundle, args.to, args, on_progress=event)
    if args.json:
        print(json.dumps({"bundle": str(bundle), "cached": from_cache, "results": [r.to_dict() for r in results]},
                         indent=2, default=str))
    else:
        _print_results(bundle, results)
    return _exit(results)


# --------------------------------------------------------------------------------------------------
# remote commands


def _command_args(action: str, values: Sequence[str]) -> dict[str, Any]:
    """``activate 1.2.0`` / ``bench 5`` / ``set telemetry_interval=5`` → the command's args."""
    if action in ("rollback", "reload"):
        if values:
            raise InputError(f"{action} takes no arguments, got {' '.join(values)}")
        return {}
    if action == "activate":
        if len(values) != 1:
            raise InputError("activate takes one version", hint="e.g. edgekit cmd pi-017 activate 1.2.0")
        return {"version": values[0]}
    if action == "bench":
        if len(values) > 1:
            raise InputError("bench takes at most one duration in seconds", hint="e.g. edgekit cmd pi-017 bench 5")
        return {} if not values else {"duration": _number(values[0], "bench duration")}
    out: dict[str, Any] = {}
    for v in values:  # set KEY=VALUE …
        key, sep, value = v.partition("=")
        if not sep:
            raise InputError(f"set takes KEY=VALUE, got {v!r}", hint="e.g. set telemetry_interval=5")
        out[key] = _number(value, key)
    if not out:
        raise InputError("set needs KEY=VALUE", hint="e.g. set telemetry_interval=5")
    return out


def _number(text: str, what: str) -> float:
    try:
        return float(text)
    except ValueError as e:
        raise InputError(f"{what} must be a number, got {text!r}") from e


def cmd_cmd(args: argparse.Namespace) -> int:
    from converters.cli import _default_key
    from converters.commands import send_command
    from converters.monitor_cli import parse_broker

    host, port = parse_broker(args.broker)
    key = Path(args.key) if args.key else _default_key()
    answer = send_command(host, port, args.device, args.action, _command_args(args.action, args.values),
                          key_path=key, prefix=args.prefix, settings=mqtt_settings(args), wait_s=args.wait,
                          ttl_s=args.ttl)
    if args.json:
        print(json.dumps(answer, indent=2, default=str))
    else:
        result = answer.get("result")
        line = f"{args.device}: {args.action} {result}"
        if answer.get("reason"):
            line += f" ({answer['reason']})"
        print(line)
        detail = answer.get("detail") if result != "timeout" else answer.get("message")
        if detail:
            print(json.dumps(detail, indent=2, default=str) if isinstance(detail, dict) else detail)
    return 0 if answer.get("result") == "done" else 1


# --------------------------------------------------------------------------------------------------
# parsers


def register(sub: Any) -> None:
    from converters.cli import add_convert_options

    p = sub.add_parser("push", help="send an existing bundle to devices and wait for them to activate it")
    p.add_argument("bundle", help="the signed .edgebundle")
    add_push_options(p)
    p.set_defaults(func=cmd_push)

    d = sub.add_parser("deploy", help="convert (cached), sign and push a model to devices; wait for activation")
    d.add_argument("model", help="the trained model (as for edgekit convert)")
    d.add_argument("--profile", required=True, help="device profile name or path to a .toml")
    d.add_argument("--profiles-dir", help="extra folder of profile TOMLs")
    d.add_argument("--out", help="also copy the bundle into this folder")
    d.add_argument("--cache-dir", default=os.environ.get("EDGEKIT_CACHE_DIR"),
                   help="converted bundles are cached here (default ~/.cache/edgekit/deploy)")
    d.add_argument("--no-cache", action="store_true", help="convert even when the cache has this bundle")
    add_convert_options(d)
    d.set_defaults(no_plot=True)  # the report's PNG would land in a temporary folder
    add_push_options(d)
    d.set_defaults(func=cmd_deploy)

    c = sub.add_parser("cmd", help="send a signed command to a device and print its answer")
    c.add_argument("device", help="the device id")
    c.add_argument("action", choices=["rollback", "activate", "bench", "set", "reload"])
    c.add_argument("values", nargs="*", help="activate VERSION | bench [SECONDS] | set telemetry_interval=S")
    c.add_argument("--broker", default="localhost:1883", metavar="HOST:PORT")
    c.add_argument("--key", help="private signing key (default ~/.config/edgekit/keys/edgekit-signing.key)")
    c.add_argument("--wait", type=float, default=30.0, metavar="S", help="seconds to wait for the answer")
    c.add_argument("--ttl", type=float, default=300.0, metavar="S",
                   help="the command expires this many seconds after it is sent (default 300)")
    add_mqtt_options(c)
    c.add_argument("--json", action="store_true", help="print the device's answer as JSON")
    c.set_defaults(func=cmd_cmd)


__all__ = ["cmd_cmd", "cmd_deploy", "cmd_push", "push_all", "register"]
