"""Mosquitto ACL and password file for a fleet (`edgekit broker acl`); the model is in docs/security.md.

Each account gets its own ``user`` block (no ``pattern`` lines): a pattern applies to every account alike
(``%u`` / ``%c``), so it cannot say which groups one device belongs to, and it would also grant the host
account device rights. A device may publish only ``<prefix>/<id>/{telemetry,status,events}`` and read only
``<prefix>/<id>/{cmd,deploy}`` plus ``<prefix>/group/<g>/deploy`` of its own groups; the host account reads
``<prefix>/#`` and writes commands and bundles. An account that is not in the file may do nothing.

``render_acl`` and ``password_entry`` are pure; ``write_broker_files`` writes ``acl`` and ``passwd`` (mode
0600, temp file + fsync + rename) and one ``credentials/<account>.password`` per new or rotated account.
Passwords already in ``passwd`` are never changed unless rotation is asked for.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import InputError
from edge_agent.fsutil import fsync_dir as _fsync_dir

DEFAULT_PREFIX = "edgekit"
DEFAULT_HOST_USER = "edgekit-host"
# mosquitto_passwd 2.x (sha512-pbkdf2, "$7$"): 101 iterations, a 12-byte salt, the 64-byte PBKDF2-HMAC-SHA512
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
DEVICE_WRITE = ("telemetry", "status", "events")
DEVICE_READ = ("cmd", "deploy")
# A conservative name: safe in an MQTT topic level, in an ACL line, in a passwd line and as a file name.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_ENTRY = re.compile(r"([^:\s]+):(\S+)")


@dataclass(frozen=True)
class DeviceSpec:
    """A device id and the deploy groups it belongs to (``edge-agent run --group G``)."""

    device: str
    groups: tuple[str, ...] = ()


def check_name(value: str, what: str) -> str:
    """A device id, group, prefix or account name that is safe everywhere it is written; else InputError."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise InputError(f"{what} {value!r} cannot be used in the broker files",
                         hint=f"a {what} is 1 to 128 characters: letters, digits, '.', '_', '@', '-', starting "
                              "with a letter or digit (no '/', '+', '#', ':' or spaces)")
    return value


def _checked(devices: Sequence[DeviceSpec], prefix: str, host_user: str) -> list[DeviceSpec]:
    check_name(prefix, "topic prefix")
    check_name(host_user, "host account")
    seen: set[str] = set()
    out = []
    for spec in devices:
        if not isinstance(spec, DeviceSpec):
            raise InputError(f"expected a DeviceSpec, got {type(spec).__name__}")
        check_name(spec.device, "device id")
        if spec.device == host_user:
            raise InputError(f"device id {spec.device!r} is the host account's name",
                             hint="give the host account another name (--host-user)")
        if spec.device in seen:
            raise InputError(f"device {spec.device!r} is listed twice", hint="list each device once")
        seen.add(spec.device)
        groups = tuple(dict.fromkeys(check_name(g, "group name") for g in spec.groups))
        out.append(DeviceSpec(spec.device, groups))
    if not out:
        raise InputError("no devices given", hint="pass --devices pi-001,pi-002 or --devices-file FILE")
    return out


def render_acl(devices: list[DeviceSpec], *, prefix: str = DEFAULT_PREFIX,
               host_user: str = DEFAULT_HOST_USER) -> str:
    """The text of a Mosquitto ``acl_file``: one ``user`` block for the host account and one per device."""
    specs = _checked(devices, prefix, host_user)
    lines = [
        f"# Mosquitto ACL for edgekit (topic prefix {prefix!r}), written by `edgekit broker acl`.",
        "# One block per account (no pattern lines); an account that is not listed may do nothing.",
        "# Reload the broker after a change: systemctl reload mosquitto (SIGHUP).",
        "",
        "# the host: edgekit monitor / push / deploy / cmd",
        f"user {host_user}",
        f"topic read {prefix}/#",
        f"topic write {prefix}/+/cmd",
        f"topic write {prefix}/+/deploy",
        f"topic write {prefix}/group/+/deploy",
    ]
    for spec in specs:
        base = f"{prefix}/{spec.device}"
        lines += ["", f"# device {spec.device}" + (f" (groups: {', '.join(spec.groups)})" if spec.groups else ""),
                  f"user {spec.device}"]
        lines += [f"topic write {base}/{kind}" for kind in DEVICE_WRITE]
        lines += [f"topic read {base}/{kind}" for kind in DEVICE_READ]
        lines += [f"topic read {prefix}/group/{g}/deploy" for g in spec.groups]
    return "\n".join(lines) + "\n"


def password_hash(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``, as mosquitto_passwd 2.x writes it."""
    if not isinstance(password, str) or not password:
        raise InputError("an MQTT password must be a non-empty string")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise InputError(f"PBKDF2 iterations {iterations!r} must be a positive integer")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode('ascii')}${base64.b64encode(digest).decode('ascii')}"


def password_entry(user: str, password: str, *, salt: bytes | None = None,
                   iterations: int = PBKDF2_ITERATIONS) -> str:
    """One line of a Mosquitto 2.x ``password_file`` (without the newline): ``user:$7$…``."""
    return f"{check_name(user, 'account name')}:{password_hash(password, salt=salt, iterations=iterations)}"


def check_password(entry_hash: str, password: str) -> bool:
    """True when ``password`` matches a ``$7$`` hash (for tests and for checking a credentials file)."""
    parts = entry_hash.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7" or not parts[2].isdigit():
        return False
    try:
        salt = base64.b64decode(parts[3], validate=True)
        want = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2]))
    return secrets.compare_digest(got, want)


def generate_password() -> str:
    """A random password of 256 bits (43 URL-safe characters)."""
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------------------------------
# device lists


def parse_devices_arg(text: str) -> list[DeviceSpec]:
    """``pi-001,pi-002`` (no groups) as DeviceSpecs."""
    names = [n.strip() for n in text.split(",")]
    if not any(names):
        raise InputError("--devices is empty", hint="e.g. --devices pi-001,pi-002")
    return [DeviceSpec(check_name(n, "device id")) for n in names if n]


def parse_devices_file(path: Path | str) -> list[DeviceSpec]:
    """A devices file: one ``device [group,group]`` per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the devices file {path}: {e}",
                         hint="one device per line: `pi-001 kitchen,line-2`") from e
    specs = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        device, _, rest = line.partition(" ")
        groups = tuple(g for g in re.split(r"[\s,]+", rest.strip()) if g)
        try:
            specs.append(DeviceSpec(check_name(device, "device id"),
                                    tuple(check_name(g, "group name") for g in groups)))
        except InputError as e:
            raise InputError(f"{path}:{number}: {e.message}", hint=e.hint) from e
    if not specs:
        raise InputError(f"the devices file {path} lists no device", hint="one device per line: `pi-001 kitchen`")
    return specs


# --------------------------------------------------------------------------------------------------
# writing


@dataclass
class Account:
    """What ``write_broker_files`` did for one account."""

    user: str
    kind: str  # "host" | "device"
    groups: tuple[str, ...] = ()
    password: str = "kept"  # "created" | "rotated" | "kept"
    credentials: Path | None = None  # the file holding the new password (created / rotated only)

    def to_dict(self) -> dict[str, Any]:
        return {"user": self.user, "kind": self.kind, "groups": list(self.groups), "password": self.password,
                "credentials": None if self.credentials is None else str(self.credentials)}


@dataclass
class BrokerFiles:
    """The files written and what happened to each account."""

    acl: Path
    passwd: Path
    accounts: list[Account] = field(default_factory=list)
    other_accounts: list[str] = field(default_factory=list)  # in passwd, not in this fleet: kept as they were

    def to_dict(self) -> dict[str, Any]:
        return {"acl": str(self.acl), "passwd": str(self.passwd),
                "accounts": [a.to_dict() for a in self.accounts], "other_accounts": self.other_accounts}



def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` with ``mode``: a temp file beside it, fsync, rename, fsync the folder."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _read_passwd(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the existing password file {path}: {e}",
                         hint="fix or move it; edgekit never overwrites a password file it cannot read") from e
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#") and not _ENTRY.fullmatch(line.strip()):
            raise InputError(f"{path}:{number} is not a `user:hash` line",
                             hint="fix or move the file; edgekit never overwrites a password file it cannot read")
    return lines


def _rotation(rotate: bool | Iterable[str], users: list[str]) -> set[str]:
    if rotate is True:
        return set(users)
    if rotate is False or rotate is None:
        return set()
    wanted = {rotate} if isinstance(rotate, str) else set(rotate)
    unknown = sorted(wanted - set(users))
    if unknown:
        raise InputError(f"cannot rotate {', '.join(unknown)}: not an account of this fleet",
                         hint=f"accounts: {', '.join(users)}")
    return wanted


def write_broker_files(out_dir: Path | str, devices: list[DeviceSpec], *, prefix: str = DEFAULT_PREFIX,
                       host_user: str = DEFAULT_HOST_USER, rotate: bool | Iterable[str] = False) -> BrokerFiles:
    """Write ``out_dir/acl`` and ``out_dir/passwd`` (merged with the existing one) for the host and ``devices``.

    An account already in ``passwd`` keeps its password unless ``rotate`` is True (every account of the
    fleet) or names it. Each new or rotated account's password goes to ``out_dir/credentials/<user>.password``
    (0600), written before ``passwd`` so no password the broker knows is ever lost. Other entries of
    ``passwd`` are kept as they are and listed in ``other_accounts``.
    """
    out = Path(out_dir)
    acl_text = render_acl(devices, prefix=prefix, host_user=host_user)  # validates everything first
    specs = _checked(devices, prefix, host_user)
    accounts = [Account(host_user, "host"), *(Account(s.device, "device", s.groups) for s in specs)]
    users = [a.user for a in accounts]
    rotating = _rotation(rotate, users)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        passwd_path, acl_path, creds = out / "passwd", out / "acl", out / "credentials"
        lines = _read_passwd(passwd_path)
        index = {}
        for i, line in enumerate(lines):
            m = _ENTRY.fullmatch(line.strip())
            if m:
                index[m.group(1)] = i
        new_secrets: dict[str, str] = {}
        for account in accounts:
            if account.user in index and account.user not in rotating:
                continue
            account.password = "rotated" if account.user in index else "created"
            new_secrets[account.user] = generate_password()
        if new_secrets:
            creds.mkdir(mode=0o700, exist_ok=True)
            os.chmod(creds, 0o700)
        for account in accounts:  # 1. the new passwords, where the operator picks them up
            if account.user in new_secrets:
                account.credentials = creds / f"{account.user}.password"
                atomic_write(account.credentials, (new_secrets[account.user] + "\n").encode("utf-8"))
        for account in accounts:  # 2. the broker's password file
            if account.user in new_secrets:
                entry = password_entry(account.user, new_secrets[account.user])
                if account.user in index:
                    lines[index[account.user]] = entry
                else:
                    index[account.user] = len(lines)
                    lines.append(entry)
        atomic_write(passwd_path, ("\n".join(lines) + "\n").encode("utf-8"))
        atomic_write(acl_path, acl_text.encode("utf-8"))  # 3. the ACL
    except OSError as e:
        raise InputError(f"cannot write the broker files in {out}: {e.strerror or e}",
                         hint="check that the folder is writable and has free space") from e
    other = sorted(set(index) - set(users))
    return BrokerFiles(acl_path, passwd_path, accounts, other)


__all__ = ["DEFAULT_HOST_USER", "DEFAULT_PREFIX", "Account", "BrokerFiles", "DeviceSpec", "atomic_write",
           "check_name", "check_password", "generate_password", "parse_devices_arg", "parse_devices_file",
           "password_entry", "password_hash", "render_acl", "write_broker_files"]
