"""The agent's config file: validation, the default text, merging with the command line, SIGHUP diff, and
``edge-agent run --config`` end to end (real subprocesses, a real bundle, a real Mosquitto)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
from pathlib import Path

import pytest

from edge_agent.cli import _build_parser
from edge_agent.config import (
    RELOADABLE,
    UNSET,
    AgentConfig,
    ConfigError,
    check_private_file,
    default_config_text,
    diff,
    load_config,
    merge,
)
from edge_agent.errors import InputError
from tests.fixtures_mqtt import broker  # noqa: F401
from tests.mosquitto import Collector, Mosquitto, retained
from tests.test_agent_cli import AGENT, ROOT, json_lines, make_bundle


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert e.value.exit_code == 2 and e.value.hint
    return e.value


# ------------------------------------------------------------------------------------------------ the file


def test_default_text_loads_and_is_the_defaults(tmp_path: Path) -> None:
    text = default_config_text("rpi5")
    config = load_config(write(tmp_path, text))
    assert config == AgentConfig(profile="rpi5")
    assert config.source_file == str(tmp_path / "config.toml")
    assert config.state_dir == "/var/lib/edge-agent" and config.pubkey == "/etc/edge-agent/trusted.pub"
    assert config.store.inboxes == ("/var/lib/edge-agent/inbox",) and config.window_s == 10.0


def test_default_text_names_and_describes_every_key() -> None:
    text = default_config_text("x86-64")
    lines = text.splitlines()
    for key in AgentConfig().flat():
        section, _, name = key.rpartition(".")
        if section:
            assert f"[{section}]" in lines, section
        i = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = "))
        assert lines[i - 1].startswith("# "), key  # described right above
    for f in dataclasses.fields(AgentConfig):
        if not f.metadata.get("internal"):
            assert f.metadata["doc"], f.name


def test_default_text_escapes_a_profile_path(tmp_path: Path) -> None:
    odd = '/opt/boards/my "odd" board\\v2.toml'
    assert load_config(write(tmp_path, default_config_text(odd))).profile == odd


def test_a_small_file_gets_defaults_for_the_rest(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, 'source = "camera:0"\nwindow_s = 5\n[mqtt]\nhost = "broker.local"\n'))
    assert c.source == "camera:0" and c.window_s == 5.0 and isinstance(c.window_s, float)
    assert c.mqtt.host == "broker.local" and c.mqtt.port == 1883 and c.mqtt.prefix == "edgekit"
    assert c.spool.max_mb == 64.0 and c.store.keep == 3


def test_unknown_top_level_key_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    e = error_of(tmp_path, "windw_s = 5\n")
    assert str(tmp_path / "config.toml") in e.message and "windw_s: unknown key" in e.message
    assert "window_s" in e.message and "log_level" in e.message and "mqtt" in e.message


def test_unknown_nested_key_names_its_path(tmp_path: Path) -> None:
    e = error_of(tmp_path, '[mqtt]\nhots = "broker"\n')
    assert "mqtt.hots: unknown key" in e.message
    assert "allowed keys here: host, port, protocol, user, password_file, tls_ca, cert, key, prefix" in e.message
    e = error_of(tmp_path, "[spool]\nmax_gb = 1\n")
    assert "spool.max_gb" in e.message and "max_mb, max_age_h" in e.message
    e = error_of(tmp_path, "[telemetry]\nqos = 1\n")
    assert "telemetry: unknown key" in e.message


@pytest.mark.parametrize(("text", "where", "what"), [
    ('window_s = "10"\n', "window_s", "expected number"),
    ("window_s = 0\n", "window_s", "greater than 0"),
    ("threads = -1\n", "threads", "at least 0"),
    ("threads = 2.5\n", "threads", "expected integer"),
    ('log_level = "verbose"\n', "log_level", "allowed values: 'debug', 'info', 'warning', 'error'"),
    ("[mqtt]\nhost = \"b\"\nport = 70000\n", "mqtt.port", "at most 65535"),
    ("[mqtt]\nhost = \"b\"\nprotocol = 5\n", "mqtt.protocol", "expected string"),
    ("[mqtt]\nhost = \"b\"\nprotocol = \"4\"\n", "mqtt.protocol", "'5', '3.1.1'"),
    ("[store]\nkeep = 1\n", "store.keep", "at least 2"),
    ("[store]\ninboxes = \"/srv/inbox\"\n", "store.inboxes", "expected a list"),
    ("[store]\ngroups = [\"lab\", 3]\n", "store.groups[1]", "expected string"),
    ("[spool]\nmax_mb = 0\n", "spool.max_mb", "greater than 0"),
    ("mqtt = 3\n", "mqtt", "expected a table"),
    ("schema = 2\n", "schema", "not supported"),
])
def test_bad_values_name_the_key(tmp_path: Path, text: str, where: str, what: str) -> None:
    e = error_of(tmp_path, text)
    assert f"config.toml: {where}: " in e.message and what in e.message, e.message


@pytest.mark.parametrize(("text", "where", "what"), [
    ('[mqtt]\nuser = "pi"\n', "mqtt.user", "without mqtt.host"),
    ('[mqtt]\nhost = "b"\npassword_file = "/etc/edge-agent/mqtt.pw"\n', "mqtt.password_file", "needs mqtt.user"),
    ('[mqtt]\nhost = "b"\ntls_ca = "/ca.pem"\ncert = "/c.pem"\n', "mqtt.cert", "go together"),
    ('[mqtt]\nhost = "b"\ncert = "/c.pem"\nkey = "/k.pem"\n', "mqtt.cert", "needs mqtt.tls_ca"),
    ('[mqtt]\nhost = "b"\nprefix = "a/b"\n', "mqtt.prefix", "without '/'"),
    ('device_id = "pi/1"\n', "device_id", "topic level"),
    ('state_dir = "state"\n', "state_dir", "absolute path"),
    ('[store]\ninboxes = ["inbox"]\n', "store.inboxes[0]", "absolute path"),
    ('[store]\ngroups = ["a+b"]\n', "store.groups[0]", "without '/'"),
])
def test_cross_field_rules(tmp_path: Path, text: str, where: str, what: str) -> None:
    e = error_of(tmp_path, text)
    assert f": {where}: " in e.message and what in e.message, e.message


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    e = error_of(tmp_path, "window_s = = 3\n")
    assert "not valid TOML" in e.message


# ------------------------------------------------------------------------------------------------ merge


def parse_run(*argv: str) -> object:
    return _build_parser().parse_args(["run", *argv])


def test_parser_defaults_are_unset_so_given_flags_can_be_told_apart() -> None:
    args = parse_run()
    assert args.window is UNSET and args.source is UNSET and args.keep is UNSET and args.sysfs_root is UNSET
    assert parse_run("--window", "10").window == 10.0
    bench = _build_parser().parse_args(["bench", "--bundle", "b"])
    assert bench.source == "synthetic" and bench.sysfs_root == "/sys"  # other commands keep their defaults


def test_merge_without_a_file_gives_the_builtin_defaults() -> None:
    args = merge(parse_run(), None)
    assert (args.window, args.source, args.sysfs_root, args.mqtt_protocol) == (10.0, "synthetic", "/sys", "5")
    assert (args.keep, args.health_inferences, args.spool_max_mb, args.spool_max_age_h) == (3, 50, 64.0, 168.0)
    assert args.inbox == [] and args.group == [] and args.state_dir is None and args.pubkey is None
    assert args.mqtt is None and args.mqtt_prefix == "edgekit" and args.threads is None
    assert args.config_sources == {}


def test_the_file_wins_over_defaults_and_given_flags_win_over_the_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, """
window_s = 5
source = "camera:0"
threads = 2
device_id = "pi-017"
[mqtt]
host = "broker.local"
port = 8883
prefix = "fleet"
[store]
inboxes = ["/srv/inbox", "/media/usb"]
groups = ["lab"]
keep = 4
[spool]
max_mb = 16
"""))
    args = merge(parse_run(), config)
    assert args.window == 5.0 and args.source == "camera:0" and args.threads == 2
    assert args.device_id == "pi-017" and args.state_dir == "/var/lib/edge-agent"
    assert args.mqtt == "broker.local:8883" and args.mqtt_prefix == "fleet"
    assert args.inbox == ["/srv/inbox", "/media/usb"] and args.group == ["lab"] and args.keep == 4
    assert args.spool_max_mb == 16.0 and args.spool_max_age_h == 168.0
    assert args.config_sources["mqtt"] == f"mqtt.host in {tmp_path / 'config.toml'}"
    # a flag typed with the built-in default's value still wins over the file
    given = merge(parse_run("--window", "10", "--source", "synthetic", "--inbox", "/tmp/in", "--keep", "3",
                            "--mqtt", "other:1883", "--threads", "1"), config)
    assert given.window == 10.0 and given.source == "synthetic" and given.inbox == ["/tmp/in"]
    assert given.keep == 3 and given.mqtt == "other:1883" and given.threads == 1
    assert given.group == ["lab"]  # not given: from the file
    assert "window" not in given.config_sources and "group" in given.config_sources


def test_merge_details(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[mqtt]\nhost = "fd00::7"\nport = 1884\n[store]\ngroups = ["lab"]\n'))
    args = merge(parse_run(), config)
    assert args.mqtt == "[fd00::7]:1884" and args.threads is None and args.device_id is None
    assert args.profile is None and args.power is None  # empty strings in the file mean "not set"
    # --bundle bypasses the store: the file's [store] section does not apply
    bundle_args = merge(parse_run("--bundle", "b.edgebundle"), config)
    assert bundle_args.inbox == [] and bundle_args.group == [] and bundle_args.keep == 3
    assert merge(parse_run(), load_config(write(tmp_path, "threads = 0\n", "t.toml"))).threads is None


def test_option_labels_name_the_config_key(tmp_path: Path) -> None:
    from edge_agent.config import option_label

    config = load_config(write(tmp_path, '[mqtt]\nhost = "b"\nuser = "u"\n'))
    args = merge(parse_run("--mqtt-tls-ca", "/ca.pem"), config)
    assert option_label(args, "mqtt_user", "--mqtt-user") == f"mqtt.user in {tmp_path / 'config.toml'}"
    assert option_label(args, "mqtt_tls_ca", "--mqtt-tls-ca") == "--mqtt-tls-ca"


# ------------------------------------------------------------------------------------------------ SIGHUP


def test_reloadable_is_minimal() -> None:
    assert RELOADABLE == {"window_s", "log_level"}


def test_diff_splits_live_changes_from_restart_changes() -> None:
    old = AgentConfig(profile="rpi5")
    assert diff(old, AgentConfig(profile="rpi5")) == ({}, [])
    new = dataclasses.replace(old, window_s=2.5, log_level="debug", source="camera:0",
                              mqtt=dataclasses.replace(old.mqtt, host="broker", port=8883),
                              store=dataclasses.replace(old.store, groups=("lab",)))
    live, restart = diff(old, new)
    assert live == {"window_s": 2.5, "log_level": "debug"}
    assert restart == ["mqtt.host", "mqtt.port", "source", "store.groups"]
    assert diff(old, dataclasses.replace(old, window_s=3.0)) == ({"window_s": 3.0}, [])


def test_diff_of_two_files(tmp_path: Path) -> None:
    a = load_config(write(tmp_path, "window_s = 10\n", "a.toml"))
    b = load_config(write(tmp_path, 'window_s = 1\n[spool]\nmax_age_h = 24\n', "b.toml"))
    assert diff(a, b) == ({"window_s": 1.0}, ["spool.max_age_h"])  # the file name is not a change


# ------------------------------------------------------------------------------------------------ private files


def test_check_private_file(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("k")
    key.chmod(0o600)
    assert check_private_file(key, "--mqtt-key") == key
    key.chmod(0o640)
    with pytest.raises(InputError) as e:
        check_private_file(key, "mqtt.key in /etc/edge-agent/config.toml")
    assert "mqtt.key in /etc/edge-agent/config.toml" in e.value.message and "mode 0640" in e.value.message
    assert "readable or writable by group/others" in e.value.message and e.value.hint == f"chmod 600 {key}"
    key.chmod(0o602)
    with pytest.raises(InputError, match="group/others"):
        check_private_file(key, "--mqtt-key")
    with pytest.raises(InputError, match="does not exist"):
        check_private_file(tmp_path / "nope", "--mqtt-password-file")
    with pytest.raises(InputError, match="is not a file"):
        check_private_file(tmp_path, "--mqtt-key")


# ------------------------------------------------------------------------------------------------ run --config


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cfg-bundle")
    return make_bundle(d / "mlp.edgebundle", keypair[0]), keypair[1]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ))


def test_run_takes_settings_from_the_config(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    path, pub = bundle
    cfg = write(tmp_path, f'device_id = "from-config"\npubkey = "{pub}"\nwindow_s = 0.25\npower = "none"\n'
                          f'state_dir = "{tmp_path / "state"}"\n')
    r = run_cli("run", "--config", str(cfg), "--bundle", str(path), "--duration", "1.2", "--json")
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert len(windows) >= 3 and {w["device"] for w in windows} == {"from-config"}
    assert (tmp_path / "state" / "seq").is_file()  # state_dir from the file
    # a flag wins over the file
    r = run_cli("run", "--config", str(cfg), "--bundle", str(path), "--duration", "1.2", "--json",
                "--window", "0.6", "--device-id", "from-flag")
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert 1 <= len(windows) <= 3 and {w["device"] for w in windows} == {"from-flag"}


def test_run_refuses_a_bad_config(tmp_path: Path) -> None:
    cfg = write(tmp_path, "[mqtt]\nhost = \"b\"\nqos = 2\n")
    r = run_cli("run", "--config", str(cfg))
    assert r.returncode == 2
    assert f"{cfg}: mqtt.qos: unknown key" in r.stderr and "hint:" in r.stderr
    r = run_cli("run", "--config", str(tmp_path / "absent.toml"))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_run_refuses_a_group_readable_key_named_in_the_config(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "client.pem", "client.key"))
    for p in (ca, cert, key):
        p.write_text("-----BEGIN-----\n")
    key.chmod(0o644)
    cfg = write(tmp_path, f'[mqtt]\nhost = "127.0.0.1"\ntls_ca = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n')
    r = run_cli("run", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2, r.stderr
    assert f"mqtt.key in {cfg} {key} is readable or writable by group/others (mode 0644)" in r.stderr
    assert f"chmod 600 {key}" in r.stderr
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o640)
    cfg = write(tmp_path, f'[mqtt]\nhost = "127.0.0.1"\nuser = "u"\npassword_file = "{pw}"\n', "pw.toml")
    r = run_cli("run", "--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert r.returncode == 2 and f"mqtt.password_file in {cfg}" in r.stderr and "chmod 600" in r.stderr


@pytest.mark.mqtt
def test_run_mqtt_settings_and_prefix_from_the_config(bundle: tuple[Path, Path], tmp_path: Path,
                                                      broker: Mosquitto) -> None:  # noqa: F811
    path, pub = bundle
    cfg = write(tmp_path, f'device_id = "cfg-1"\npubkey = "{pub}"\nwindow_s = 0.3\npower = "none"\n'
                          f'state_dir = "{tmp_path / "state"}"\n'
                          f'[mqtt]\nhost = "{broker.host}"\nport = {broker.port}\nprefix = "fleet7"\n')
    sub = Collector(broker.host, broker.port, "fleet7/cfg-1/#")
    p = subprocess.Popen([*AGENT, "run", "--config", str(cfg), "--bundle", str(path), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, birth, _ = sub.wait_for(lambda t, m: t == "fleet7/cfg-1/status")
        assert birth["state"] == "online" and birth["device"] == "cfg-1"
        _, window, _ = sub.wait_for(lambda t, m: t == "fleet7/cfg-1/telemetry")
        assert window["device"] == "cfg-1"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
        sub.close()
    assert p.returncode == 0, err
    assert retained(broker.host, broker.port, "fleet7/cfg-1/status") == {"state": "offline", "device": "cfg-1"}
