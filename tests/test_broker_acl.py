"""`edgekit broker acl` and the TLS recipe of docs/security.md, proven against a real Mosquitto.

The certificates come from running the doc's own shell block (openssl), the broker from the doc's own
mosquitto.conf block (ports and paths replaced). tests.mosquitto.Mosquitto always adds a plain loopback
listener (it waits for that port); here it has no anonymous access and serves the password accounts, so
the same ACL is checked once for certificate users and once for password users.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from converters.broker_acl import (
    DeviceSpec,
    check_password,
    generate_password,
    parse_devices_arg,
    parse_devices_file,
    password_entry,
    render_acl,
    write_broker_files,
)
from edge_agent.errors import InputError
from tests.mosquitto import Mosquitto, free_port
from tests.test_agent_cli import json_lines, make_bundle
from tests.test_telemetry_tls_auth import run_agent_cli, spool_depth

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "security.md"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
OPENSSL = shutil.which("openssl")
NOT_AUTHORIZED = 0x87
FLEET = [DeviceSpec("pi-a", ("g1",)), DeviceSpec("pi-b", ("g2",))]

TWO_DEVICES_ACL = """\
# Mosquitto ACL for edgekit (topic prefix 'edgekit'), written by `edgekit broker acl`.
# One block per account (no pattern lines); an account that is not listed may do nothing.
# Reload the broker after a change: systemctl reload mosquitto (SIGHUP).

# the host: edgekit monitor / push / deploy / cmd
user edgekit-host
topic read edgekit/#
topic write edgekit/+/cmd
topic write edgekit/+/deploy
topic write edgekit/group/+/deploy

# device pi-001 (groups: kitchen)
user pi-001
topic write edgekit/pi-001/telemetry
topic write edgekit/pi-001/status
topic write edgekit/pi-001/events
topic read edgekit/pi-001/cmd
topic read edgekit/pi-001/deploy
topic read edgekit/group/kitchen/deploy

# device pi-002 (groups: line-2)
user pi-002
topic write edgekit/pi-002/telemetry
topic write edgekit/pi-002/status
topic write edgekit/pi-002/events
topic read edgekit/pi-002/cmd
topic read edgekit/pi-002/deploy
topic read edgekit/group/line-2/deploy
"""


def doc_block(name: str) -> str:
    """The fenced block of docs/security.md that follows the ``<!-- tested: NAME`` marker."""
    text = DOC.read_text(encoding="utf-8")
    m = re.search(r"<!-- tested: " + re.escape(name) + r"\b[^\n]*-->\n```[a-z]*\n(.*?)\n```", text, re.S)
    assert m, f"docs/security.md has no block marked 'tested: {name}'"
    return m.group(1) + "\n"


# ------------------------------------------------------------------------------------------------ pure


def test_render_acl_two_devices_two_groups() -> None:
    acl = render_acl([DeviceSpec("pi-001", ("kitchen",)), DeviceSpec("pi-002", ("line-2",))])
    assert acl == TWO_DEVICES_ACL
    assert not [line for line in acl.splitlines() if line.startswith("pattern")] and "%" not in acl


def test_render_acl_prefix_host_user_and_repeated_groups() -> None:
    acl = render_acl([DeviceSpec("d1", ("a", "b", "a"))], prefix="site-a", host_user="ops")
    assert "user ops\ntopic read site-a/#\n" in acl
    assert "topic write site-a/group/+/deploy\n" in acl
    block = acl.split("user d1\n")[1]
    assert block.splitlines() == ["topic write site-a/d1/telemetry", "topic write site-a/d1/status",
                                  "topic write site-a/d1/events", "topic read site-a/d1/cmd",
                                  "topic read site-a/d1/deploy", "topic read site-a/group/a/deploy",
                                  "topic read site-a/group/b/deploy"]


@pytest.mark.parametrize("devices, kw", [
    ([DeviceSpec("a/b")], {}), ([DeviceSpec("+")], {}), ([DeviceSpec("#")], {}), ([DeviceSpec("")], {}),
    ([DeviceSpec("pi 1")], {}), ([DeviceSpec("pi:1")], {}), ([DeviceSpec("pi\n1")], {}),
    ([DeviceSpec("-pi")], {}), ([DeviceSpec("pi", ("g/1",))], {}), ([DeviceSpec("pi", ("",))], {}),
    ([DeviceSpec("pi"), DeviceSpec("pi")], {}), ([DeviceSpec("edgekit-host")], {}), ([], {}),
    ([DeviceSpec("pi")], {"prefix": "a/b"}), ([DeviceSpec("pi")], {"host_user": "h st"}),
])
def test_render_acl_refuses_unsafe_input(devices: list[DeviceSpec], kw: dict[str, str]) -> None:
    with pytest.raises(InputError):
        render_acl(devices, **kw)


def test_password_entry_is_mosquitto_passwd_format() -> None:
    """Same salt, same password: our line equals the one mosquitto_passwd wrote, byte for byte."""
    if not Path(MOSQUITTO_PASSWD).is_file():
        pytest.skip("mosquitto_passwd is not installed")
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "passwd"
        f.touch(mode=0o600)
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(f), "pi-001", "s3cret pass"], check=True, capture_output=True)
        theirs = f.read_text().strip()
    user, _, hashed = theirs.partition(":")
    _, seven, iterations, salt, _digest = hashed.split("$")
    assert (user, seven) == ("pi-001", "7")
    ours = password_entry("pi-001", "s3cret pass", salt=base64.b64decode(salt), iterations=int(iterations))
    assert ours == theirs
    assert check_password(hashed, "s3cret pass") and not check_password(hashed, "s3cret pas")
    fresh = password_entry("pi-001", "x").split(":", 1)[1]
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", fresh)
    assert fresh != password_entry("pi-001", "x").split(":", 1)[1]  # a new salt every time
    assert len(generate_password()) >= 43 and generate_password() != generate_password()


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_write_broker_files_modes_merge_and_rotate(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    r1 = write_broker_files(out, FLEET)
    assert [(a.user, a.kind, a.password) for a in r1.accounts] == [
        ("edgekit-host", "host", "created"), ("pi-a", "device", "created"), ("pi-b", "device", "created")]
    assert _mode(out) == 0o700 and _mode(out / "credentials") == 0o700
    for f in (out / "acl", out / "passwd", *(out / "credentials").iterdir()):
        assert _mode(f) == 0o600, f
    assert (out / "acl").read_text() == render_acl(FLEET)
    entries = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    for a in r1.accounts:
        assert a.credentials == out / "credentials" / f"{a.user}.password"
        assert check_password(entries[a.user], a.credentials.read_text().strip())

    # a second run with one more device and a hand-made account: existing passwords are kept
    with open(out / "passwd", "a") as f:
        f.write("admin:" + password_entry("admin", "root-pw").split(":", 1)[1] + "\n")
    before = (out / "passwd").read_text()
    (out / "credentials" / "pi-a.password").unlink()  # provisioned and deleted on the host
    r2 = write_broker_files(out, [*FLEET, DeviceSpec("pi-c")])
    assert [(a.user, a.password) for a in r2.accounts] == [
        ("edgekit-host", "kept"), ("pi-a", "kept"), ("pi-b", "kept"), ("pi-c", "created")]
    assert r2.other_accounts == ["admin"]
    after = (out / "passwd").read_text()
    assert after.startswith(before) and after.count("\n") == before.count("\n") + 1
    assert not (out / "credentials" / "pi-a.password").exists()

    # rotate one account: only its line changes
    r3 = write_broker_files(out, [*FLEET, DeviceSpec("pi-c")], rotate=["pi-b"])
    assert [a.password for a in r3.accounts] == ["kept", "kept", "rotated", "kept"]
    new = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    old = dict(line.split(":", 1) for line in after.splitlines())
    assert {u for u in new if new[u] != old[u]} == {"pi-b"}
    assert check_password(new["pi-b"], (out / "credentials" / "pi-b.password").read_text().strip())
    # rotate everything of the fleet; the hand-made account is left alone
    r4 = write_broker_files(out, FLEET, rotate=True)
    assert {a.password for a in r4.accounts} == {"rotated"}
    assert r4.other_accounts == ["admin", "pi-c"]
    assert "admin:" + old["admin"] in (out / "passwd").read_text()
    with pytest.raises(InputError, match="not an account of this fleet"):
        write_broker_files(out, FLEET, rotate=["pi-zz"])
    assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]  # no temp files left


def test_unreadable_password_file_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    out.mkdir()
    (out / "passwd").write_text("pi-a:$7$hash\nthis line is not an entry\n")
    with pytest.raises(InputError, match=r"passwd:2 is not a `user:hash` line"):
        write_broker_files(out, FLEET)
    assert (out / "passwd").read_text() == "pi-a:$7$hash\nthis line is not an entry\n"
    assert not (out / "acl").exists() and not (out / "credentials").exists()


def test_devices_file_and_argument(tmp_path: Path) -> None:
    f = tmp_path / "fleet.txt"
    f.write_text("# device groups\npi-001   kitchen\n\npi-002 kitchen,line-2  # two groups\npi-003\n")
    assert parse_devices_file(f) == [DeviceSpec("pi-001", ("kitchen",)),
                                     DeviceSpec("pi-002", ("kitchen", "line-2")), DeviceSpec("pi-003")]
    assert parse_devices_arg("pi-001, pi-002") == [DeviceSpec("pi-001"), DeviceSpec("pi-002")]
    f.write_text("pi-001\npi/002 kitchen\n")
    with pytest.raises(InputError, match=r"fleet.txt:2: device id 'pi/002'"):
        parse_devices_file(f)
    f.write_text("# nothing\n")
    with pytest.raises(InputError, match="lists no device"):
        parse_devices_file(f)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from converters.cli import main as edgekit

    fleet = tmp_path / "fleet.txt"
    fleet.write_text("pi-001 kitchen\npi-002 line-2\n")
    out = tmp_path / "broker"
    assert edgekit(["broker", "acl", "--devices-file", str(fleet), "--out", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [a["password"] for a in result["accounts"]] == ["created"] * 3
    assert (out / "acl").read_text() == TWO_DEVICES_ACL
    assert edgekit(["broker", "acl", "--devices-file", str(fleet), "--out", str(out), "--rotate", "pi-002"]) == 0
    text = capsys.readouterr().out
    assert "pi-002" in text and "password rotated" in text and "password kept" in text
    assert edgekit(["broker", "acl", "--devices", "pi-001,pi+2", "--out", str(out)]) == 2
    assert "pi+2" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --devices and --devices-file exclude each other
        edgekit(["broker", "acl", "--devices", "a", "--devices-file", str(fleet), "--out", str(out)])


# ------------------------------------------------------------------------------------------------ the recipe


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The doc's certificate block, run as written (sh -e) with BROKER=localhost DEVICES="pi-a pi-b"."""
    if OPENSSL is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")
    env = {**os.environ, "BROKER": "localhost", "DEVICES": "pi-a pi-b", "HOST_USER": "edgekit-host"}
    r = subprocess.run(["sh", "-e", "-c", doc_block("pki.sh")], cwd=d, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return d


def test_recipe_certificates(pki: Path) -> None:
    for key in ("ca", "host-ca", "server", "pi-a", "pi-b", "edgekit-host"):
        assert _mode(pki / f"{key}.key") == 0o600, key
        assert _mode(pki / f"{key}.pem") == 0o644, key

    def openssl(*args: str) -> subprocess.CompletedProcess[str]:
        assert OPENSSL is not None
        return subprocess.run([OPENSSL, *args], cwd=pki, capture_output=True, text=True)

    for name in ("pi-a", "pi-b"):
        assert openssl("x509", "-in", f"{name}.pem", "-noout", "-subject").stdout.strip() == f"subject=CN = {name}"
        assert openssl("verify", "-CAfile", "ca.pem", "-purpose", "sslclient", f"{name}.pem").returncode == 0
        assert openssl("verify", "-CAfile", "host-ca.pem", f"{name}.pem").returncode != 0  # not on 8884
    assert openssl("verify", "-CAfile", "host-ca.pem", "-purpose", "sslclient", "edgekit-host.pem").returncode == 0
    assert openssl("verify", "-CAfile", "ca.pem", "edgekit-host.pem").returncode != 0
    assert openssl("verify", "-CAfile", "ca.pem", "-purpose", "sslserver", "server.pem").returncode == 0
    assert "DNS:localhost" in openssl("x509", "-in", "server.pem", "-noout", "-ext", "subjectAltName").stdout


@dataclass
class Fleet:
    broker: Mosquitto
    device_port: int  # TLS, device certificates
    host_port: int  # TLS, the host certificate
    pki: Path
    files: Path  # edgekit broker acl --out
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def fleet(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    d = tmp_path_factory.mktemp("fleet")
    files = d / "broker-files"
    result = write_broker_files(files, FLEET)
    passwords = {a.user: a.credentials.read_text().strip() for a in result.accounts if a.credentials}
    device_port, host_port = free_port(), free_port()
    conf = doc_block("mosquitto.conf")
    for old, new in (("listener 8883", f"listener {device_port} 127.0.0.1"),
                     ("listener 8884", f"listener {host_port} 127.0.0.1"),
                     ("/etc/mosquitto/certs/", f"{pki}/"), ("/etc/mosquitto/edgekit/acl", str(files / "acl"))):
        assert old in conf
        conf = conf.replace(old, new)
    # the password file serves the fixture's plain listener (the TLS listeners take the user from the CN)
    b = Mosquitto(d / "mosquitto", anonymous=False,
                  extra_config=f"password_file {files / 'passwd'}\n{conf}").start()
    try:
        yield Fleet(b, device_port, host_port, pki, files, passwords)
    finally:
        b.stop()


class Mqtt:
    """A paho MQTT 5 client that records acknowledgements, grants, messages and disconnects."""

    def __init__(self, fleet: Fleet, user: str, mode: str, *, client_id: str | None = None,
                 port: int | None = None, will: tuple[str, bytes] | None = None, protocol: int = 5) -> None:
        import paho.mqtt.client as mqtt

        self.user = user
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.acks: dict[int, int] = {}
        self.acked = threading.Condition()
        self.granted: queue.Queue[list[Any]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.closed = threading.Event()
        cid = client_id or f"{user}-{mode}-{time.monotonic_ns()}"
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid,
                        protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311)
        c.reconnect_delay_set(30, 60)  # a test sees one connection: no quiet reconnect after a denial
        c.on_connect = lambda cl, u, f, rc, p: self.connack.put(rc)
        c.on_disconnect = lambda cl, u, f, rc, p: self.closed.set()
        c.on_message = lambda cl, u, m: self.messages.put((m.topic, m.payload, bool(m.retain)))
        c.on_subscribe = lambda cl, u, mid, rcs, p: self.granted.put(list(rcs))
        c.on_publish = self._on_publish
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        if mode == "cert":
            c.tls_set(ca_certs=str(fleet.pki / "ca.pem"), certfile=str(fleet.pki / f"{user}.pem"),
                      keyfile=str(fleet.pki / f"{user}.key"))
            host = "localhost"
            port = port or (fleet.host_port if user == "edgekit-host" else fleet.device_port)
        else:
            c.username_pw_set(user, fleet.passwords[user])
            host, port = fleet.broker.host, port or fleet.broker.port
        self.client = c
        c.connect(host, port, 30)
        c.loop_start()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self.acked:
            self.acks[mid] = int(reason_code.value)
            self.acked.notify_all()

    def connected(self, timeout: float = 10.0) -> bool:
        try:
            rc = self.connack.get(timeout=timeout)
        except queue.Empty:
            return False
        return not rc.is_failure

    def subscribe(self, topic: str) -> int:
        self.client.subscribe(topic, qos=1)
        return int(self.granted.get(timeout=10)[0].value)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The PUBACK reason code (0 = success)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self.acked:
            assert self.acked.wait_for(lambda: info.mid in self.acks, timeout=10), f"no PUBACK for {topic}"
            return self.acks[info.mid]

    def until(self, payload: bytes, timeout: float = 10.0) -> list[tuple[str, bytes, bool]]:
        """Every message up to and including the first whose payload is ``payload``."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            m = self.messages.get(timeout=max(0.01, deadline - time.monotonic()))
            got.append(m)
            if m[1] == payload:
                return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients() -> Iterator[list[Mqtt]]:
    made: list[Mqtt] = []
    yield made
    for c in made:
        c.close()


def _open(made: list[Mqtt], fleet: Fleet, user: str, mode: str, **kw: Any) -> Mqtt:
    c = Mqtt(fleet, user, mode, **kw)
    made.append(c)
    assert c.connected(), f"{user} ({mode}) could not connect"
    return c


@pytest.mark.mqtt
@pytest.mark.parametrize("mode", ["cert", "password"])
def test_device_may_use_only_its_own_topics(fleet: Fleet, mode: str, clients: list[Mqtt]) -> None:
    host = _open(clients, fleet, "edgekit-host", mode)
    assert host.subscribe("edgekit/#") == 1
    pi_b = _open(clients, fleet, "pi-b", mode)
    assert pi_b.subscribe("edgekit/pi-b/cmd") == 1
    status_b = f"pi-b online {mode}".encode()
    assert pi_b.publish("edgekit/pi-b/status", status_b, retain=True) == 0
    pi_a = _open(clients, fleet, "pi-a", mode)

    # Mosquitto 2.0's acl_file does not check subscriptions: every one is granted (QoS 1) ...
    for topic in ("edgekit/pi-a/cmd", "edgekit/pi-a/deploy", "edgekit/group/g1/deploy", "edgekit/pi-b/cmd",
                  "edgekit/pi-b/deploy", "edgekit/group/g2/deploy", "edgekit/+/cmd", "edgekit/#"):
        assert pi_a.subscribe(topic) == 1, topic
    # ... and the ACL is applied to each message at delivery instead
    own = f"pi-a telemetry {mode}".encode()
    assert pi_a.publish("edgekit/pi-a/telemetry", own) == 0
    seen = {t for t, _, _ in host.until(own)}
    assert "edgekit/pi-a/telemetry" in seen and "edgekit/pi-b/status" in seen  # the host reads everything

    for topic in ("edgekit/pi-a/cmd", "edgekit/pi-a/deploy", "edgekit/group/g1/deploy", "edgekit/pi-b/cmd",
                  "edgekit/pi-b/deploy", "edgekit/group/g2/deploy"):
        assert host.publish(topic, f"for {topic}".encode()) == 0, topic  # the host sends commands and bundles
    assert host.publish("edgekit/pi-a/cmd", b"end") == 0
    got = pi_a.until(b"end")
    assert {t for t, _, _ in got} == {"edgekit/pi-a/cmd", "edgekit/pi-a/deploy", "edgekit/group/g1/deploy"}
    assert all(p != status_b for _, p, _ in got)  # not even pi-b's retained status via edgekit/#
    assert [t for t, _, _ in pi_b.until(b"for edgekit/pi-b/cmd")] == ["edgekit/pi-b/cmd"]

    # every forbidden publish: PUBACK 0x87 Not authorized, then Mosquitto closes the connection
    forged = f"forged by pi-a {mode}".encode()
    for topic in ("edgekit/pi-b/telemetry", "edgekit/pi-b/status", "edgekit/pi-b/events", "edgekit/pi-b/cmd",
                  "edgekit/pi-a/cmd", "edgekit/pi-a/deploy", "edgekit/group/g1/deploy", "edgekit/pi-a/other"):
        c = _open(clients, fleet, "pi-a", mode)
        assert c.publish(topic, forged) == NOT_AUTHORIZED, topic
        assert c.closed.wait(5), f"Mosquitto kept the connection open after denying {topic}"
    # a Last Will in another device's name is accepted at CONNECT, but not published when the connection drops
    c = _open(clients, fleet, "pi-a", mode, will=("edgekit/pi-b/status", forged))
    assert c.publish("edgekit/pi-b/events", forged) == NOT_AUTHORIZED
    assert c.closed.wait(5)
    own_will = f"pi-a will {mode}".encode()  # the control: a will on its own status is published
    c = _open(clients, fleet, "pi-a", mode, will=("edgekit/pi-a/status", own_will))
    assert c.publish("edgekit/pi-b/events", forged) == NOT_AUTHORIZED
    assert c.closed.wait(5)
    assert all(p != forged for _, p, _ in host.until(own_will))
    # nobody ever received a forged message: the host and pi-b see the next good one first
    pi_a2 = _open(clients, fleet, "pi-a", mode)
    done = f"pi-a done {mode}".encode()
    assert pi_a2.publish("edgekit/pi-a/events", done) == 0
    assert all(p != forged for _, p, _ in host.until(done))
    assert host.publish("edgekit/pi-b/cmd", done) == 0
    assert all(p != forged for _, p, _ in pi_b.until(done))
    while not pi_a.messages.empty():
        assert pi_a.messages.get_nowait()[1] != forged

    # the host cannot speak for a device either
    host2 = _open(clients, fleet, "edgekit-host", mode)
    assert host2.publish("edgekit/pi-a/telemetry", forged) == NOT_AUTHORIZED
    assert pi_b.publish("edgekit/pi-b/status", b"", retain=True) == 0  # clear the retained statuses again
    assert _open(clients, fleet, "pi-a", mode).publish("edgekit/pi-a/status", b"", retain=True) == 0


@pytest.mark.mqtt
def test_mqtt311_sees_a_denied_publish_as_a_success(fleet: Fleet, clients: list[Mqtt]) -> None:
    """MQTT 3.1.1 has no reason codes: the PUBACK looks like a success, then the broker closes the connection."""
    host = _open(clients, fleet, "edgekit-host", "password")
    assert host.subscribe("edgekit/#") == 1
    c = _open(clients, fleet, "pi-a", "password", protocol=4)
    assert c.publish("edgekit/pi-b/telemetry", b"forged 3.1.1") == 0
    assert c.closed.wait(5)
    assert _open(clients, fleet, "pi-a", "password").publish("edgekit/pi-a/events", b"after 3.1.1") == 0
    assert all(p != b"forged 3.1.1" for _, p, _ in host.until(b"after 3.1.1"))


@pytest.mark.mqtt
def test_device_cannot_take_over_another_devices_session_or_the_host_listener(fleet: Fleet,
                                                                              clients: list[Mqtt]) -> None:
    pi_b = _open(clients, fleet, "pi-b", "cert", client_id="pi-b")
    # pi-a's certificate with pi-b's client id: use_username_as_clientid makes it client "pi-a"
    pi_a = _open(clients, fleet, "pi-a", "cert", client_id="pi-b")
    assert pi_a.publish("edgekit/pi-a/telemetry", b"x") == 0x10  # success: "no matching subscribers"
    assert not pi_b.closed.wait(1.0), "pi-b was disconnected by a client using its client id"
    log = fleet.broker.log.read_text(errors="replace")
    assert re.search(r"as pi-a \(p5, c1, k30, u'pi-a'\)", log)
    # the control: without use_username_as_clientid (the host listener) a second client with the same id
    # disconnects the first
    first = _open(clients, fleet, "edgekit-host", "cert", client_id="same-id")
    _open(clients, fleet, "edgekit-host", "cert", client_id="same-id")
    assert first.closed.wait(5)
    # a device certificate is refused on the host listener (its CA is host-ca.pem only)
    try:
        intruder = Mqtt(fleet, "pi-a", "cert", port=fleet.host_port)
    except (ssl.SSLError, OSError):
        return  # refused during the handshake (TLS 1.2)
    clients.append(intruder)
    assert not intruder.connected(timeout=3)  # TLS 1.3: the alert arrives after the handshake


@pytest.mark.mqtt
def test_retired_device_may_do_nothing(fleet: Fleet, tmp_path: Path, clients: list[Mqtt]) -> None:
    """An account in passwd but not in the ACL connects, and may neither publish nor receive."""
    files = tmp_path / "files"
    shutil.copytree(fleet.files, files)
    result = write_broker_files(files, [*FLEET, DeviceSpec("pi-old")])
    assert [a.user for a in result.accounts if a.password == "created"] == ["pi-old"]
    write_broker_files(files, FLEET)  # pi-old retired: its password stays, its ACL block goes
    b = Mosquitto(tmp_path / "mosquitto", anonymous=False,
                  extra_config=f"password_file {files / 'passwd'}\nacl_file {files / 'acl'}\n").start()
    try:
        old_password = (files / "credentials" / "pi-old.password").read_text().strip()
        local = Fleet(b, 0, 0, fleet.pki, files, {**fleet.passwords, "pi-old": old_password})
        host = _open(clients, local, "edgekit-host", "password")
        old = _open(clients, local, "pi-old", "password")
        assert old.subscribe("edgekit/pi-old/cmd") == 1
        assert host.publish("edgekit/pi-old/cmd", b"cmd") == 0
        assert old.publish("edgekit/pi-old/telemetry", b"x") == NOT_AUTHORIZED
        time.sleep(0.3)
        assert old.messages.empty()
    finally:
        for c in clients:
            c.close()
        clients.clear()
        b.stop()


# ------------------------------------------------------------------------------------------------ the agent


@pytest.fixture(scope="module")
def agent_bundle(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("acl-bundles")
    return make_bundle(d / "mlp.edgebundle", keypair[0]), keypair[1]


def _tls(pki: Path, name: str) -> tuple[str, ...]:
    return ("--mqtt-tls-ca", str(pki / "ca.pem"), "--mqtt-cert", str(pki / f"{name}.pem"), "--mqtt-key",
            str(pki / f"{name}.key"))


@pytest.mark.mqtt
def test_agent_with_the_recipe(fleet: Fleet, agent_bundle: tuple[Path, Path], tmp_path: Path,
                               clients: list[Mqtt]) -> None:
    host = _open(clients, fleet, "edgekit-host", "cert")
    assert host.subscribe("edgekit/#") == 1
    address = f"localhost:{fleet.device_port}"
    r = run_agent_cli(agent_bundle, address, "pi-a", tmp_path / "a", *_tls(fleet.pki, "pi-a"), duration=1.5)
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    seqs = []
    while len(seqs) < len(windows):
        topic, payload, _ = host.messages.get(timeout=10)
        if topic == "edgekit/pi-a/telemetry":
            seqs.append(json.loads(payload)["seq"])
    assert seqs == [w["seq"] for w in windows]
    assert spool_depth(tmp_path / "a") == 0 and "Not authorized" not in r.stderr

    # pi-a's certificate speaking as pi-b: every publish is refused, the agent spools and keeps inferring
    r = run_agent_cli(agent_bundle, address, "pi-b", tmp_path / "b", *_tls(fleet.pki, "pi-a"), duration=1.5)
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert windows and all(w["count"] > 0 for w in windows)
    assert "Not authorized" in r.stderr
    assert spool_depth(tmp_path / "b") == len(windows)
    pi_a = _open(clients, fleet, "pi-a", "cert")
    assert pi_a.publish("edgekit/pi-a/events", b"after") == 0
    assert not [t for t, _, _ in host.until(b"after") if t.startswith("edgekit/pi-b/")]


@pytest.mark.parametrize("flag", ["--mqtt-key", "--mqtt-password-file"])
@pytest.mark.parametrize("case", ["0644", "0640", "0604", "0660", "symlink-to-0644", "0600"])
def test_agent_refuses_a_key_others_may_read(pki: Path, agent_bundle: tuple[Path, Path], tmp_path: Path,
                                             flag: str, case: str) -> None:
    """Checked at start, before anything connects: exit 2, the file's name and `chmod 600` in the message."""
    target = tmp_path / "real-secret"
    shutil.copyfile(pki / "pi-a.key", target) if flag == "--mqtt-key" else target.write_text("pw\n")
    if case.startswith("symlink"):
        os.chmod(target, 0o644)
        given = tmp_path / "secret-link"
        given.symlink_to(target)
    else:
        os.chmod(target, int(case, 8))
        given = target
    extra: tuple[str, ...]
    if flag == "--mqtt-key":
        extra = ("--mqtt-tls-ca", str(pki / "ca.pem"), "--mqtt-cert", str(pki / "pi-a.pem"), "--mqtt-key",
                 str(given))
    else:
        extra = ("--mqtt-user", "pi-a", "--mqtt-password-file", str(given))
    r = run_agent_cli(agent_bundle, "127.0.0.1:1", "pi-a", tmp_path / "state", *extra, duration=0.3)
    if case == "0600":
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2, r.stderr
    assert f"{flag} {given} is readable or writable by group/others" in r.stderr
    assert f"chmod 600 {given}" in r.stderr
    assert not (tmp_path / "state" / "spool.db").exists()  # refused before it started

