"""Signed commands: built on the host, verified on the device (contract: docs/deploy.md, "Signed commands").

A command travels on ``<prefix>/<device>/cmd`` as
``{"command": "<JSON text of the body>", "signature": "<base64 Ed25519 signature of that text's UTF-8>"}``,
signed with the host's bundle signing key. Body::

    {"schema": 1, "device": "pi-017", "action": "activate", "args": {"version": "1.2.0"},
     "nonce": "<32 hex>", "issued": 1795000000.0, "expires": 1795000300.0}

``verify_command`` checks, in this order, and refuses with a ``CommandError`` whose ``reason`` says why:
size and envelope (``malformed``), signature (``unsigned``, ``bad_signature``; nothing in the body is
trusted before it), body fields (``malformed``), device (``wrong_device``), lifetime over one day
(``lifetime``), issued more than 5 min in the future (``not_yet_valid``), expiry (``expired``), nonce
(``replayed``), action (``unknown_action``) and arguments (``bad_args``). An accepted command's nonce is
recorded in the ``NonceStore`` before it is returned, so it runs at most once, even across restarts.

Actions and their arguments:

* ``rollback`` {} and ``reload`` {}
* ``activate`` {"version": non-empty string}
* ``bench`` {"duration": seconds, 0.5..600, optional, default 10}
* ``set`` {"telemetry_interval": seconds, 1..3600}

This module is shared: the host (``converters/commands.py``) builds with ``build_command``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import CommandError, EdgekitError, InputError
from edge_agent.signing import sign, verify

log = logging.getLogger(__name__)

SCHEMA = 1
MAX_PAYLOAD_BYTES = 64 * 1024
MAX_CLOCK_SKEW_S = 300.0  # a command may be issued this far in the device's future
MAX_LIFETIME_S = 86400.0  # expires - issued
DEFAULT_TTL_S = 300.0
NONCES_FILE = "nonces.json"  # in the agent's state folder
ACTIONS = ("rollback", "activate", "bench", "set", "reload")
REASONS = ("malformed", "bad_signature", "unsigned", "wrong_device", "expired", "not_yet_valid", "lifetime",
           "replayed", "unknown_action", "bad_args")
BENCH_DEFAULT_S = 10.0
BENCH_RANGE_S = (0.5, 600.0)
TELEMETRY_INTERVAL_RANGE_S = (1.0, 3600.0)

_NONCE = re.compile(r"[0-9a-f]{32}")
_BODY_KEYS = frozenset({"schema", "device", "action", "args", "nonce", "issued", "expires"})
_SIGNATURE_B64_LEN = 88  # base64 of 64 bytes
_HINT_HOST = "send it again with `edgekit` from a host that holds the signing key this device pins"


@dataclass(frozen=True)
class Command:
    """A verified command: its arguments are validated and complete (defaults filled in)."""

    action: str
    args: dict[str, Any]
    nonce: str
    issued: float
    expires: float


# --------------------------------------------------------------------------------------------------
# arguments


def _r(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters: messages quote what a payload holds, never all of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _finite(value: int | float) -> bool:
    """A finite number that fits a float (JSON integers are unbounded: 10**400 overflows)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _number(value: Any, name: str, action: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise CommandError(f"{action}: {name} must be a number of seconds, got {_r(value)}",
                           hint=f"give {name} between {low:g} and {high:g}", reason="bad_args")
    if not low <= value <= high:
        raise CommandError(f"{action}: {name} {value:g} is out of range {low:g}..{high:g}",
                           hint=f"give {name} between {low:g} and {high:g}", reason="bad_args")
    return float(value)


def _only(args: Mapping[str, Any], action: str, allowed: tuple[str, ...]) -> None:
    extra = sorted(set(args) - set(allowed))
    if extra:
        what = ", ".join(allowed) if allowed else "no arguments"
        raise CommandError(f"{action}: unknown argument(s) {', '.join(map(_r, extra))}; allowed: {what}",
                           hint=f"{action} takes {what}", reason="bad_args")


def _args_none(action: str, args: Mapping[str, Any]) -> dict[str, Any]:
    _only(args, action, ())
    return {}


def _args_activate(action: str, args: Mapping[str, Any]) -> dict[str, Any]:
    _only(args, action, ("version",))
    version = args.get("version")
    if not isinstance(version, str) or not version.strip():
        raise CommandError(f"activate: version must be a non-empty string, got {_r(version)}",
                           hint="name a version the device holds, e.g. {\"version\": \"1.2.0\"}",
                           reason="bad_args")
    return {"version": version}


def _args_bench(action: str, args: Mapping[str, Any]) -> dict[str, Any]:
    _only(args, action, ("duration",))
    if "duration" not in args:
        return {"duration": BENCH_DEFAULT_S}
    return {"duration": _number(args["duration"], "duration", action, *BENCH_RANGE_S)}


def _args_set(action: str, args: Mapping[str, Any]) -> dict[str, Any]:
    allowed = ("telemetry_interval",)
    _only(args, action, allowed)
    if not args:
        raise CommandError(f"set: nothing to set; allowed: {', '.join(allowed)}",
                           hint="e.g. {\"telemetry_interval\": 30}", reason="bad_args")
    return {"telemetry_interval": _number(args["telemetry_interval"], "telemetry_interval", action,
                                          *TELEMETRY_INTERVAL_RANGE_S)}


_VALIDATORS: dict[str, Callable[[str, Mapping[str, Any]], dict[str, Any]]] = {
    "rollback": _args_none,
    "activate": _args_activate,
    "bench": _args_bench,
    "set": _args_set,
    "reload": _args_none,
}


def validate_args(action: str, args: Any) -> dict[str, Any]:
    """The complete, validated arguments of ``action``; CommandError ``unknown_action`` / ``bad_args``."""
    if action not in _VALIDATORS:
        raise CommandError(f"unknown action {_r(action)}; known: {', '.join(ACTIONS)}",
                           hint="this agent may be older than the host: update it, or use a known action",
                           reason="unknown_action", action=None)
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise CommandError(f"{action}: args must be a JSON object, got {type(args).__name__}",
                           hint="send args as an object, e.g. {}", reason="bad_args")
    return _VALIDATORS[action](action, args)


# --------------------------------------------------------------------------------------------------
# host side


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False, ensure_ascii=True)


def build_command(private_key: Ed25519PrivateKey, device: str, action: str, args: Mapping[str, Any], *,
                  ttl_s: float = DEFAULT_TTL_S, now: float | None = None, nonce: str | None = None) -> bytes:
    """The signed payload of one command for ``device`` (valid for ``ttl_s`` seconds from ``now``).

    ``nonce`` defaults to 32 random hex digits. Bad input (unknown action, bad arguments, a lifetime out of
    range) is an ``InputError``: nothing the device would refuse is ever signed.
    """
    if not isinstance(device, str) or not device:
        raise InputError(f"device id {_r(device)} must be a non-empty string",
                         hint="pass the device's --device id")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= MAX_LIFETIME_S:
        raise InputError(f"command lifetime {_r(ttl_s)} s is out of range",
                         hint=f"use more than 0 and at most {MAX_LIFETIME_S:g} s (one day)")
    try:
        clean = validate_args(action, dict(args))
    except CommandError as e:
        raise InputError(e.message, hint=e.hint) from e
    if nonce is None:
        nonce = secrets.token_hex(16)
    elif not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise InputError(f"nonce {_r(nonce)} is not 32 lowercase hex digits", hint="leave it out: one is drawn")
    issued = float(time.time() if now is None else now)
    body = {"schema": SCHEMA, "device": device, "action": action, "args": clean, "nonce": nonce,
            "issued": issued, "expires": issued + float(ttl_s)}
    text = _dumps(body)
    signature = base64.b64encode(sign(private_key, text.encode("utf-8"))).decode("ascii")
    payload = _dumps({"command": text, "signature": signature}).encode("utf-8")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise InputError(f"the signed command is {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES} byte limit",
                         hint="send smaller arguments")
    return payload


# --------------------------------------------------------------------------------------------------
# device side


def _claimed(text: str) -> tuple[str | None, str | None]:
    """Nonce and action of an unverified body, only to match a refusal to its request; never trusted."""
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(body, dict):
        return None, None
    nonce, action = body.get("nonce"), body.get("action")
    return (nonce if isinstance(nonce, str) and _NONCE.fullmatch(nonce) else None,
            action if isinstance(action, str) and action in ACTIONS else None)


def _malformed(message: str, **kw: Any) -> CommandError:
    return CommandError(message, hint="send it with `edgekit` (the payload must follow docs/deploy.md)",
                        reason="malformed", **kw)


def _time(body: dict[str, Any], key: str, nonce: str, action: Any) -> float:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise _malformed(f"command field {_r(key)} must be a Unix time in seconds, got {_r(value)}", nonce=nonce,
                         action=action if action in ACTIONS else None)
    return float(value)


def verify_command(payload: bytes, public_key: Ed25519PublicKey, device: str, *, nonces: NonceStore,
                   now: float | None = None) -> Command:
    """The verified command in ``payload`` for ``device``; a ``CommandError`` (see module doc) otherwise.

    The command's nonce is recorded in ``nonces`` before it is returned (at most once).
    """
    now = time.time() if now is None else float(now)
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _malformed(f"command payload of {len(payload)} bytes is over the {MAX_PAYLOAD_BYTES} byte limit")
    try:
        envelope = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _malformed(f"command payload is not UTF-8 JSON: {e}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("command"), str):
        raise _malformed("command payload must be an object with the body's JSON text in \"command\"")
    extra = sorted(set(envelope) - {"command", "signature"})
    if extra:
        raise _malformed(f"command payload has unknown field(s) {', '.join(map(_r, extra))}")
    text: str = envelope["command"]
    claimed_nonce, claimed_action = _claimed(text)
    signature = envelope.get("signature")
    if signature is None or signature == "":
        raise CommandError("command is not signed", hint=_HINT_HOST, reason="unsigned", nonce=claimed_nonce,
                           action=claimed_action)
    sig = None
    if isinstance(signature, str) and len(signature) == _SIGNATURE_B64_LEN:
        try:
            sig = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            sig = None
        # one byte string, one encoding: refuse a signature whose unused padding bits were changed
        if sig is not None and (len(sig) != 64 or base64.b64encode(sig).decode("ascii") != signature):
            sig = None
    try:
        signed = text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: not text anyone signed
        signed = None
    if sig is None or signed is None or not verify(public_key, signed, sig):
        raise CommandError("command signature does not verify with this device's trusted key",
                           hint="the host must sign with the private key whose public key this device pins "
                                "(compare `edgekit keys` fingerprints); " + _HINT_HOST,
                           reason="bad_signature", nonce=claimed_nonce, action=claimed_action)

    # --- from here on the body is the signer's
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise _malformed(f"signed command body is not JSON: {e}") from None
    if not isinstance(body, dict) or set(body) != _BODY_KEYS:
        keys = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise _malformed(f"signed command body must have exactly the fields {sorted(_BODY_KEYS)}, got {keys}",
                         nonce=claimed_nonce, action=claimed_action)
    nonce, action = body["nonce"], body["action"]
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise _malformed(f"command nonce {_r(nonce)} is not 32 lowercase hex digits")
    if type(body["schema"]) is not int or body["schema"] != SCHEMA:
        raise CommandError(f"command schema {_r(body['schema'])} is not supported (this agent reads {SCHEMA})",
                           hint="update the agent or the host so both speak the same command schema",
                           reason="malformed", nonce=nonce, action=claimed_action)
    if not isinstance(action, str):
        raise _malformed(f"command action {_r(action)} is not a string", nonce=nonce)
    known_action = action if action in ACTIONS else None
    if body["device"] != device:
        raise CommandError(f"command is for device {_r(body['device'])}, this is {_r(device)}",
                           hint="send it to the device it names (check the MQTT topic and --device)",
                           reason="wrong_device", nonce=nonce, action=known_action)
    issued = _time(body, "issued", nonce, action)
    expires = _time(body, "expires", nonce, action)
    if not 0 < expires - issued <= MAX_LIFETIME_S:
        raise CommandError(f"command lifetime {expires - issued:g} s is not within 0..{MAX_LIFETIME_S:g} s",
                           hint="send it again with a lifetime of at most one day", reason="lifetime",
                           nonce=nonce, action=known_action)
    if issued > now + MAX_CLOCK_SKEW_S:
        raise CommandError(f"command issued {issued - now:.0f} s in the future (more than "
                           f"{MAX_CLOCK_SKEW_S:g} s of clock skew)",
                           hint="check the clocks of the host and the device (NTP)", reason="not_yet_valid",
                           nonce=nonce, action=known_action)
    if now >= expires:
        raise CommandError(f"command expired {now - expires:.0f} s ago",
                           hint="send it again; a device that was offline longer than the command's lifetime "
                                "never runs it", reason="expired", nonce=nonce, action=known_action)
    if nonces.seen(nonce):
        raise CommandError(f"command nonce {nonce} was seen before (a replay)",
                           hint="send a new command instead of repeating an old payload", reason="replayed",
                           nonce=nonce, action=known_action)
    try:
        args = validate_args(action, body["args"])
    except CommandError as e:
        e.nonce, e.action = nonce, known_action
        raise
    if not nonces.add(nonce, expires, now=now):
        raise CommandError(f"command nonce {nonce} was seen before (a replay)",
                           hint="send a new command instead of repeating an old payload", reason="replayed",
                           nonce=nonce, action=action)
    return Command(action=action, args=args, nonce=nonce, issued=issued, expires=expires)


def rejection_event(error: CommandError) -> dict[str, Any]:
    """The fields of the ``command`` event (``result: rejected``) for a refused command."""
    return {"nonce": error.nonce, "action": error.action, "result": "rejected", "reason": error.reason,
            "detail": error.message}


# --------------------------------------------------------------------------------------------------
# nonces


class NonceStore:
    """The nonces of accepted commands until they expire, in a JSON file (nonce -> expires, Unix s).

    Every change is written to a temp file, fsynced and renamed (then the folder is fsynced); expired
    entries are dropped on every ``add``. A corrupt file is moved aside (``<file>.corrupt-<time>``) with a
    warning and the store starts empty: replay protection for commands accepted before then relies on their
    expiry alone. Thread-safe (one process).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._nonces: dict[str, float] = self._load()

    def _load(self) -> dict[str, float]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as e:
            raise EdgekitError(f"cannot read the command nonce file {self.path}: {e.strerror}",
                               hint="check the state folder's permissions") from e
        try:
            data = json.loads(raw.decode("utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"a JSON object is expected, not {type(data).__name__}")
            nonces: dict[str, float] = {}
            for k, v in data.items():
                if not _NONCE.fullmatch(k) or isinstance(v, bool) or not isinstance(v, (int, float)) \
                        or not _finite(v):
                    raise ValueError(f"entry {_r(k)}: {_r(v)} is not nonce -> expiry time")
                nonces[k] = float(v)
            return nonces
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            try:
                os.replace(self.path, aside)
            except OSError as err:
                raise EdgekitError(f"the command nonce file {self.path} is corrupt ({e}) and cannot be moved "
                                   f"aside: {err.strerror}",
                                   hint="remove it by hand; the agent then starts a new one") from err
            log.warning("command nonce file %s is corrupt (%s); moved aside to %s and started empty: replay "
                        "protection for commands accepted before now relies on their expiry (at most %g s)",
                        self.path, e, aside, MAX_LIFETIME_S)
            return {}

    def seen(self, nonce: str) -> bool:
        """True when ``nonce`` was added and not pruned yet."""
        with self._lock:
            return nonce in self._nonces

    def add(self, nonce: str, expires: float, *, now: float | None = None) -> bool:
        """Record ``nonce`` until ``expires`` and drop expired entries; False (nothing written) when it is
        there already. The file is written before this returns."""
        now = time.time() if now is None else now
        with self._lock:
            if nonce in self._nonces:
                return False
            kept = {k: v for k, v in self._nonces.items() if v > now}
            kept[nonce] = float(expires)
            self._nonces = kept  # kept in memory even when the write fails: this run stays protected
            self._write(kept)
            return True

    def __len__(self) -> int:
        with self._lock:
            return len(self._nonces)

    def _write(self, nonces: dict[str, float]) -> None:
        folder = self.path.parent
        tmp = folder / f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(nonces, f, separators=(",", ":"), sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # never created
                tmp.unlink()
            raise EdgekitError(f"cannot save the command nonce file {self.path}: {e.strerror}",
                               hint="check free space and permissions of the state folder; until it is "
                                    "saved a restart forgets which commands ran") from e
