"""`edgekit`: the host command line (profiles, keys, bundles, convert, tools).

Exit codes: 0 ok, 1 failure of the work, 2 bad usage or bad input. Every command whose output a script
may read has ``--json``; errors are then printed as a JSON object on stdout as well as on stderr.

``convert --profile a,b,c`` converts for each profile in its own process (``converters/multi.py``), with
one progress row per profile and a summary table at the end (``--json``: a list of per-profile results);
its exit code is 0 when every profile succeeded, 2 when any failed on bad input, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from converters.broker_cli import register as register_broker
from converters.deploy_cli import register as register_deploy
from converters.monitor_cli import register as register_monitor
from edge_agent import __version__
from edge_agent.errors import EdgekitError, InputError
from edge_agent.profiles import PROFILES_ENV, Profile, available_profiles, load_profile


def _console() -> Any:
    from rich.console import Console

    return Console()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------------------------------
# profiles


def _profile_row(p: Profile) -> dict[str, Any]:
    rt = p.runtime
    accel = ", ".join(rt.delegates or rt.providers) or "-"
    return {
        "name": p.name,
        "description": p.device.description,
        "arch": p.device.arch,
        "format": p.target.format,
        "mode": p.quantization.mode,
        "io_dtype": p.quantization.io_dtype,
        "engine": rt.engine,
        "accelerators": accel,
        "threads": rt.threads,
        "power": p.power.source,
        "file": p.source_file,
    }


def cmd_profiles_list(args: argparse.Namespace) -> int:
    profiles = [load_profile(str(path)) for path in available_profiles(args.profiles_dir).values()]
    rows = [_profile_row(p) for p in profiles]
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title="device profiles")
    for col in ("name", "arch", "format", "mode", "io_dtype", "engine", "accelerators", "threads", "power"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(r[c]) for c in ("name", "arch", "format", "mode", "io_dtype", "engine",
                                             "accelerators", "threads", "power")))
    _console().print(table)
    return 0


def cmd_profiles_show(args: argparse.Namespace) -> int:
    p = load_profile(args.name, args.profiles_dir)
    data = {**p.to_dict(), "file": p.source_file}
    if args.json:
        _print_json(data)
        return 0
    console = _console()
    console.print(f"[bold]{p.name}[/bold]: {p.device.description}  ({p.source_file})")
    for section, values in p.to_dict().items():
        if isinstance(values, dict):
            console.print(f"[cyan][{section}][/cyan]")
            for k, v in values.items():
                console.print(f"  {k} = {v!r}")
        else:
            console.print(f"{section} = {values!r}")
    return 0


# --------------------------------------------------------------------------------------------------
# keys


def cmd_keys_init(args: argparse.Namespace) -> int:
    from converters.keys import DEFAULT_KEY_DIR, init_keys
    from edge_agent.signing import fingerprint, load_public_key

    directory = Path(args.dir) if args.dir else DEFAULT_KEY_DIR
    private, public = init_keys(directory)
    fp = fingerprint(load_public_key(public))
    if args.json:
        _print_json({"private_key": str(private), "public_key": str(public), "fingerprint": fp})
    else:
        print(f"private key: {private} (mode 0600; keep it secret, never copy it to a device)")
        print(f"public key:  {public} (pin it on each device, e.g. /etc/edge-agent/trusted.pub)")
        print(f"fingerprint: {fp}")
    return 0


# --------------------------------------------------------------------------------------------------
# bundles


def cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from edge_agent.bundle import inspect_bundle

    info = inspect_bundle(Path(args.file))
    if args.json:
        _print_json(info)
        return 0
    m = info["manifest"]
    print(f"{args.file}: {m['name']} {m['version']} for profile {m['profile']} ({m['engine']})")
    print(f"  created {m['created']}, signed: {'yes' if info['signed'] else 'NO'}, "
          f"member hashes: {'ok' if info['hashes_ok'] else 'MISMATCH'}")
    for t in m["inputs"]:
        print(f"  input  {t['name']} {t['shape']} {t['dtype']}")
    for t in m["outputs"]:
        print(f"  output {t['name']} {t['shape']} {t['dtype']}")
    for member in info["members"]:
        print(f"  member {member['name']} ({member['size']} bytes)")
    if m.get("cpu_model"):
        print(f"  cpu model {m['cpu_model']} (run when the accelerator delegate cannot load)")
    v = dict(m.get("validation") or {})
    tpu = v.pop("edgetpu", None)
    if isinstance(tpu, dict):
        print(f"  edge tpu: {edgetpu_line(tpu)}")
    if v:
        print("  validation: " + ", ".join(f"{k}={v[k]}" for k in sorted(v)))
    return 0


def edgetpu_line(tpu: dict[str, Any]) -> str:
    """The manifest's validation.edgetpu in words."""
    if not tpu.get("compiled"):
        return "CPU-only (not compiled for the Edge TPU: the model runs on the CPU)"
    mapped, cpu = tpu.get("mapped_ops"), tpu.get("cpu_ops")
    text = f"compiled: {mapped} ops on the Edge TPU, {cpu} on the CPU"
    if tpu.get("first_unmapped_op"):
        text += f" (mapping stops at {tpu['first_unmapped_op']})"
    if tpu.get("on_chip_bytes") is not None:
        text += f", {tpu['on_chip_bytes'] / 2**20:.2f} MiB of parameters on chip"
    return text


def cmd_bundle_verify(args: argparse.Namespace) -> int:
    from edge_agent.bundle import verify_bundle

    vb = verify_bundle(Path(args.file), Path(args.pubkey))
    result = {"ok": True, "bundle": str(vb.path), "name": vb.manifest.name, "version": vb.manifest.version,
              "profile": vb.manifest.profile, "signer": vb.signer}
    if args.json:
        _print_json(result)
    else:
        print(f"OK: {args.file} ({vb.manifest.name} {vb.manifest.version}) is intact and signed by {vb.signer}")
    return 0


# --------------------------------------------------------------------------------------------------
# convert


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {text!r} must look like HEIGHTxWIDTH, e.g. 224x224") from None
    return h, w


def _parse_floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{option} {text!r} must be comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def _preprocessing_from_args(args: argparse.Namespace) -> Any:
    from edge_agent.preprocess import Preprocessing

    given = [args.size, args.color, args.layout, args.mean, args.std, args.scale]
    if all(v is None for v in given):
        return None
    if args.size is None:
        raise InputError("--color/--layout/--mean/--std/--scale need --size HEIGHTxWIDTH too")
    kw: dict[str, Any] = {"size": _parse_size(args.size)}
    if args.color:
        kw["color"] = args.color
    if args.layout:
        kw["layout"] = args.layout
    if args.mean:
        kw["mean"] = _parse_floats(args.mean, "--mean")
    if args.std:
        kw["std"] = _parse_floats(args.std, "--std")
    if args.scale is not None:
        kw["scale"] = args.scale
    return Preprocessing(**kw)


def _label_column(text: str | None) -> str | int | None:
    """--label-column: an integer is a 0-based column index, anything else a header name."""
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return text


def _default_key() -> Path:
    from converters.keys import DEFAULT_KEY_DIR

    return DEFAULT_KEY_DIR / "edgekit-signing.key"


def _names(text: str | None) -> tuple[str, ...] | None:
    """--exclude-nodes a,b -> ("a", "b"); an empty string clears the profile's list."""
    if text is None:
        return None
    return tuple(n.strip() for n in text.split(",") if n.strip())


EventFn = Callable[[str, str, "float | None"], None]
_END = ("done", "failed", "gate failed")


class _Lines:
    """Progress as plain lines on stderr (--json, or stderr is not a terminal); a tool's own progress is
    printed when its message changes or it passes another tenth."""

    def __init__(self, label: str = "convert") -> None:
        self.last: dict[str, tuple[str, int]] = {}
        self.label = label

    def __call__(self, who: str, message: str, fraction: float | None) -> None:
        tag = f"[{self.label} {who}]" if who else f"[{self.label}]"
        if fraction is None:
            print(f"{tag} {message}", file=sys.stderr)
            return
        state = (message.split(":")[0], int(fraction * 10))
        if self.last.get(who) == state:
            return
        self.last[who] = state
        print(f"{tag} {message} ({fraction:.0%})", file=sys.stderr)


@contextmanager
def _progress_view(rows: list[str], *, plain: bool, transient: bool, label: str = "convert") -> Iterator[EventFn]:
    """event(row, message, fraction): one progress row per name in ``rows`` (rich), or plain lines."""
    if plain:
        yield _Lines(label)
        return
    from rich.progress import BarColumn, Progress, SpinnerColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn("{task.description}", style="bold"), BarColumn(),
                  TaskProgressColumn(), TimeElapsedColumn(), transient=transient) as progress:
        tasks = {name: progress.add_task(f"{name}: waiting", total=None) for name in rows}

        def event(who: str, message: str, fraction: float | None) -> None:
            task = tasks[who or rows[0]]
            text = f"{who or rows[0]}: {message}"
            text = text if len(text) <= 72 else text[:71] + "…"
            if fraction is None:
                progress.update(task, description=text, total=None)
            else:
                progress.update(task, description=text, total=1.0, completed=min(1.0, max(0.0, fraction)))

        yield event


def _convert_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """convert()'s keyword arguments from the command line (picklable: they go to worker processes too)."""
    from converters.convert import Overrides

    overrides = Overrides(calib_method=args.calib_method, per_channel=args.per_channel,
                          exclude_nodes=_names(args.exclude_nodes), exclude_op_types=_names(args.exclude_op_types),
                          gate_accuracy=args.gate_accuracy, gate_agreement=args.gate_agreement,
                          gate_snr_db=args.gate_snr, ladder=False if args.no_ladder else None)
    return {"name": args.name, "version": args.version, "preprocessing": _preprocessing_from_args(args),
            "labels": Path(args.labels) if args.labels else None, "seed": args.seed, "threads": args.threads,
            "mode": args.mode, "allow_float_ops": args.allow_float_ops,
            "label_column": _label_column(args.label_column), "val": args.val, "overrides": overrides,
            "require_edgetpu": args.require_edgetpu, "edgetpu_compiler": args.edgetpu_compiler,
            "onnx2tf_env": Path(args.onnx2tf_env) if args.onnx2tf_env else None, "offline": args.offline,
            "plot": not args.no_plot, "latency_budget_ms": args.latency_budget_ms}


def cmd_convert(args: argparse.Namespace) -> int:
    from converters.convert import convert

    model = Path(args.model)
    key = Path(args.key) if args.key else _default_key()
    if not key.is_file():
        raise InputError(f"no signing key at {key}",
                         hint="create one with `edgekit keys init` (or pass --key PATH)")
    names = [n.strip() for n in args.profile.split(",")]
    if not all(names):
        raise InputError(f"--profile {args.profile!r} has an empty name", hint="e.g. --profile rpi5,x86-64")
    profiles = [load_profile(name, args.profiles_dir) for name in names]
    kwargs = _convert_kwargs(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = bool(args.json) or not sys.stderr.isatty()
    if len(profiles) > 1:
        return _convert_many(args, model, profiles, key, out_dir, kwargs, plain)
    if args.jobs is not None and args.jobs < 1:
        raise InputError(f"--jobs must be at least 1, not {args.jobs}")
    profile = profiles[0]
    with _progress_view([profile.name], plain=plain, transient=True) as event:
        result = convert(model, profile, args.calib, out_dir, key,
                         progress=lambda message, fraction=None: event("", message, fraction), **kwargs)
    summary = {"bundle": str(result.bundle), "name": result.manifest.name, "version": result.manifest.version,
               "profile": profile.name, "validation": result.manifest.validation,
               "ladder": result.report.get("ladder"), "edgetpu": result.report.get("edgetpu"),
               "plot": str(result.plot) if result.plot else None, "notes": result.report.get("notes", [])}
    if args.json:
        _print_json(summary)
        return 0
    _print_convert_table(summary)
    return 0


def _convert_many(args: argparse.Namespace, model: Path, profiles: list[Profile], key: Path, out_dir: Path,
                  kwargs: dict[str, Any], plain: bool) -> int:
    from converters.multi import convert_many, exit_code, workers_for

    names = [p.name for p in profiles]
    workers = workers_for(len(profiles), args.jobs)
    if plain:
        print(f"[convert] {len(profiles)} profiles ({', '.join(names)}), {workers} at a time", file=sys.stderr)
    with _progress_view(names, plain=plain, transient=False) as event:
        results = convert_many(model, profiles, args.calib, out_dir, key, jobs=args.jobs, on_event=event, **kwargs)
    code = exit_code(results)
    if args.json:
        _print_json([r.to_dict() for r in results])
        return code
    _print_many_table(results)
    return code


def _quality(v: dict[str, Any]) -> str:
    if v.get("accuracy_quant") is not None:
        return f"accuracy {_fmt(v['accuracy_quant'])} (fp32 {_fmt(v.get('accuracy_fp32'))})"
    if v.get("top1_agreement") is not None:
        return f"agreement {_fmt(v['top1_agreement'])}"
    return f"SNR {_fmt(v.get('snr_db'))} dB" if v.get("snr_db") is not None else "-"


def _print_many_table(results: Sequence[Any]) -> None:
    from rich.table import Table

    table = Table(title="convert: one bundle per profile")
    numbers = ("quant p50 ms", "speed-up", "notes", "seconds")
    for col in ("profile", "status", "bundle", "top-1 agreement / accuracy", *numbers):
        table.add_column(col, justify="right" if col in numbers else "left")
    for r in results:
        v = r.validation
        status = {"ok": "[green]ok[/green]", "gate failed": "[yellow]gate failed[/yellow]"}.get(r.status,
                                                                                              "[red]failed[/red]")
        table.add_row(r.profile, status, Path(r.bundle).name if r.bundle else "-", _quality(v) if v else "-",
                      _fmt(v.get("quant_p50_ms")), _fmt(v.get("speedup")), str(len(r.notes)), _fmt(r.seconds))
    console = _console()
    console.print(table)
    for r in results:
        if r.error:
            hint = f"\n    hint: {r.error['hint']}" if r.error.get("hint") else ""
            first = str(r.error.get("message", "")).splitlines()[0] if r.error.get("message") else r.error["error"]
            console.print(f"{r.profile}: {r.error['error']}: {first}{hint}", markup=False, highlight=False)
        elif r.bundle:
            plot = f", plot {r.plot}" if r.plot else ""
            console.print(f"{r.profile}: {r.bundle}{plot}", markup=False, highlight=False)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def _print_convert_table(summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['name']} {summary['version']} for {summary['profile']}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in summary["validation"].items():
        if k == "edgetpu":
            continue  # printed in words below
        if isinstance(v, dict):  # the gate's verdict
            v = f"{'passed' if v.get('passed') else 'FAILED'}: {v.get('metric')} {_fmt(v.get('value'))} " \
                f"(threshold {_fmt(v.get('threshold'))})"
        table.add_row(k, _fmt(v))
    console = _console()
    console.print(table)
    ladder = summary.get("ladder") or {}
    if ladder.get("ran"):
        steps = Table(title="recovery ladder (the gate failed with the first settings)")
        for col in ("rung", "settings", "metric", "value", "passed", "seconds"):
            steps.add_column(col)
        for a in ladder["attempts"]:
            steps.add_row(a["rung"], a["describe"], a["metric"] or "-", _fmt(a["value"]),
                          "yes" if a["passed"] else "no", _fmt(a["seconds"]))
        console.print(steps)
    tpu = summary.get("edgetpu")
    if tpu:
        console.print(f"edge tpu: {edgetpu_line(summary['validation'].get('edgetpu') or {})}", markup=False)
    for note in summary["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(f"bundle: [bold]{summary['bundle']}[/bold]")
    if summary.get("plot"):
        console.print(f"plot:   {summary['plot']}", markup=False, highlight=False)


# --------------------------------------------------------------------------------------------------
# tools


def cmd_tools_onnx2tf(args: argparse.Namespace) -> int:
    from converters import onnx2tf_tool as o2t

    env_dir = Path(args.env_dir).expanduser().absolute() if args.env_dir else o2t.default_env_dir()
    if args.python and not args.install:
        raise InputError("--python chooses the Python to build the environment with: it needs --install")
    if args.install:
        plain = bool(args.json) or not sys.stderr.isatty()
        with _progress_view(["onnx2tf"], plain=plain, transient=True) as event:
            o2t.ensure_env(env_dir, python=args.python,
                           progress=lambda message, fraction: event("onnx2tf", message, fraction))
    info = o2t.env_info(env_dir)
    if args.json:
        _print_json(info)
        return 0
    if info["installed"]:
        print(f"onnx2tf {o2t.ONNX2TF_VERSION}: installed in {info['env_dir']} (Python {info.get('python', '?')}, "
              f"built {info.get('created', '?')} in {info.get('build_seconds', '?')} s, "
              f"{len(info.get('packages', {}))} packages)")
    else:
        print(f"onnx2tf {o2t.ONNX2TF_VERSION}: not installed (environment folder {info['env_dir']}); "
              f"`{o2t.INSTALL_COMMAND}` builds it (about 800 MB download, 2.6 GB on disk)")
    print(f"requirements (hash {info['requirements_hash']}): {', '.join(info['requirements'])}")
    return 0


# --------------------------------------------------------------------------------------------------
# parser


def add_convert_options(cv: argparse.ArgumentParser) -> None:
    """The conversion options shared by `convert` and `deploy` (all but the model, profile and output)."""
    cv.add_argument("--calib", required=True,
                    help="calibration data: folder of .npy files, one .npy/.npz, a folder of images, or a .csv")
    cv.add_argument("--key", help="private signing key (default ~/.config/edgekit/keys/edgekit-signing.key)")
    cv.add_argument("--name", help="bundle name (default: the model file's stem)")
    cv.add_argument("--version", default="1.0.0", help="semantic version of this bundle (default 1.0.0)")
    cv.add_argument("--labels", help="text file with one class name per line")
    cv.add_argument("--seed", type=int, default=0, help="seed for the calibration/validation split")
    cv.add_argument("--threads", type=int, help="threads for the host latency measurement")
    cv.add_argument("--mode", choices=["int8", "dynamic", "fp16", "none"],
                    help="quantization mode (default: the profile's quantization.mode)")
    cv.add_argument("--allow-float-ops", action="store_true",
                    help="TFLite int8: keep ops without an int8 kernel in float (listed in the report) instead "
                         "of failing")
    cv.add_argument("--label-column", metavar="N|NAME",
                    help="CSV calibration/validation source: the label column, a 0-based index or a header name")
    cv.add_argument("--val", metavar="SRC",
                    help="validation source, separate from --calib (same kinds; labels from class subfolders, "
                         ".npz 'y' or --label-column); default: a seeded split of --calib")
    cv.add_argument("--latency-budget-ms", type=float, metavar="MS",
                    help="the device's smoke test refuses the model when its median latency there is above MS "
                         "(default: the profile's telemetry.slo_p99_ms, when set)")
    q = cv.add_argument_group("quantization and the accuracy gate (default: the profile's quantization section)")
    q.add_argument("--calib-method", choices=["minmax", "entropy", "percentile"],
                   help="how activation ranges are calibrated (ONNX; TFLite has minmax only)")
    pc = q.add_mutually_exclusive_group()
    pc.add_argument("--per-channel", dest="per_channel", action="store_const", const=True, default=None,
                    help="per-channel weight scales")
    pc.add_argument("--per-tensor", dest="per_channel", action="store_const", const=False,
                    help="one weight scale per tensor")
    q.add_argument("--exclude-nodes", metavar="A,B",
                   help="nodes kept in float: ONNX node names (after onnxruntime's pre-processing), TFLite tensor "
                        "names")
    q.add_argument("--exclude-op-types", metavar="T,U",
                   help="op types kept in float, e.g. Softmax (ONNX) or SOFTMAX (TFLite)")
    q.add_argument("--gate-accuracy", type=float, metavar="RATIO",
                   help="with labels: quantized accuracy must be >= RATIO x fp32 accuracy (default 0.99)")
    q.add_argument("--gate-agreement", type=float, metavar="A",
                   help="without labels: top-1 agreement with fp32 must be >= A (default 0.99)")
    q.add_argument("--gate-snr", type=float, metavar="DB",
                   help="outputs that are not class scores: SNR against fp32 must be >= DB (default 20)")
    q.add_argument("--no-ladder", action="store_true",
                   help="when the gate fails, stop (exit 1) instead of trying the recovery ladder")
    g = cv.add_argument_group("image preprocessing (recorded in the bundle, applied on the device)")
    g.add_argument("--size", help="HEIGHTxWIDTH the model expects")
    g.add_argument("--color", choices=["gray", "rgb", "bgr"])
    g.add_argument("--layout", choices=["NCHW", "NHWC"])
    g.add_argument("--mean", help="per-channel mean after scaling, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="per-channel std, e.g. 0.229,0.224,0.225")
    g.add_argument("--scale", type=float, help="pixel multiplier before mean/std (default 1/255)")
    t = cv.add_argument_group("Edge TPU (profiles with the edgetpu delegate: coral-usb, coral-devboard)")
    t.add_argument("--require-edgetpu", action="store_true",
                   help="fail (exit 2, before any work) when edgetpu_compiler is missing, instead of writing a "
                        "CPU-only bundle")
    t.add_argument("--edgetpu-compiler", metavar="PATH",
                   help="the edgetpu_compiler to run (default: edgetpu_compiler on PATH)")
    o = cv.add_argument_group("ONNX to TFLite (a .onnx model for a TFLite profile: onnx2tf in its own "
                              "environment)")
    o.add_argument("--offline", action="store_true",
                   help="never build the onnx2tf environment (an error when it is missing); conversion itself "
                        "never uses the network")
    o.add_argument("--onnx2tf-env", metavar="DIR", help="the onnx2tf environment's folder (default: "
                                                        "~/.cache/edgekit/onnx2tf-<hash>)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgekit", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"edgekit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def profiles_dir_opt(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profiles-dir", help=f"extra folder of profile TOMLs (also ${PROFILES_ENV})")

    prof = sub.add_parser("profiles", help="list and show device profiles")
    prof_sub = prof.add_subparsers(dest="profiles_command", required=True, metavar="COMMAND")
    pl = prof_sub.add_parser("list", help="list the profiles found")
    profiles_dir_opt(pl)
    pl.add_argument("--json", action="store_true", help="print JSON")
    pl.set_defaults(func=cmd_profiles_list)
    ps = prof_sub.add_parser("show", help="show one profile")
    ps.add_argument("name", help="profile name (e.g. rpi5) or path to a .toml")
    profiles_dir_opt(ps)
    ps.add_argument("--json", action="store_true", help="print JSON")
    ps.set_defaults(func=cmd_profiles_show)

    keys = sub.add_parser("keys", help="signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    ki = keys_sub.add_parser("init", help="create an Ed25519 signing key pair (refuses to overwrite)")
    ki.add_argument("--dir", help="folder for the key pair (default ~/.config/edgekit/keys)")
    ki.add_argument("--json", action="store_true", help="print JSON")
    ki.set_defaults(func=cmd_keys_init)

    bundle = sub.add_parser("bundle", help="inspect and verify bundles")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="COMMAND")
    bi = bundle_sub.add_parser("inspect", help="show a bundle's manifest and members (no key needed)")
    bi.add_argument("file")
    bi.add_argument("--json", action="store_true", help="print JSON")
    bi.set_defaults(func=cmd_bundle_inspect)
    bv = bundle_sub.add_parser("verify", help="check a bundle's signature and every member's hash")
    bv.add_argument("file")
    bv.add_argument("--pubkey", required=True, help="the trusted public key (.pub)")
    bv.add_argument("--json", action="store_true", help="print JSON")
    bv.set_defaults(func=cmd_bundle_verify)

    cv = sub.add_parser("convert", help="quantize a model for a device profile and write a signed bundle")
    cv.add_argument("model", help="the model: .onnx (any profile; TFLite profiles convert it with onnx2tf); "
                                  ".keras/.h5/.hdf5, a SavedModel folder or a float .tflite for TFLite profiles")
    cv.add_argument("--profile", required=True,
                    help="device profile name or path to a .toml; several, comma-separated "
                         "(rpi5,coral-usb,x86-64), convert in parallel processes, one bundle each")
    profiles_dir_opt(cv)
    cv.add_argument("--out", required=True, help="output folder for the bundle")
    add_convert_options(cv)
    cv.add_argument("--jobs", type=int, metavar="N",
                    help="with several profiles: conversions run at once (default: one per profile, at most the "
                         "CPU count)")
    cv.add_argument("--no-plot", action="store_true",
                    help="do not write the report's PNG (<bundle stem>.png next to the bundle)")
    cv.add_argument("--json", action="store_true", help="print JSON (several profiles: a list of results)")
    cv.set_defaults(func=cmd_convert)

    tools = sub.add_parser("tools", help="isolated tools edgekit runs in their own environments")
    tools_sub = tools.add_subparsers(dest="tools_command", required=True, metavar="TOOL")
    to = tools_sub.add_parser("onnx2tf", help="the onnx2tf environment (ONNX to TFLite): status, or --install")
    to.add_argument("--install", action="store_true", help="build the environment now (about 800 MB download)")
    to.add_argument("--python", metavar="PY",
                    help="the Python to build it with (CPython 3.10.12 to 3.12; default: this one)")
    to.add_argument("--env-dir", metavar="DIR", help="the environment's folder (default: "
                                                     "~/.cache/edgekit/onnx2tf-<hash>)")
    to.add_argument("--json", action="store_true", help="print JSON")
    to.set_defaults(func=cmd_tools_onnx2tf)
    register_monitor(sub)  # monitor, report (converters/monitor_cli.py)
    register_deploy(sub)  # push, deploy, cmd (converters/deploy_cli.py)
    register_broker(sub)  # broker acl (converters/broker_cli.py)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EdgekitError as e:
        print(f"edgekit: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            _print_json(e.to_dict())
        return e.exit_code
    except KeyboardInterrupt:
        print("edgekit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
