"""Delivering a bundle to a device: target parsing, the ``Transport`` protocol and a lazy registry.

Targets (docs/deploy.md, "Targets"):

- ``ssh://[user@]host[:port][/inbox]``: ``ssh.py``, the user's OpenSSH client; default inbox
  ``/var/lib/edge-agent/inbox``; ``ssh://host/~/inbox`` names a folder relative to the remote home.
- ``mqtt://broker[:port]/device/ID`` and ``mqtt://broker[:port]/group/G``: ``mqtt.py``, QoS 1 chunks.
- ``dir:/media/usb`` or ``dir:relative/folder``: ``directory.py``, a copy renamed into place.

``create_transport(target, **opts)`` imports only the module the target needs.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

from edge_agent.errors import InputError, PushError
from edge_agent.telemetry.mqtt import check_topic_part

DEFAULT_SSH_INBOX = "/var/lib/edge-agent/inbox"
TARGET_FORMS = ("ssh://[user@]host[:port][/inbox]", "mqtt://broker[:port]/device/ID",
                "mqtt://broker[:port]/group/G", "dir:/path/to/folder")

PushState = Literal["pushed", "activated", "rolled_back", "rejected", "timeout", "failed"]
Progress = Callable[[int, int], None]

# the device's answer (ssh result file "result", MQTT event "kind") -> PushResult.state
RESULT_STATES: dict[str, PushState] = {"activated": "activated", "rolled_back": "rolled_back",
                                       "rejected": "rejected", "deploy_rejected": "rejected"}


@dataclass(frozen=True)
class Target:
    """A parsed push target. ``kind`` is ``ssh``, ``mqtt`` or ``dir``."""

    kind: Literal["ssh", "mqtt", "dir"]
    text: str  # as the user wrote it
    host: str | None = None
    port: int | None = None
    user: str | None = None
    path: str | None = None  # ssh: remote inbox; dir: local folder
    device: str | None = None  # mqtt: one device id
    group: str | None = None  # mqtt: a group name

    def __str__(self) -> str:
        return self.text


@dataclass
class PushResult:
    """What a push did. ``detail`` is the device's result or event (per device for a group)."""

    target: str
    transport: str
    bytes: int
    seconds: float
    state: PushState
    detail: dict[str, Any] = field(default_factory=dict)
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.state in ("pushed", "activated")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Transport(Protocol):
    """One way of delivering a bundle (``ssh``, ``mqtt``, ``dir``)."""

    name: str
    target: Target

    def push(self, bundle: Path, *, progress: Progress | None = None,
             wait_s: float | None = None) -> PushResult:
        """Deliver ``bundle``; with ``wait_s`` also wait that long for the device's result."""
        ...


def _bad(text: str, why: str) -> InputError:
    return InputError(f"push target {text!r}: {why}",
                      hint="use one of: " + ", ".join(TARGET_FORMS))


def _port(text: str, parts: Any) -> int | None:
    try:
        port = parts.port
    except ValueError as e:
        raise _bad(text, f"bad port ({e})") from e
    if port == 0:
        raise _bad(text, "port 0 cannot be connected to")
    return port


def parse_target(text: str) -> Target:
    """Parse a target string (see the module docstring); anything else is an ``InputError``."""
    if not isinstance(text, str) or not text.strip():
        raise _bad(str(text), "empty target")
    if text.startswith("dir:"):
        path = text[len("dir:"):]
        if not path:
            raise _bad(text, "no folder after 'dir:'")
        return Target("dir", text, path=path)
    scheme = text.partition("://")[0].lower() if "://" in text else ""
    if scheme not in ("ssh", "mqtt"):
        raise _bad(text, "unknown kind of target")
    parts = urlsplit(text)
    if parts.query or parts.fragment:
        raise _bad(text, "a target has no '?query' or '#fragment'")
    host = parts.hostname
    if not host:
        raise _bad(text, "no host")
    port = _port(text, parts)
    if scheme == "ssh":
        if parts.password is not None:
            raise _bad(text, "ssh targets take no password (use keys or the ssh agent)")
        path = parts.path
        if path in ("", "/"):
            path = DEFAULT_SSH_INBOX
        elif path.startswith("/~/"):
            path = path[3:].rstrip("/") or "."  # relative to the remote home (the ssh session's folder)
        return Target("ssh", text, host=host, port=port, user=parts.username or None, path=path)
    if parts.username is not None or parts.password is not None:
        raise _bad(text, "put MQTT user names and passwords in the MQTT options, not in the target")
    pieces = parts.path.strip("/").split("/")
    if len(pieces) != 2 or pieces[0] not in ("device", "group"):
        raise _bad(text, "an mqtt target ends in /device/ID or /group/G")
    check_topic_part(pieces[1], "device id" if pieces[0] == "device" else "group name")
    if pieces[0] == "device":
        return Target("mqtt", text, host=host, port=port, device=pieces[1])
    return Target("mqtt", text, host=host, port=port, group=pieces[1])


# kind -> (module, class), imported on first use
_REGISTRY = {
    "ssh": ("converters.push.ssh", "SshTransport"),
    "mqtt": ("converters.push.mqtt", "MqttTransport"),
    "dir": ("converters.push.directory", "DirectoryTransport"),
}


def create_transport(target: Target | str, **opts: Any) -> Transport:
    """The transport for ``target`` (a ``Target`` or a target string); ``opts`` go to its constructor."""
    t = parse_target(target) if isinstance(target, str) else target
    module_name, class_name = _REGISTRY[t.kind]
    cls = getattr(importlib.import_module(module_name), class_name)
    try:
        inspect.signature(cls).bind(t, **opts)
    except TypeError as e:
        raise InputError(f"bad options for a {t.kind} push: {e}") from e
    return cls(t, **opts)


def check_bundle(bundle: Path) -> int:
    """The size of a bundle file to push; ``InputError`` when it is missing, not a file or empty."""
    bundle = Path(bundle)
    if not bundle.exists():
        raise InputError(f"bundle {bundle} does not exist", hint="check the path (edgekit convert writes it)")
    if not bundle.is_file():
        raise InputError(f"bundle {bundle} is not a file")
    size = bundle.stat().st_size
    if size == 0:
        raise InputError(f"bundle {bundle} is empty", hint="build the bundle again")
    return size


def check_wait(wait_s: float | None) -> float | None:
    """``wait_s`` as given, None for 0; ``InputError`` for a negative wait."""
    if wait_s is None or wait_s == 0:
        return None
    if wait_s < 0:
        raise InputError(f"cannot wait {wait_s} s for a result", hint="pass a positive number of seconds")
    return float(wait_s)


__all__ = ["DEFAULT_SSH_INBOX", "RESULT_STATES", "TARGET_FORMS", "PushError", "PushResult", "Target",
           "Transport", "check_bundle", "check_wait", "create_transport", "parse_target"]
