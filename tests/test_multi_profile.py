"""`edgekit convert --profile a,b`: one conversion per profile in spawned worker processes, a summary at the end.

Real worker processes (the ``spawn`` method), real conversions of a tiny ONNX MLP; the onnx2tf profile of the
mixed run fails fast (offline, its tool environment is missing) while the other one converts.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from converters.cli import main
from converters.multi import ProfileResult, exit_code, workers_for
from edge_agent.bundle import verify_bundle
from edge_agent.errors import InputError
from tests.models import tiny_mlp

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("multi")
    model = tiny_mlp(d / "mlp.onnx", in_features=16, classes=4)
    np.save(d / "calib.npy", np.random.default_rng(1).normal(size=(80, 1, 16)).astype(np.float32))
    return model, d / "calib.npy"


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict], str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out), err


def test_two_onnx_profiles_give_two_bundles_and_a_json_summary(mlp: tuple[Path, Path], tmp_path: Path,
                                                                keypair: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    # a user profile next to a shipped one
    text = (ROOT / "device_profiles" / "x86-64.toml").read_text().replace('name = "x86-64"', 'name = "my-box"')
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "my-box.toml").write_text(text)
    code, rows, err = _run(capsys, "convert", str(mlp[0]), "--profile", "x86-64,my-box", "--profiles-dir",
                           str(tmp_path / "profiles"), "--calib", str(mlp[1]), "--out", str(tmp_path / "out"),
                           "--key", str(keypair[0]), "--gate-agreement", "0.9", "--json")
    assert code == 0, err
    assert [r["profile"] for r in rows] == ["x86-64", "my-box"]
    for r in rows:
        assert r["status"] == "ok" and r["exit_code"] == 0 and r["error"] is None
        bundle = Path(r["bundle"])
        assert bundle.name == f"mlp-1.0.0-{r['profile']}.edgebundle"
        assert verify_bundle(bundle, keypair[1]).manifest.profile == r["profile"]
        assert Path(r["plot"]) == bundle.with_suffix(".png") and Path(r["plot"]).is_file()
        assert 0.0 <= r["validation"]["top1_agreement"] <= 1.0 and r["validation"]["quant_p50_ms"] > 0
        assert r["threads"] >= 1
    assert "[convert x86-64] inspect" in err and "[convert my-box] package" in err


def test_one_bad_profile_does_not_stop_the_other(mlp: tuple[Path, Path], tmp_path: Path,
                                                 keypair: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, rows, _ = _run(capsys, "convert", str(mlp[0]), "--profile", "rpi5,x86-64", "--calib", str(mlp[1]),
                         "--out", str(tmp_path / "out"), "--key", str(keypair[0]), "--offline", "--onnx2tf-env",
                         str(tmp_path / "no-env"), "--gate-agreement", "0.9", "--no-plot", "--jobs", "2", "--json")
    assert code == 2  # a bad input in one profile
    rpi5, x86 = rows
    assert rpi5["status"] == "failed" and rpi5["exit_code"] == 2 and rpi5["bundle"] is None
    assert rpi5["error"]["error"] == "InputError" and "cannot be built offline" in rpi5["error"]["message"]
    assert x86["status"] == "ok" and Path(x86["bundle"]).is_file() and x86["plot"] is None
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mlp-1.0.0-x86-64.edgebundle"]


def test_summary_table_names_every_profile(mlp: tuple[Path, Path], tmp_path: Path, keypair: tuple[Path, Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert", str(mlp[0]), "--profile", "x86-64,rpi4", "--calib", str(mlp[1]), "--out",
                 str(tmp_path / "out"), "--key", str(keypair[0]), "--offline", "--onnx2tf-env",
                 str(tmp_path / "no-env"), "--gate-agreement", "0.9", "--no-plot"])
    out = capsys.readouterr().out
    assert code == 2
    assert "x86-64" in out and "rpi4" in out and "ok" in out and "failed" in out
    assert "rpi4: InputError:" in out and "hint:" in out


def test_unknown_profile_fails_before_any_work(mlp: tuple[Path, Path], tmp_path: Path, keypair: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert", str(mlp[0]), "--profile", "x86-64,nope", "--calib", str(mlp[1]), "--out",
                 str(tmp_path / "out"), "--key", str(keypair[0]), "--json"])
    assert code == 2
    assert json.loads(capsys.readouterr().out)["error"] == "ProfileError"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_exit_code_and_workers() -> None:
    def row(code: int) -> ProfileResult:
        return ProfileResult("p", "ok" if code == 0 else "failed", code, 0.0)

    assert exit_code([row(0), row(0)]) == 0
    assert exit_code([row(0), row(1)]) == 1
    assert exit_code([row(1), row(2), row(0)]) == 2
    assert workers_for(3, None) == min(3, os.cpu_count() or 1)
    assert workers_for(3, 1) == 1
    with pytest.raises(InputError, match="--jobs"):
        workers_for(3, 0)


def test_the_console_script_runs_workers(mlp: tuple[Path, Path], tmp_path: Path,
                                         keypair: tuple[Path, Path]) -> None:
    """The installed `edgekit` entry point as the parent: spawn re-imports it in each worker."""
    import subprocess
    import sys

    exe = shutil.which("edgekit", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the edgekit console script is not installed in this environment")
    r = subprocess.run([exe, "convert", str(mlp[0]), "--profile", "x86-64,jetson-orin-nano", "--calib",
                        str(mlp[1]), "--out", str(tmp_path / "out"), "--key", str(keypair[0]),
                        "--gate-agreement", "0.9", "--no-plot", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)  # stdout holds only the JSON, whatever the workers printed
    assert [x["status"] for x in rows] == ["ok", "ok"]
