"""TLS with client certificates, a wrong password and an ACL denial, against a real Mosquitto.

Certificates are generated here with ``cryptography``; the password file with ``mosquitto_passwd``.
In every refused case the agent logs a clear error, keeps inferring, and keeps its windows in the spool.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.mosquitto import Collector, Mosquitto, free_port
from tests.test_agent_cli import AGENT, NO_POWER, ROOT, json_lines, make_bundle

pytestmark = pytest.mark.mqtt
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls-bundles")
    return make_bundle(d / "mlp.edgebundle", keypair[0]), keypair[1]


def _write_pem(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    os.chmod(path, 0o600 if private else 0o644)
    return path


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate (CN = the device id)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("edgekit test CA")).issuer_name(name("edgekit test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
             .not_valid_after(now + dt.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                   else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                             x509.DNSName("localhost")]), critical=False)
        cert = b.sign(ca_key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    server_cert, server_key = leaf("127.0.0.1", True)
    client_cert, client_key = leaf("tls-1", False)
    return {"ca": _write_pem(d / "ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
            "server_cert": _write_pem(d / "server.pem", server_cert),
            "server_key": _write_pem(d / "server.key", server_key, private=True),
            "client_cert": _write_pem(d / "client.pem", client_cert),
            "client_key": _write_pem(d / "client.key", client_key, private=True)}


def run_agent_cli(bundle: tuple[Path, Path], address: str, device: str, state: Path, *extra: str,
                  duration: float = 2.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, "-v", "run", "--bundle", str(bundle[0]), "--pubkey", str(bundle[1]),
                           "--mqtt", address, "--device-id", device, "--window", "0.2", "--duration",
                           str(duration),
                           "--state-dir", str(state), "--json", *NO_POWER, *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def spool_depth(state: Path) -> int:
    db = sqlite3.connect(f"file:{state / 'spool.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT COUNT(*) FROM spool").fetchone()[0])
    finally:
        db.close()


def password_file(path: Path, users: dict[str, str]) -> Path:
    if not Path(MOSQUITTO_PASSWD).is_file():
        pytest.skip("mosquitto_passwd is not installed")
    path.touch(mode=0o600)
    for user, password in users.items():
        subprocess.run([MOSQUITTO_PASSWD, "-b", str(path), user, password], check=True, capture_output=True)
    return path


def test_tls_with_client_certificate(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    b = Mosquitto(tmp_path / "broker", extra_config=(
        f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
        f"keyfile {pki['server_key']}\nrequire_certificate true\n")).start()
    sub = Collector(b.host, b.port, "edgekit/tls-1/telemetry", client_id="monitor-tls")  # plain listener
    try:
        r = run_agent_cli(bundle, f"127.0.0.1:{tls_port}", "tls-1", tmp_path / "state", "--mqtt-tls-ca",
                          str(pki["ca"]), "--mqtt-cert", str(pki["client_cert"]), "--mqtt-key",
                          str(pki["client_key"]))
        assert r.returncode == 0, r.stderr
        printed = json_lines(r.stdout)
        got = [sub.wait_for(lambda t, m: True)[1]["seq"] for _ in printed]
        assert got == [w["seq"] for w in printed]
        assert spool_depth(tmp_path / "state") == 0
        # without a client certificate the broker refuses the TLS handshake: logged, the agent keeps running
        r = run_agent_cli(bundle, f"127.0.0.1:{tls_port}", "tls-1", tmp_path / "state2", "--mqtt-tls-ca",
                          str(pki["ca"]), duration=1.0)
        assert r.returncode == 0, r.stderr
        assert all(w["count"] > 0 for w in json_lines(r.stdout))
        assert f"cannot reach MQTT broker 127.0.0.1:{tls_port}" in r.stderr
        assert spool_depth(tmp_path / "state2") == len(json_lines(r.stdout))
    finally:
        sub.close()
        b.stop()


def test_unsafe_key_or_password_file_is_refused(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    os.chmod(pki["client_key"], 0o644)
    r = run_agent_cli(bundle, "127.0.0.1:1", "x", tmp_path / "s", "--mqtt-tls-ca", str(pki["ca"]), "--mqtt-cert",
                      str(pki["client_cert"]), "--mqtt-key", str(pki["client_key"]))
    assert r.returncode == 2 and "readable or writable by group/others" in r.stderr and "chmod 600" in r.stderr
    r = run_agent_cli(bundle, "127.0.0.1:1", "x", tmp_path / "s", "--mqtt-cert", str(pki["client_cert"]))
    assert r.returncode == 2 and "--mqtt-key" in r.stderr
    r = run_agent_cli(bundle, "127.0.0.1:1", "x", tmp_path / "s", "--mqtt-password-file", str(pki["ca"]))
    assert r.returncode == 2 and "--mqtt-user" in r.stderr
    r = run_agent_cli(bundle, "127.0.0.1:1", "x", tmp_path / "s", "--mqtt-password", "secret")
    assert r.returncode == 2  # there is no way to put a password on the command line


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_wrong_password_is_a_clear_error_and_inference_goes_on(bundle: tuple[Path, Path], tmp_path: Path,
                                                               protocol: str) -> None:
    pw = password_file(tmp_path / "passwd", {"dev": "right"})
    b = Mosquitto(tmp_path / "broker", anonymous=False, extra_config=f"password_file {pw}\n").start()
    wrong = tmp_path / "wrong"
    wrong.write_text("wrong\n")
    wrong.chmod(0o600)
    try:
        r = run_agent_cli(bundle, b.address, "pw-1", tmp_path / "state", "--mqtt-user", "dev",
                          "--mqtt-password-file", str(wrong), "--mqtt-protocol", protocol, duration=1.5)
    finally:
        b.stop()
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert len(windows) >= 5 and all(w["count"] > 0 for w in windows)
    assert f"MQTT broker {b.address} refused the connection of device 'pw-1'" in r.stderr
    # Mosquitto 2.0.11 answers a wrong password with "not authorised" (CONNACK 5 / 0x87), not 4 / 0x86
    assert "Not authorized" in r.stderr or "Bad user name or password" in r.stderr
    assert "--mqtt-password-file" in r.stderr
    assert "mqtt=refused" in r.stderr  # the status in the agent's window log lines
    assert spool_depth(tmp_path / "state") == len(windows)  # nothing lost: all waiting in the spool


def test_acl_denial_is_reported_and_windows_stay_spooled(bundle: tuple[Path, Path], tmp_path: Path) -> None:
    pw = password_file(tmp_path / "passwd", {"dev": "right", "mon": "watch"})
    acl = tmp_path / "acl"
    acl.write_text("user dev\ntopic write edgekit/acl-1/status\ntopic write edgekit/acl-1/events\n\n"
                   "user mon\ntopic read edgekit/#\n")
    b = Mosquitto(tmp_path / "broker", anonymous=False,
                  extra_config=f"password_file {pw}\nacl_file {acl}\n").start()
    secret = tmp_path / "secret"
    secret.write_text("right\n")
    secret.chmod(0o600)
    try:
        r = run_agent_cli(bundle, b.address, "acl-1", tmp_path / "state", "--mqtt-user", "dev",
                          "--mqtt-password-file", str(secret), duration=1.5)
    finally:
        b.stop()
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert len(windows) >= 5 and all(w["count"] > 0 for w in windows)
    assert "refused message" in r.stderr and "Not authorized" in r.stderr and "ACL" in r.stderr
    assert "rejected=" in r.stderr
    assert spool_depth(tmp_path / "state") == len(windows)  # a refused window is never deleted


def test_monitor_over_tls_with_client_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import paho.mqtt.client as mqtt

    from converters.cli import main as edgekit

    pki = make_pki(tmp_path / "pki")
    tls_port = free_port()
    b = Mosquitto(tmp_path / "broker", extra_config=(
        f"listener {tls_port} 127.0.0.1\ncafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
        f"keyfile {pki['server_key']}\nrequire_certificate true\n")).start()
    try:
        dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tls-dev", protocol=mqtt.MQTTv5)
        dev.connect(b.host, b.port)  # the plain listener: a device that already reported
        dev.loop_start()
        birth = {"state": "online", "device": "tls-9", "agent_version": "0.1.0", "profile": "x86-64",
                 "model": {"name": "mlp", "version": "1.0.0", "sha256": "0" * 64}, "ts": 1.0}
        dev.publish("edgekit/tls-9/status", json.dumps(birth), qos=1, retain=True).wait_for_publish(10)
        dev.loop_stop()
        dev.disconnect()
        common = ["monitor", "--broker", f"127.0.0.1:{tls_port}", "--once", "--json", "--wait", "1",
                  "--no-store", "--tls-ca", str(pki["ca"])]
        rc = edgekit([*common, "--tls-cert", str(pki["client_cert"]), "--tls-key", str(pki["client_key"])])
        out = capsys.readouterr().out
        assert rc == 0, out
        rows = {r["device"]: r for r in json.loads(out)["devices"]}
        assert rows["tls-9"]["state"] == "online"
        rc = edgekit(common)  # no client certificate: the broker refuses the handshake
        captured = capsys.readouterr()
        assert rc == 1
        assert f"127.0.0.1:{tls_port}" in captured.err
    finally:
        b.stop()
