"""The `edgekit` command line: profiles, keys, bundle inspect/verify, convert — exit codes and JSON."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from converters.cli import main
from tests.models import tiny_mlp

SHIPPED = {"rpi4", "rpi5", "coral-usb", "coral-devboard", "jetson-nano", "jetson-orin-nano", "x86-64"}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_profiles_list_json_has_every_shipped_profile(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "profiles", "list", "--json")
    assert code == 0
    rows = json.loads(out)
    assert SHIPPED <= {r["name"] for r in rows}
    x86 = next(r for r in rows if r["name"] == "x86-64")
    assert x86["engine"] == "onnxruntime" and x86["format"] == "onnx"


def test_profiles_show_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "profiles", "show", "rpi5", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["runtime"]["delegates"] == ["xnnpack"]
    assert data["power"]["source"] == "pmic"
    assert data["file"].endswith("rpi5.toml")


def test_profiles_show_table(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "profiles", "show", "coral-usb")
    assert code == 0
    assert "edgetpu" in out


def test_profiles_show_unknown_is_exit_2_with_json_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "profiles", "show", "nope", "--json")
    assert code == 2
    assert json.loads(out)["error"] == "ProfileError"
    assert "unknown profile 'nope'" in err and "rpi5" in err


def test_profiles_dir_adds_a_user_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(__file__).resolve().parent.parent / "device_profiles" / "x86-64.toml"
    text = src.read_text().replace('name = "x86-64"', 'name = "my-box"').replace("cores = 4", "cores = 2")
    (tmp_path / "my-box.toml").write_text(text)
    code, out, _ = run_cli(capsys, "profiles", "show", "my-box", "--profiles-dir", str(tmp_path), "--json")
    assert code == 0
    assert json.loads(out)["device"]["cores"] == 2


def test_invalid_user_profile_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = Path(__file__).resolve().parent.parent / "device_profiles" / "x86-64.toml"
    (tmp_path / "bad.toml").write_text(src.read_text().replace('name = "x86-64"', 'name = "bad"')
                                       .replace("threads = 4", "threads = 4\nturbo = true"))
    code, _, err = run_cli(capsys, "profiles", "show", "bad", "--profiles-dir", str(tmp_path))
    assert code == 2
    assert "runtime.turbo" in err and "bad.toml" in err and "allowed keys" in err


def test_keys_init_mode_and_refuses_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "keys", "init", "--dir", str(tmp_path / "k"), "--json")
    assert code == 0
    info = json.loads(out)
    assert stat.S_IMODE(os.stat(info["private_key"]).st_mode) == 0o600
    assert info["fingerprint"].startswith("SHA256:")
    before = Path(info["private_key"]).read_bytes()
    code, _, err = run_cli(capsys, "keys", "init", "--dir", str(tmp_path / "k"))
    assert code == 2
    assert "exist" in err
    assert Path(info["private_key"]).read_bytes() == before


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> Path:
    d = tmp_path_factory.mktemp("cli_convert")
    model = tiny_mlp(d / "mlp.onnx", in_features=16, classes=4)
    rng = np.random.default_rng(1)
    np.save(d / "calib.npy", rng.normal(size=(60, 1, 16)).astype(np.float32))
    code = main(["convert", str(model), "--profile", "x86-64", "--calib", str(d / "calib.npy"),
                 "--out", str(d / "out"), "--key", str(keypair[0]), "--name", "mlp", "--version", "0.3.1",
                 "--threads", "1", "--json"])
    assert code == 0
    bundle = d / "out" / "mlp-0.3.1-x86-64.edgebundle"
    assert bundle.is_file()
    return bundle


def test_convert_json_summary(tmp_path: Path, keypair: tuple[Path, Path],
                              capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_mlp(tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", np.random.default_rng(2).normal(size=(40, 16)).astype(np.float32))
    code, out, _ = run_cli(capsys, "convert", str(model), "--profile", "x86-64", "--calib",
                           str(tmp_path / "c.npy"), "--out", str(tmp_path / "o"), "--key", str(keypair[0]),
                           "--threads", "1", "--json")
    assert code == 0
    summary = json.loads(out)
    assert Path(summary["bundle"]).is_file()
    v = summary["validation"]
    assert 0.0 <= v["top1_agreement"] <= 1.0
    assert v["quant_size_bytes"] > 0 and v["fp32_size_bytes"] > 0


def test_bundle_inspect_and_verify(small_bundle: Path, keypair: tuple[Path, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "bundle", "inspect", str(small_bundle), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["manifest"]["version"] == "0.3.1" and info["signed"] and info["hashes_ok"]
    code, out, _ = run_cli(capsys, "bundle", "verify", str(small_bundle), "--pubkey", str(keypair[1]), "--json")
    assert code == 0
    assert json.loads(out)["ok"] is True
    code, out, _ = run_cli(capsys, "bundle", "inspect", str(small_bundle))
    assert code == 0 and "mlp 0.3.1" in out


def test_bundle_verify_with_another_key_is_exit_2(small_bundle: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from converters.keys import init_keys

    _, other_pub = init_keys(tmp_path / "other")
    code, out, err = run_cli(capsys, "bundle", "verify", str(small_bundle), "--pubkey", str(other_pub), "--json")
    assert code == 2
    assert json.loads(out)["reason"] == "bad_signature"
    assert "signature" in err


def test_bundle_verify_truncated_is_exit_2(small_bundle: Path, tmp_path: Path, keypair: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "cut.edgebundle"
    data = small_bundle.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    code, out, _err = run_cli(capsys, "bundle", "verify", str(cut), "--pubkey", str(keypair[1]), "--json")
    assert code == 2
    assert json.loads(out)["reason"] == "truncated"


@pytest.mark.parametrize(
    ("case", "reason_words"),
    [
        ("missing_model", "does not exist"),
        ("not_onnx", "not an ONNX model"),
        ("empty_calib", "calib"),
        ("wrong_shape", "shape"),
        ("unknown_profile", "unknown profile"),
        ("tflite_profile", "onnx2tf"),
        ("no_key", "signing key"),
    ],
)
def test_convert_bad_inputs_exit_2(case: str, reason_words: str, tmp_path: Path, keypair: tuple[Path, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_mlp(tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(8):
        np.save(calib / f"{i}.npy", np.zeros((1, 16), np.float32) + i)
    profile, key = "x86-64", str(keypair[0])
    if case == "missing_model":
        model = tmp_path / "absent.onnx"
    elif case == "not_onnx":
        model = tmp_path / "junk.onnx"
        model.write_bytes(os.urandom(300))
    elif case == "empty_calib":
        calib = tmp_path / "empty"
        calib.mkdir()
    elif case == "wrong_shape":
        for f in calib.iterdir():
            np.save(f, np.zeros((3, 3), np.float32))
    elif case == "unknown_profile":
        profile = "no-such-board"
    elif case == "tflite_profile":
        profile = "rpi5"
    elif case == "no_key":
        key = str(tmp_path / "missing.key")
    extra = ["--offline", "--onnx2tf-env", str(tmp_path / "no-env")] if case == "tflite_profile" else []
    code, out, err = run_cli(capsys, "convert", str(model), "--profile", profile, "--calib", str(calib),
                             "--out", str(tmp_path / "out"), "--key", key, "--json", *extra)
    assert code == 2, err
    assert reason_words.lower() in err.lower()
    assert "error" in json.loads(out)
    assert not list((tmp_path / "out").glob("*.edgebundle")), "no bundle may be written on bad input"


def test_console_script_help_and_usage_error() -> None:
    exe = Path(sys.executable).parent / "edgekit"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "converters.cli"]
    r = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    for command in ("profiles", "keys", "bundle", "convert", "tools", "monitor", "report"):
        assert command in r.stdout
    r = subprocess.run([*cmd, "convert"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "required" in r.stderr
