"""``edge-agent models list | activate VERSION | rollback``: look at and steer the device's model store.

``list`` reads only. ``activate`` and ``rollback`` re-verify the slot they point at (signature and every
member's sha256, so they need the pinned key) and change the pointer (``<state>/models/current.json``);
a running agent serves the new active model after its next start or a ``reload`` command. Both are
refused while an activation is in progress.

Errors print the message and hint on stderr (and, with ``--json``, the error as JSON on stdout) and end
with the error's exit code. Runnable on its own: ``python -m edge_agent.models_cli models list``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgekitError, InputError, ModelStoreError
from edge_agent.store import ModelStore, Pointer, Slot

PROG = "edge-agent"
DEFAULT_STATE_DIR = "/var/lib/edge-agent"


def add_models_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``models`` command (list / activate / rollback) to an argparse subparsers object."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help=f"the agent's state folder, holding models/ (default {DEFAULT_STATE_DIR})")
    common.add_argument("--pubkey", help="public key to verify models with (default: /etc/edge-agent/trusted.pub, "
                        "then ~/.config/edgekit/keys/edgekit-signing.pub); list does not need it")
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    m = sub.add_parser("models", help="list the installed models, activate one, roll back",
                       description="Look at and steer the device's model store (<state-dir>/models).")
    msub = m.add_subparsers(dest="models_command", required=True, metavar="{list,activate,rollback}")
    msub.add_parser("list", parents=[common], help="the installed models, the active and previous ones")
    a = msub.add_parser("activate", parents=[common], help="make an installed version the active one")
    a.add_argument("version", help="a version (1.2.0) or a slot id as `list` shows it")
    msub.add_parser("rollback", parents=[common], help="go back to the previous model")
    return m


def _store(args: argparse.Namespace, *, need_key: bool) -> ModelStore:
    from edge_agent.service import resolve_pubkey

    state = Path(args.state_dir)
    if not state.is_dir():
        raise InputError(f"state folder {state} does not exist",
                         hint=f"pass the agent's --state-dir (default {DEFAULT_STATE_DIR})")
    key = resolve_pubkey(args.pubkey) if need_key or args.pubkey else None
    return ModelStore(state, key)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _row(slot: Slot, ptr: Pointer | None, store: ModelStore) -> dict[str, Any]:
    result = store.result(slot.bundle_sha256)
    return {**slot.to_dict(), "active": ptr is not None and ptr.active == slot.id,
            "previous": ptr is not None and ptr.previous == slot.id,
            "result": None if result is None else {k: result.get(k) for k in ("result", "reason", "message")}}


def _list(args: argparse.Namespace) -> int:
    store = _store(args, need_key=False)
    error: ModelStoreError | None = None
    try:
        ptr: Pointer | None = store.pointer()
    except ModelStoreError as e:
        ptr, error = None, e
    rows = [_row(s, ptr, store) for s in store.slots()]
    by_id = {r["slot"]: r for r in rows}
    out: dict[str, Any] = {
        "state_dir": str(store.state_dir),
        "pointer": None if ptr is None else {k: v for k, v in ptr.to_dict().items() if k != "schema"},
        "active": by_id.get(ptr.active) if ptr and ptr.active else None,
        "previous": by_id.get(ptr.previous) if ptr and ptr.previous else None,
        "slots": rows,
    }
    try:
        journal = store.journal()
    except ModelStoreError as e:
        journal, error = None, error or e
    out["activation_in_progress"] = None if journal is None else {
        "bundle_sha256": journal["bundle_sha256"], "slot": journal.get("slot"), "step": journal["step"]}
    if error is not None:
        out["error"] = error.to_dict()
    if args.json:
        print(json.dumps(out))
    else:
        _print_list(store, out, ptr)
    if error is not None:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0


def _print_list(store: ModelStore, out: dict[str, Any], ptr: Pointer | None) -> None:
    rows = out["slots"]
    if ptr is not None:
        print(f"model store {store.root}: pointer {ptr.state} since {_when(ptr.since)}")
    if not rows:
        print("no models installed")
        return
    head = ("", "SLOT", "NAME", "VERSION", "PROFILE", "BUNDLE", "INSTALLED", "ROLE", "LAST RESULT")
    table = [head]
    for r in rows:
        role = "active" + (" (trial)" if ptr and ptr.state == "trial" else "") if r["active"] else (
            "previous" if r["previous"] else "")
        res = r["result"]
        last = "" if res is None else res["result"] + (f" ({res['reason']})" if res.get("reason") else "")
        table.append(("*" if r["active"] else "", r["slot"], r["name"], r["version"], r["profile"],
                      r["bundle_sha256"][:12], _when(r["installed"]), role, last))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    if out["activation_in_progress"]:
        j = out["activation_in_progress"]
        print(f"activation in progress: bundle {j['bundle_sha256'][:12]} step {j['step']}")


def _pointer_dict(store: ModelStore) -> dict[str, Any] | None:
    try:
        return {k: v for k, v in store.pointer().to_dict().items() if k != "schema"}
    except ModelStoreError:
        return None


def _changed(args: argparse.Namespace, action: str, store: ModelStore, before: dict[str, Any] | None,
             active: Slot | None) -> int:
    after = _pointer_dict(store)
    out = {"action": action, "before": before, "after": after,
           "active": None if active is None else active.to_dict(),
           "changed": before != after}
    if args.json:
        print(json.dumps(out))
        return 0
    if before is not None and after is not None and before["active"] == after["active"]:
        print(f"{after['active']} is already the active model: nothing changed")
        return 0
    b = before or {"active": "(unreadable pointer)", "previous": "(unreadable pointer)"}
    a = after or {"active": None, "previous": None}
    print(f"active:   {b['active'] or 'none'} -> {a['active'] or 'none'}")
    print(f"previous: {b['previous'] or 'none'} -> {a['previous'] or 'none'}")
    print("a running edge-agent serves it after its next start (or a `reload` command)")
    return 0


def _activate(args: argparse.Namespace) -> int:
    store = _store(args, need_key=True)
    before = _pointer_dict(store)
    slot = store.activate(args.version)
    return _changed(args, "activate", store, before, slot)


def _rollback(args: argparse.Namespace) -> int:
    store = _store(args, need_key=True)
    ptr = store.pointer()
    journal = store.journal()
    if journal is not None:
        raise ModelStoreError(f"an activation is in progress (bundle {journal['bundle_sha256'][:12]}, step "
                              f"{journal['step']!r})", hint="wait for it to end, then roll back")
    previous = store.previous
    if previous is None:
        raise ModelStoreError(f"the model store {store.root} has no previous model to roll back to",
                              hint="`edge-agent models list` shows the installed versions; choose one with "
                                   "`edge-agent models activate VERSION`")
    store.load(previous)  # never point at a model that no longer verifies
    before = {k: v for k, v in ptr.to_dict().items() if k != "schema"}
    active = store.rollback("command", "command", "rolled back with `edge-agent models rollback`")
    return _changed(args, "rollback", store, before, active)


def run_models(args: argparse.Namespace) -> int:
    """Run ``edge-agent models ...``; returns the exit code."""
    handler = {"list": _list, "activate": _activate, "rollback": _rollback}[args.models_command]
    try:
        return handler(args)
    except EdgekitError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        if getattr(args, "json", False):
            print(json.dumps(e.to_dict()), flush=True)
        return e.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m edge_agent.models_cli models list ...`` (the same arguments as ``edge-agent models``)."""
    parser = argparse.ArgumentParser(prog=PROG)
    sub = parser.add_subparsers(dest="command", required=True)
    add_models_parser(sub)
    return run_models(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
