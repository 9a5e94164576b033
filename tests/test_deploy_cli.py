"""`edgekit push / deploy / cmd`: bad input is refused with exit 2 and a clear message, before anything is
converted or sent (the real pushes and commands are tested end to end in test_deploy_ssh/mqtt)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from converters.cli import main
from converters.deploy_cli import _command_args
from edge_agent.errors import InputError
from tests.mosquitto import free_port


@pytest.mark.parametrize(("action", "values", "args"), [
    ("rollback", [], {}), ("reload", [], {}), ("activate", ["1.2.0"], {"version": "1.2.0"}),
    ("bench", [], {}), ("bench", ["5"], {"duration": 5.0}),
    ("set", ["telemetry_interval=30"], {"telemetry_interval": 30.0}),
])
def test_command_arguments(action: str, values: list[str], args: dict) -> None:
    assert _command_args(action, values) == args


@pytest.mark.parametrize(("action", "values", "what"), [
    ("rollback", ["now"], "takes no arguments"), ("activate", [], "one version"),
    ("activate", ["1", "2"], "one version"), ("bench", ["five"], "must be a number"),
    ("bench", ["1", "2"], "at most one"), ("set", [], "KEY=VALUE"), ("set", ["telemetry_interval"], "KEY=VALUE"),
    ("set", ["telemetry_interval=soon"], "must be a number"),
])
def test_bad_command_arguments(action: str, values: list[str], what: str) -> None:
    with pytest.raises(InputError, match=what):
        _command_args(action, values)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cmd_bad_arguments_and_unsafe_password_file(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                    keypair: tuple[Path, Path]) -> None:
    port = free_port()  # nothing listens: a bad call must fail before any connection
    code, _, err = run(capsys, "cmd", "pi-1", "set", "telemetry_interval", "--broker", f"127.0.0.1:{port}",
                       "--key", str(keypair[0]))
    assert code == 2 and "KEY=VALUE" in err
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    code, _, err = run(capsys, "cmd", "pi-1", "rollback", "--broker", f"127.0.0.1:{port}", "--key",
                       str(keypair[0]), "--username", "u", "--password-file", str(pw))
    assert code == 2 and "chmod 600" in err
    code, _, err = run(capsys, "cmd", "pi-1", "rollback", "--broker", f"127.0.0.1:{port}", "--key",
                       str(keypair[0]), "--tls-cert", str(pw))
    assert code == 2 and "--tls-cert and --tls-key go together" in err


def test_push_refuses_bad_targets_and_missing_bundles(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bundle = tmp_path / "m.edgebundle"
    bundle.write_bytes(b"x" * 100)
    code, out, err = run(capsys, "push", str(bundle), "--to", "ftp://host/x", "--json")
    assert code == 2 and "ftp://host/x" in err and "ssh://" in err
    assert json.loads(out)["error"] == "InputError"
    code, _, err = run(capsys, "push", str(tmp_path / "absent.edgebundle"), "--to", f"dir:{tmp_path}")
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "push", str(bundle), "--to", f"dir:{tmp_path}", "--wait", "-1")
    assert code == 2 and "cannot wait" in err


def test_deploy_checks_targets_before_converting(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                 keypair: tuple[Path, Path]) -> None:
    code, _, err = run(capsys, "deploy", str(tmp_path / "never-read.onnx"), "--profile", "x86-64", "--calib",
                       str(tmp_path), "--key", str(keypair[0]), "--to", "mqtt://broker/devices/pi-1",
                       "--cache-dir", str(tmp_path / "cache"))
    assert code == 2 and "/device/ID or /group/G" in err
    assert not (tmp_path / "cache").exists()  # nothing converted, nothing cached
