"""The agent's config file (``/etc/edge-agent/config.toml``): typed, validated, merged with the command line.

The file holds the options of ``edge-agent run`` for the service (``edge-agent run --config PATH``). It is
parsed into frozen dataclasses; every field is described in its metadata (``default_config_text`` writes
those descriptions as comments). Validation is strict and pure: an unknown key, a wrong type or a value
outside the allowed set is a ``ConfigError`` naming the file, the key path (``mqtt.port``) and what is
allowed. Files named in the config are checked when the agent starts, not here (``check_private_file``).

Precedence (``merge``): a flag given on the command line wins over the file, the file wins over the
built-in defaults. The ``run`` parser's defaults are the ``UNSET`` sentinel (or None) so a flag that was
typed can be told from one that was not, even when its value equals the default.

SIGHUP (``diff``): only ``RELOADABLE`` keys are applied to the running agent (without dropping the model);
any other change is reported as needing a restart (``systemctl restart edge-agent``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import stat
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/edge-agent/config.toml")
DEFAULT_STATE_DIR = "/var/lib/edge-agent"
DEFAULT_PUBKEY = "/etc/edge-agent/trusted.pub"
SCHEMA_VERSION = 1
LOG_LEVELS = ("debug", "info", "warning", "error")
MQTT_PROTOCOLS = ("5", "3.1.1")

# What SIGHUP changes in the running agent. Everything else (source, MQTT, store, hardware) is bound to
# objects built at start (the source, the broker session and its subscriptions, the power sampler) and is
# applied by a restart; the model keeps serving either way.
RELOADABLE: frozenset[str] = frozenset({"window_s", "log_level"})


class ConfigError(InputError):
    """The agent's config file is missing, not TOML, or does not validate (exit 2)."""


class _Unset:
    """The ``run`` parser's default for options the config file may set: "not given on the command line"."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __copy__(self) -> _Unset:
        return self

    def __deepcopy__(self, memo: dict) -> _Unset:
        return self


UNSET: Any = _Unset()


def _doc(text: str, choices: tuple[Any, ...] | None = None, minimum: float | None = None,
         maximum: float | None = None, *, above: float | None = None, flag: str = "") -> dict:
    return {"doc": text, "choices": choices, "min": minimum, "max": maximum, "above": above, "flag": flag}


@dataclass(frozen=True)
class MqttSection:
    host: str = field(default="", metadata=_doc(
        "broker host name or address; empty: offline (windows wait in the spool)", flag="--mqtt HOST"))
    port: int = field(default=1883, metadata=_doc("broker port", minimum=1, maximum=65535, flag="--mqtt :PORT"))
    protocol: str = field(default="5", metadata=_doc(
        "MQTT version (with 3.1.1 a broker that denies a publish by ACL drops it silently)", MQTT_PROTOCOLS,
        flag="--mqtt-protocol"))
    user: str = field(default="", metadata=_doc("user name for the broker; empty: none", flag="--mqtt-user"))
    password_file: str = field(default="", metadata=_doc(
        "file whose first line is the password (mode 600, readable by the agent's user); needs user",
        flag="--mqtt-password-file"))
    tls_ca: str = field(default="", metadata=_doc(
        "CA certificate that signed the broker's (PEM); set: TLS on", flag="--mqtt-tls-ca"))
    cert: str = field(default="", metadata=_doc(
        "client certificate (PEM) for TLS client authentication; needs tls_ca and key", flag="--mqtt-cert"))
    key: str = field(default="", metadata=_doc("the client certificate's unencrypted key (PEM, mode 600)",
                                               flag="--mqtt-key"))
    prefix: str = field(default="edgekit", metadata=_doc("topic prefix: <prefix>/<device>/telemetry …",
                                                         flag="--mqtt-prefix"))


@dataclass(frozen=True)
class StoreSection:
    inboxes: tuple[str, ...] = field(default=(f"{DEFAULT_STATE_DIR}/inbox",), metadata=_doc(
        "folders watched for new *.edgebundle files; the first is where `edgekit push ssh://…` lands, others "
        "(e.g. a USB stick's mount point) are only read", flag="--inbox"))
    groups: tuple[str, ...] = field(default=(), metadata=_doc(
        "MQTT groups whose pushed bundles this device also takes (<prefix>/group/<name>/deploy)",
        flag="--group"))
    keep: int = field(default=3, metadata=_doc("model versions kept in the store", minimum=2, flag="--keep"))
    health_inferences: int = field(default=50, metadata=_doc(
        "inferences a new model must run without error after the switch", minimum=1,
        flag="--health-inferences"))


@dataclass(frozen=True)
class SpoolSection:
    max_mb: float = field(default=64.0, metadata=_doc(
        "bound of the telemetry spool in MiB; beyond it the oldest windows are dropped", above=0,
        flag="--spool-max-mb"))
    max_age_h: float = field(default=168.0, metadata=_doc(
        "windows older than this many hours are dropped from the spool", above=0, flag="--spool-max-age-h"))


@dataclass(frozen=True)
class AgentConfig:
    schema: int = field(default=SCHEMA_VERSION, metadata=_doc("config schema version", (SCHEMA_VERSION,)))
    device_id: str = field(default="", metadata=_doc(
        "device id in MQTT topics and telemetry windows; empty: the host name", flag="--device-id"))
    state_dir: str = field(default=DEFAULT_STATE_DIR, metadata=_doc(
        "folder of the model store, the window sequence number, the idle baseline and the telemetry spool",
        flag="--state-dir"))
    pubkey: str = field(default=DEFAULT_PUBKEY, metadata=_doc(
        "the host's public signing key; bundles and commands not signed with it are refused", flag="--pubkey"))
    source: str = field(default="synthetic", metadata=_doc(
        "inference inputs: synthetic, npy:PATH, images:DIR, video:PATH, camera:N or camera:/dev/videoN, "
        "rtsp://…, serial:PORT", flag="--source"))
    window_s: float = field(default=10.0, metadata=_doc(
        "seconds per telemetry window (SIGHUP applies it)", above=0, flag="--window"))
    threads: int = field(default=0, metadata=_doc(
        "intra-op threads; 0: the bundle's runtime section (the profile's)", minimum=0, flag="--threads"))
    profile: str = field(default="", metadata=_doc(
        "device profile name or path; empty: the bundle manifest's profile", flag="--profile"))
    power: str = field(default="", metadata=_doc(
        "power source overriding the profile's: none, rapl, ina3221, pmic, hwmon:<chip>, serial:<meter>; "
        "empty: the profile's", flag="--power"))
    power_port: str = field(default="", metadata=_doc(
        "serial port of a USB power meter; empty: the profile's", flag="--power-port"))
    sysfs_root: str = field(default="/sys", metadata=_doc(
        "the folder that plays /sys for power sensors, thermal zones and cpufreq", flag="--sysfs-root"))
    log_level: str = field(default="warning", metadata=_doc(
        "log level (SIGHUP applies it; -v/-vv on the command line win)", LOG_LEVELS))
    mqtt: MqttSection = field(default_factory=MqttSection, metadata=_doc("MQTT telemetry, events, deploys"))
    store: StoreSection = field(default_factory=StoreSection, metadata=_doc(
        "the model store (ignored with --bundle, which bypasses it)"))
    spool: SpoolSection = field(default_factory=SpoolSection, metadata=_doc("the durable telemetry spool"))
    source_file: str = field(default="", metadata={"internal": True}, compare=False)

    def flat(self) -> dict[str, Any]:
        """Every key as ``{"mqtt.port": 1883, …}`` (the key paths ``diff`` reports)."""
        return _flatten(self, "")


# --------------------------------------------------------------------------------------------------
# validation (pure)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def _err(file: str, where: str, what: str) -> ConfigError:
    return ConfigError(f"{file}: {where}: {what}",
                       hint="fix the config file; `edge-agent install-service --dry-run` prints a valid one "
                            "with every key described")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return {str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, where: str, file: str, meta: dict) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where, file)  # type: ignore[arg-type]
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, list):
            raise _err(file, where, f"expected a list, got {type(value).__name__} {value!r}")
        item = typing.get_args(tp)[0]
        return tuple(_convert(v, item, f"{where}[{i}]", file, {}) for i, v in enumerate(value))
    ok = ((tp is bool and isinstance(value, bool))
          or (tp is int and isinstance(value, int) and not isinstance(value, bool))
          or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
          or (tp is str and isinstance(value, str)))
    if not ok:
        raise _err(file, where, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float:
        value = float(value)
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise _err(file, where, f"{value!r} is not allowed; allowed values: {allowed}")
    if meta.get("min") is not None and value < meta["min"]:
        raise _err(file, where, f"must be at least {meta['min']}, got {value!r}")
    if meta.get("max") is not None and value > meta["max"]:
        raise _err(file, where, f"must be at most {meta['max']}, got {value!r}")
    if meta.get("above") is not None and value <= meta["above"]:
        raise _err(file, where, f"must be greater than {meta['above']}, got {value!r}")
    return value


def _build(cls: type, table: Any, where: str, file: str) -> Any:
    if not isinstance(table, dict):
        raise _err(file, where or "top level", f"expected a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    unknown = sorted(set(table) - set(fields))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise _err(file, key, f"unknown key; allowed keys here: {', '.join(fields)}")
    kwargs = {name: _convert(table[name], hints[name], f"{where}.{name}" if where else name, file,
                             dict(f.metadata))
              for name, f in fields.items() if name in table}
    return cls(**kwargs)


def _check_cross_fields(c: AgentConfig, file: str) -> None:
    m = c.mqtt
    if not m.host:
        used = [k for k in ("user", "password_file", "tls_ca", "cert", "key") if getattr(m, k)]
        if used:
            raise _err(file, f"mqtt.{used[0]}", "set without mqtt.host (no broker: the agent runs offline)")
    if m.password_file and not m.user:
        raise _err(file, "mqtt.password_file", "needs mqtt.user")
    if bool(m.cert) != bool(m.key):
        raise _err(file, "mqtt.cert" if m.cert else "mqtt.key", "mqtt.cert and mqtt.key go together")
    if m.cert and not m.tls_ca:
        raise _err(file, "mqtt.cert", "needs mqtt.tls_ca (the CA that signed the broker's certificate)")
    for name in ("prefix",) + (("host",) if m.host else ()):
        value = getattr(m, name)
        if not value or any(ch in value for ch in "/+#\0 "):
            raise _err(file, f"mqtt.{name}", f"{value!r} must be non-empty without '/', '+', '#' or spaces")
    if c.device_id and any(ch in c.device_id for ch in "/+#\0"):
        raise _err(file, "device_id", f"{c.device_id!r} must not contain '/', '+' or '#' (it is a topic level)")
    for i, g in enumerate(c.store.groups):
        if not g or any(ch in g for ch in "/+#\0"):
            raise _err(file, f"store.groups[{i}]", f"{g!r} must be non-empty without '/', '+' or '#'")
    for key in ("state_dir", "pubkey", "sysfs_root"):
        if not os.path.isabs(getattr(c, key)):
            raise _err(file, key, f"{getattr(c, key)!r} must be an absolute path")
    for i, inbox in enumerate(c.store.inboxes):
        if not os.path.isabs(inbox):
            raise _err(file, f"store.inboxes[{i}]", f"{inbox!r} must be an absolute path")


def parse_config(data: dict, file: str) -> AgentConfig:
    """Validate a parsed TOML table into an ``AgentConfig`` (pure: no I/O)."""
    if isinstance(data, dict) and data.get("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise _err(file, "schema", f"schema version {data.get('schema')!r} is not supported; this agent reads "
                   f"version {SCHEMA_VERSION}")
    config = _build(AgentConfig, data, "", file)
    _check_cross_fields(config, file)
    return dataclasses.replace(config, source_file=file)


def load_config(path: str | os.PathLike) -> AgentConfig:
    """Read and validate the config file at ``path``; ConfigError (exit 2) when it is missing or invalid."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist",
                          hint="create it with `edge-agent install-service` (or drop --config)") from None
    except OSError as e:
        raise ConfigError(f"cannot read the config file {path}: {e.strerror}",
                          hint="check that the agent's user can read it") from e
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}", hint="check the line it names") from e
    return parse_config(data, str(path))


# --------------------------------------------------------------------------------------------------
# the default file


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def _comment(meta: dict) -> list[str]:
    text = meta["doc"]
    if meta.get("choices") and len(meta["choices"]) > 1:
        text += "; one of " + ", ".join(repr(c) for c in meta["choices"])
    words = text.split() + ([f"(command line: {meta['flag']})"] if meta.get("flag") else [])
    lines, line = [], "#"
    for word in words:
        if len(line) + 1 + len(word) > 110:
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


def default_config_text(profile_name: str = "") -> str:
    """A config file with every key at its default and described in a comment (``load_config`` reads it)."""
    config = AgentConfig(profile=profile_name)
    out = ["# edge-agent configuration, read by `edge-agent run --config /etc/edge-agent/config.toml` (the",
           "# systemd service). Flags given on the command line win over this file. SIGHUP (`systemctl reload",
           "# edge-agent`) applies window_s and log_level without dropping the model; other changes need",
           "# `systemctl restart edge-agent`. Unknown keys are errors.", ""]
    tables = []
    for name, f in _fields(AgentConfig).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            tables.append((name, f, value))
            continue
        out += [*_comment(dict(f.metadata)), f"{name} = {_toml_value(value)}", ""]
    for name, f, section in tables:
        out += [*_comment(dict(f.metadata)), f"[{name}]"]
        for sub, sf in _fields(type(section)).items():
            out += [*_comment(dict(sf.metadata)), f"{sub} = {_toml_value(getattr(section, sub))}"]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------------
# the command line


def _mqtt_target(m: MqttSection) -> str | None:
    if not m.host:
        return None
    host = f"[{m.host}]" if ":" in m.host else m.host
    return f"{host}:{m.port}"


def _opt(value: str) -> str | None:
    return value or None


# argparse dest of ``run`` -> (key path in the file, value from the config, built-in default without a file).
# A built-in default of None means the option's "not given" value is None (or an empty list), not UNSET.
_ARGS: dict[str, tuple[str, Any, Any]] = {
    "device_id": ("device_id", lambda c: _opt(c.device_id), None),
    "state_dir": ("state_dir", lambda c: c.state_dir, None),
    "pubkey": ("pubkey", lambda c: c.pubkey, None),
    "source": ("source", lambda c: c.source, "synthetic"),
    "window": ("window_s", lambda c: c.window_s, 10.0),
    "threads": ("threads", lambda c: c.threads or None, None),
    "profile": ("profile", lambda c: _opt(c.profile), None),
    "power": ("power", lambda c: _opt(c.power), None),
    "power_port": ("power_port", lambda c: _opt(c.power_port), None),
    "sysfs_root": ("sysfs_root", lambda c: c.sysfs_root, "/sys"),
    "log_level": ("log_level", lambda c: c.log_level, None),
    "mqtt": ("mqtt.host", lambda c: _mqtt_target(c.mqtt), None),
    "mqtt_protocol": ("mqtt.protocol", lambda c: c.mqtt.protocol, "5"),
    "mqtt_user": ("mqtt.user", lambda c: _opt(c.mqtt.user), None),
    "mqtt_password_file": ("mqtt.password_file", lambda c: _opt(c.mqtt.password_file), None),
    "mqtt_tls_ca": ("mqtt.tls_ca", lambda c: _opt(c.mqtt.tls_ca), None),
    "mqtt_cert": ("mqtt.cert", lambda c: _opt(c.mqtt.cert), None),
    "mqtt_key": ("mqtt.key", lambda c: _opt(c.mqtt.key), None),
    "mqtt_prefix": ("mqtt.prefix", lambda c: c.mqtt.prefix, "edgekit"),
    "inbox": ("store.inboxes", lambda c: list(c.store.inboxes), None),
    "group": ("store.groups", lambda c: list(c.store.groups), None),
    "keep": ("store.keep", lambda c: c.store.keep, 3),
    "health_inferences": ("store.health_inferences", lambda c: c.store.health_inferences, 50),
    "spool_max_mb": ("spool.max_mb", lambda c: c.spool.max_mb, 64.0),
    "spool_max_age_h": ("spool.max_age_h", lambda c: c.spool.max_age_h, 168.0),
}
# the options whose parser default is UNSET (the others default to None: "not given")
UNSET_DESTS: tuple[str, ...] = tuple(d for d, (_, _, default) in _ARGS.items() if default is not None)
_LIST_DESTS = ("inbox", "group")


def merge(args: argparse.Namespace, config: AgentConfig | None) -> argparse.Namespace:
    """A copy of ``run``'s ``args`` where flags given win, then ``config`` (when given), then built-in defaults.

    The copy also gets ``config_sources`` ({dest: "mqtt.key in FILE"}) for the values the file supplied,
    so errors about them can name the key. With ``args.bundle`` set the file's [store] section is not
    applied (--bundle bypasses the store).
    """
    out = argparse.Namespace(**vars(args))
    sources: dict[str, str] = {}
    for dest, (key, from_config, default) in _ARGS.items():
        value = getattr(out, dest, UNSET)
        given = value is not UNSET and value is not None and not (dest in _LIST_DESTS and value == [])
        if given:
            continue
        skip = key.startswith("store.") and getattr(out, "bundle", None) is not None
        if config is not None and not skip:
            value = from_config(config)
            if value is not None and value != []:
                sources[dest] = f"{key} in {config.source_file or 'the config file'}"
        else:
            value = [] if dest in _LIST_DESTS else default
        setattr(out, dest, value)
    out.config_sources = sources
    return out


def option_label(args: argparse.Namespace, dest: str, flag: str) -> str:
    """How an error names an option: the config key and file it came from, else the flag."""
    return getattr(args, "config_sources", {}).get(dest, flag)


# --------------------------------------------------------------------------------------------------
# SIGHUP


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in _fields(type(obj)):
        value = getattr(obj, name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            out.update(_flatten(value, key + "."))
        else:
            out[key] = value
    return out


def diff(old: AgentConfig, new: AgentConfig) -> tuple[dict[str, Any], list[str]]:
    """What a reload changes: (``RELOADABLE`` keys with their new values, other changed key paths, sorted)."""
    a, b = old.flat(), new.flat()
    changed = sorted(k for k in a if a[k] != b[k])
    live = {k: b[k] for k in changed if k in RELOADABLE}
    return live, [k for k in changed if k not in RELOADABLE]


# --------------------------------------------------------------------------------------------------
# private files


def check_private_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` exists and is not readable or writable by group/others (a key, a password file).

    InputError (exit 2) otherwise, with the ``chmod 600`` hint; ``what`` names the option or config key.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{what} {p} does not exist") from None
    except OSError as e:
        raise InputError(f"{what} {p} cannot be read: {e.strerror}",
                         hint="check that the agent's user owns it") from e
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {p} is not a file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise InputError(f"{what} {p} is readable or writable by group/others (mode {mode:04o})",
                         hint=f"chmod 600 {p}")
    return p
