"""`edgekit`: the host command line (profiles, keys, bundles, convert).

Exit codes: 0 ok, 1 failure of the work, 2 bad usage or bad input. Every command whose output a script
may read has ``--json``; errors are then printed as a JSON object on stdout as well as on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    v = m.get("validation") or {}
    if v:
        print("  validation: " + ", ".join(f"{k}={v[k]}" for k in sorted(v)))
    return 0


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


def cmd_convert(args: argparse.Namespace) -> int:
    from converters.convert import Overrides, convert

    model = Path(args.model)
    key = Path(args.key) if args.key else _default_key()
    if not key.is_file():
        raise InputError(f"no signing key at {key}",
                         hint="create one with `edgekit keys init` (or pass --key PATH)")
    profiles = [load_profile(name.strip(), args.profiles_dir) for name in args.profile.split(",")]
    if len(profiles) != 1:
        raise InputError("convert takes one profile in this version", hint="run convert once per profile")
    profile = profiles[0]
    pre = _preprocessing_from_args(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    overrides = Overrides(calib_method=args.calib_method, per_channel=args.per_channel,
                          exclude_nodes=_names(args.exclude_nodes), exclude_op_types=_names(args.exclude_op_types),
                          gate_accuracy=args.gate_accuracy, gate_agreement=args.gate_agreement,
                          gate_snr_db=args.gate_snr, ladder=False if args.no_ladder else None)

    def run(progress_cb: Any) -> Any:
        return convert(model, profile, args.calib, out_dir, key, name=args.name, version=args.version,
                       preprocessing=pre, labels=Path(args.labels) if args.labels else None,
                       seed=args.seed, threads=args.threads, progress=progress_cb, mode=args.mode,
                       allow_float_ops=args.allow_float_ops, label_column=_label_column(args.label_column),
                       val=args.val, overrides=overrides)

    if args.json or not sys.stderr.isatty():
        result = run(lambda step: print(f"[convert] {step}", file=sys.stderr))
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      transient=True) as progress:
            task = progress.add_task(f"converting {model.name} for {profile.name}", total=None)
            result = run(lambda step: progress.update(task, description=f"{profile.name}: {step}"))
    summary = {"bundle": str(result.bundle), "name": result.manifest.name, "version": result.manifest.version,
               "profile": profile.name, "validation": result.manifest.validation,
               "ladder": result.report.get("ladder"), "notes": result.report.get("notes", [])}
    if args.json:
        _print_json(summary)
        return 0
    _print_convert_table(summary)
    return 0


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
    for note in summary["notes"]:
        console.print(f"note: {note}")
    console.print(f"bundle: [bold]{summary['bundle']}[/bold]")


# --------------------------------------------------------------------------------------------------
# parser


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
    cv.add_argument("model", help="the model: .onnx for ONNX profiles; .keras/.h5/.hdf5, a SavedModel folder or a "
                                  "float .tflite for TFLite profiles")
    cv.add_argument("--profile", required=True, help="device profile name or path to a .toml")
    profiles_dir_opt(cv)
    cv.add_argument("--calib", required=True,
                    help="calibration data: folder of .npy files, one .npy/.npz, a folder of images, or a .csv")
    cv.add_argument("--out", required=True, help="output folder for the bundle")
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
    cv.add_argument("--json", action="store_true", help="print JSON")
    cv.set_defaults(func=cmd_convert)
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
