"""`edge-agent` end to end: real subprocesses, real bundles, real onnxruntime, a real Mosquitto."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.telemetry.schema import SCHEMA, validate_window
from tests.fixtures_mqtt import broker  # noqa: F401
from tests.models import tiny_mlp
from tests.mosquitto import Collector, Mosquitto, free_port, retained

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).parent / "edge-agent"
AGENT = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "edge_agent.cli"]
RUNTIME = {"engine": "onnxruntime", "providers": ["CPUExecutionProvider"], "threads": 1, "cpu_fallback": True,
           "graph_optimization": "all"}


def make_bundle(out: Path, private_key: Path, *, runtime: dict | None = None, name: str = "mlp",
                fmt: str = "onnx", engine: str = "onnxruntime") -> Path:
    from converters.package import build_bundle

    model = tiny_mlp(out.parent / f"{out.stem}.onnx")
    manifest = {
        "name": name, "version": "1.0.0", "profile": "x86-64", "format": fmt, "engine": engine,
        "model": "model.onnx" if fmt == "onnx" else "model.tflite",
        "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 4], "dtype": "float32"}],
        "runtime": runtime or RUNTIME, "tools": {"edgekit": "0.1.0"},
    }
    member = {"model.onnx": model} if fmt == "onnx" else {"model.tflite": b"TFL3 not a real model"}
    return build_bundle(out, manifest, member, private_key)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> dict[str, Path]:
    from converters.keys import init_keys

    d = tmp_path_factory.mktemp("bundles")
    other_private, _ = init_keys(d / "other-keys")
    private, public = keypair
    return {
        "ok": make_bundle(d / "mlp.edgebundle", private),
        "degraded": make_bundle(d / "gpu.edgebundle", private, runtime={
            **RUNTIME, "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}),
        "litert": make_bundle(d / "lite.edgebundle", private, fmt="tflite", engine="litert",
                              runtime={"engine": "litert", "threads": 1, "cpu_fallback": True}),
        "other_key": make_bundle(d / "foreign.edgebundle", other_private),
        "pub": public,
    }


# The bundles name the x86-64 profile, whose power source is RAPL. Test machines (containers, VMs) rarely
# have RAPL, and a configured source that is absent is an error, so tests that are not about power say
# --power none (tests/test_power_agent.py covers power with fake sysfs trees).
NO_POWER = ("--power", "none")


def agent(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if ("run" in args or "bench" in args) and "--power" not in args:
        args = (*args, *NO_POWER)
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ bench


def test_bench_json(bundles: dict[str, Path]) -> None:
    r = agent("bench", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--warmup", "7",
              "--count", "123", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    for key in ("bundle", "engine", "providers", "providers_requested", "degraded", "threads", "init_ms",
                "first_inference_ms", "warmup", "count", "latency_ms", "throughput_ips", "peak_rss_mb"):
        assert key in out, key
    assert out["bundle"] == {"name": "mlp", "version": "1.0.0", "profile": "x86-64"}
    assert out["count"] == 123 and out["warmup"] == 7  # warm-up not counted
    assert out["engine"] == "onnxruntime" and out["providers"] == ["CPUExecutionProvider"]
    assert out["degraded"] is False and out["threads"] == 1
    lat = out["latency_ms"]
    assert set(lat) == {"p50", "p90", "p95", "p99", "p999", "mean", "std", "max"}
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert out["throughput_ips"] > 0 and out["init_ms"] > 0 and out["peak_rss_mb"] > 0


def test_bench_text_table_and_npy_source(bundles: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((3, 16), np.float32))
    r = agent("bench", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--count", "30",
              "--source", f"npy:{tmp_path / 'x.npy'}")
    assert r.returncode == 0, r.stderr
    assert "latency p99" in r.stdout and "throughput" in r.stdout and "mlp 1.0.0" in r.stdout


def test_bench_degraded_bundle_is_reported(bundles: dict[str, Path]) -> None:
    r = agent("bench", "--bundle", str(bundles["degraded"]), "--pubkey", str(bundles["pub"]), "--count", "10",
              "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["degraded"] is True and "CUDAExecutionProvider" in out["degraded_reason"]
    assert out["providers"] == ["CPUExecutionProvider"]
    assert out["providers_requested"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


# ------------------------------------------------------------------------------------------------ run offline


def test_run_offline_windows(bundles: dict[str, Path]) -> None:
    r = agent("run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--duration", "1.5",
              "--window", "0.3", "--device-id", "bench-box", "--json")
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert len(windows) >= 2
    assert [w["seq"] for w in windows] == list(range(len(windows)))
    for w in windows:
        assert validate_window(w) == [], w
        assert w["count"] > 0 and w["device"] == "bench-box" and w["schema"] == SCHEMA
        assert w["model"]["name"] == "mlp" and len(w["model"]["sha256"]) == 64
        assert w["providers"] == ["CPUExecutionProvider"] and w["degraded"] is False
        assert w["power_w"]["source"] == "none" and w["energy_mj_per_inference"] is None
    assert all(a["ts_end"] <= b["ts_start"] for a, b in itertools.pairwise(windows))


def test_run_text_lines_and_degraded(bundles: dict[str, Path]) -> None:
    r = agent("run", "--bundle", str(bundles["degraded"]), "--pubkey", str(bundles["pub"]), "--duration", "0.5",
              "--window", "0.2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("seq=") and "DEGRADED" in line for line in lines)
    assert "running degraded" in r.stderr and "CUDAExecutionProvider" in r.stderr


def test_seq_continues_after_restart(bundles: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = ["run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--duration", "0.5",
            "--window", "0.2", "--state-dir", str(state), "--json"]
    first = json_lines(agent(*args).stdout)
    second = json_lines(agent(*args).stdout)
    assert first and second
    assert first[0]["seq"] == 0
    assert second[0]["seq"] == first[-1]["seq"] + 1
    assert [w["seq"] for w in second] == list(range(second[0]["seq"], second[0]["seq"] + len(second)))
    assert (state / "seq").read_text().strip() == str(second[-1]["seq"] + 1)
    assert [p.name for p in state.iterdir()] == ["seq"]  # no temp file left behind


def _wait_for_stderr(p: subprocess.Popen[str], text: str) -> None:
    assert p.stderr is not None
    for line in p.stderr:
        if text in line:
            return
    raise AssertionError(f"the agent ended before logging {text!r}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_offline_emits_last_partial_window(bundles: dict[str, Path], sig: int) -> None:
    p = subprocess.Popen([*AGENT, "-v", "run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]),
                          "--window", "600", "--json", *NO_POWER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=ROOT)
    try:
        _wait_for_stderr(p, "edge_agent.agent: running mlp 1.0.0")
        p.send_signal(sig)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    windows = json_lines(out)
    assert len(windows) == 1 and windows[0]["seq"] == 0  # the partial window is emitted, not lost
    assert validate_window(windows[0]) == []
    assert windows[0]["ts_end"] - windows[0]["ts_start"] < 600


def test_run_agent_in_process_reads_injected_thermal_tree(bundles: dict[str, Path], tmp_path: Path) -> None:
    from edge_agent.hardware import DeviceOptions
    from edge_agent.service import run_agent

    for n, (kind, temp) in enumerate([("x86_pkg_temp", "48250"), ("acpitz", "99000")]):
        zone = tmp_path / "sys" / "class" / "thermal" / f"thermal_zone{n}"
        zone.mkdir(parents=True)
        (zone / "type").write_text(f"{kind}\n")
        (zone / "temp").write_text(f"{temp}\n")
    windows: list[dict[str, Any]] = []
    n = run_agent(bundles["ok"], bundles["pub"], duration=0.3, window_s=0.1, device_id="t",
                  on_window=windows.append, hardware=DeviceOptions(power="none", sysfs_root=tmp_path / "sys"))
    assert n == len(windows) >= 1
    # only the x86-64 profile's zone (x86_pkg_temp) is read; 48.25 C is below its throttle_c (95 C)
    assert all(w["temp_c"] == 48.25 and w["throttled"] is False for w in windows)


def test_images_source_end_to_end(keypair: tuple[Path, Path], tmp_path: Path) -> None:
    import cv2

    from converters.package import build_bundle
    from tests.models import tiny_cnn

    model = tiny_cnn(tmp_path / "cnn.onnx")
    manifest = {
        "name": "cnn", "version": "0.2.0", "profile": "x86-64", "format": "onnx", "engine": "onnxruntime",
        "model": "model.onnx", "inputs": [{"name": "image", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": [1, 10], "dtype": "float32"}], "runtime": RUNTIME,
        "tools": {"edgekit": "0.1.0"},
        "preprocessing": {"size": [8, 8], "color": "gray", "layout": "NCHW", "scale": 1 / 255, "mean": [0.5],
                          "std": [0.25]},
    }
    bundle = build_bundle(tmp_path / "cnn.edgebundle", manifest, {"model.onnx": model}, keypair[0])
    (tmp_path / "frames").mkdir()
    for i in range(3):
        cv2.imwrite(str(tmp_path / "frames" / f"{i}.jpg"), np.full((20, 30, 3), 60 * i, np.uint8))
    r = agent("bench", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--source",
              f"images:{tmp_path / 'frames'}", "--count", "20", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["count"] == 20
    r = agent("bench", "--bundle", str(bundle), "--pubkey", str(keypair[1]), "--source",
              f"images:{tmp_path / 'empty'}", "--count", "20")
    assert r.returncode == 2 and "does not exist" in r.stderr


# ------------------------------------------------------------------------------------------------ run with MQTT


@pytest.mark.mqtt
def test_run_mqtt_birth_telemetry_and_clean_offline(bundles: dict[str, Path], broker: Mosquitto) -> None:  # noqa: F811
    sub = Collector(broker.host, broker.port, "edgekit/dev-1/#")
    p = subprocess.Popen([*AGENT, "run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]),
                          "--mqtt", broker.address, "--device-id", "dev-1", "--window", "0.3", "--json",
                          *NO_POWER],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, birth, _ = sub.wait_for(lambda t, m: t == "edgekit/dev-1/status")
        assert birth["state"] == "online" and birth["device"] == "dev-1"
        assert retained(broker.host, broker.port, "edgekit/dev-1/status") == birth  # the birth is retained
        assert birth["model"]["name"] == "mlp" and birth["engine"] == "onnxruntime"
        assert birth["providers"] == ["CPUExecutionProvider"] and birth["degraded"] is False
        assert birth["agent_version"] and birth["profile"] == "x86-64" and birth["ts"] > 0
        received = []
        while len(received) < 2:
            _, w, _ = sub.wait_for(lambda t, m: t == "edgekit/dev-1/telemetry")
            assert validate_window(w) == [], w
            received.append(w)
        assert [w["seq"] for w in received] == [0, 1]
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    printed = json_lines(out)
    # every window the agent emitted reached the broker before it went offline (QoS 1, flushed on close)
    last_seq = printed[-1]["seq"]
    while received[-1]["seq"] < last_seq:
        received.append(sub.wait_for(lambda t, m: t == "edgekit/dev-1/telemetry")[1])
    assert [w["seq"] for w in received] == list(range(last_seq + 1))
    assert sub.qos_seen["edgekit/dev-1/telemetry"] == {1}  # published QoS 1 (the subscription is QoS 1)
    _, status, _ = sub.wait_for(lambda t, m: t == "edgekit/dev-1/status")
    assert status == {"state": "offline", "device": "dev-1"}
    sub.close()
    # a clean shutdown leaves the retained status "offline", never "online"
    assert retained(broker.host, broker.port, "edgekit/dev-1/status") == {"state": "offline", "device": "dev-1"}


@pytest.mark.mqtt
def test_sigkill_triggers_last_will(bundles: dict[str, Path], broker: Mosquitto) -> None:  # noqa: F811
    sub = Collector(broker.host, broker.port, "edgekit/dev-2/status")
    p = subprocess.Popen([*AGENT, "run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]),
                          "--mqtt", broker.address, "--device-id", "dev-2", "--window", "0.3", *NO_POWER],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        _, birth, _ = sub.wait_for(lambda t, m: True)
        assert birth["state"] == "online"
        p.kill()  # SIGKILL: no chance to say goodbye
        p.wait(timeout=30)
        _, will, _ = sub.wait_for(lambda t, m: True)
        assert will == {"state": "offline", "device": "dev-2"}
    finally:
        if p.poll() is None:
            p.kill()
        sub.close()
    assert retained(broker.host, broker.port, "edgekit/dev-2/status") == {"state": "offline", "device": "dev-2"}


def test_broker_not_running_agent_runs_offline(bundles: dict[str, Path]) -> None:
    port = free_port()  # nothing listens there
    r = agent("run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--mqtt",
              f"127.0.0.1:{port}", "--duration", "1.0", "--window", "0.3", "--json")
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert len(windows) >= 2 and all(w["count"] > 0 for w in windows)
    assert f"cannot reach MQTT broker 127.0.0.1:{port}" in r.stderr


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_bundle(bundles: dict[str, Path], tmp_path: Path) -> None:
    r = agent("run", "--bundle", str(tmp_path / "nope.edgebundle"), "--pubkey", str(bundles["pub"]), "--json")
    assert r.returncode == 2
    assert "nope.edgebundle" in r.stderr
    assert json.loads(r.stdout)["error"] == "BundleError"


def test_bundle_signed_with_another_key(bundles: dict[str, Path]) -> None:
    r = agent("bench", "--bundle", str(bundles["other_key"]), "--pubkey", str(bundles["pub"]), "--json")
    assert r.returncode == 2
    err = json.loads(r.stdout)
    assert err["error"] == "BundleError" and err["reason"] == "bad_signature"
    assert "signed by another key" in r.stderr and "hint:" in r.stderr


def test_no_pubkey_anywhere(bundles: dict[str, Path], tmp_path: Path) -> None:
    if Path("/etc/edge-agent/trusted.pub").exists():
        pytest.skip("this machine has /etc/edge-agent/trusted.pub")
    r = agent("run", "--bundle", str(bundles["ok"]), "--duration", "0.2", env={"HOME": str(tmp_path)})
    assert r.returncode == 2
    assert "--pubkey" in r.stderr and "no public key" in r.stderr


@pytest.mark.parametrize("value", ["localhost:abc", "host:0", ":1883", "a b:1", "h:1:2"])
def test_bad_mqtt_value(bundles: dict[str, Path], value: str) -> None:
    r = agent("run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--mqtt", value,
              "--duration", "0.2")
    assert r.returncode == 2
    assert "--mqtt" in r.stderr


def test_unknown_source_kind(bundles: dict[str, Path]) -> None:
    r = agent("run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--source", "radio:0",
              "--duration", "0.2")
    assert r.returncode == 2
    assert "synthetic, npy:PATH, images:DIR" in r.stderr


def test_npy_of_wrong_shape(bundles: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3), np.float32))
    r = agent("run", "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), "--source",
              f"npy:{tmp_path / 'wrong.npy'}", "--duration", "0.2", "--json")
    assert r.returncode == 2
    assert "wrong.npy" in r.stderr and "(2, 3)" in r.stderr and "(1, 16)" in r.stderr
    assert json.loads(r.stdout)["error"] == "SourceError"


def test_litert_bundle_with_a_corrupt_model(bundles: dict[str, Path]) -> None:
    r = agent("bench", "--bundle", str(bundles["litert"]), "--pubkey", str(bundles["pub"]))
    assert r.returncode == 2
    assert "cannot load the model model.tflite" in r.stderr


def test_argparse_errors_and_version() -> None:
    r = agent("run", env={"HOME": "/nonexistent"})  # the store needs the host's public key: none here
    assert r.returncode == 2 and "no public key" in r.stderr
    assert agent("frobnicate").returncode == 2
    r = agent("--version")
    assert r.returncode == 0 and r.stdout.startswith("edge-agent 0.1.0")


@pytest.mark.parametrize("cmd, args", [("run", ["--window", "0"]), ("run", ["--duration", "-1"]),
                                       ("run", ["--threads", "0"]), ("bench", ["--count", "0"]),
                                       ("bench", ["--warmup", "-1"]),
                                       ("run", ["--device-id", "a/b", "--mqtt", "h:1"])])
def test_bad_numbers_and_ids(bundles: dict[str, Path], cmd: str, args: list[str]) -> None:
    r = agent(cmd, "--bundle", str(bundles["ok"]), "--pubkey", str(bundles["pub"]), *args)
    assert r.returncode == 2, r.stderr
    assert "error:" in r.stderr and "Traceback" not in r.stderr


def test_resolve_pubkey_order(tmp_path: Path) -> None:
    from edge_agent.errors import KeyFileError
    from edge_agent.service import resolve_pubkey

    system, user = tmp_path / "etc" / "trusted.pub", tmp_path / "home" / "edgekit-signing.pub"
    with pytest.raises(KeyFileError, match="--pubkey"):
        resolve_pubkey(None, candidates=(system, user))
    user.parent.mkdir()
    user.write_text("key")
    assert resolve_pubkey(None, candidates=(system, user)) == user
    system.parent.mkdir()
    system.write_text("key")
    assert resolve_pubkey(None, candidates=(system, user)) == system
    assert resolve_pubkey(user, candidates=(system,)) == user  # explicit wins
    with pytest.raises(KeyFileError, match="does not exist"):
        resolve_pubkey(tmp_path / "nope.pub", candidates=(system,))


def test_seq_file_roundtrip_and_corruption(tmp_path: Path) -> None:
    from edge_agent.errors import InputError
    from edge_agent.service import load_seq, save_seq

    assert load_seq(None) == 0 and load_seq(tmp_path) == 0
    save_seq(tmp_path, 41)
    assert load_seq(tmp_path) == 41
    (tmp_path / "seq").write_text("forty-two")
    with pytest.raises(InputError, match="delete the file"):
        load_seq(tmp_path)


def test_agent_import_is_light() -> None:
    code = (
        "import sys, edge_agent.cli, edge_agent.service, edge_agent.benchmark, edge_agent.sources\n"
        "import edge_agent.bundle, edge_agent.backends, edge_agent.telemetry.mqtt\n"
        "heavy = [m for m in ('onnx', 'onnxruntime', 'cv2', 'rich', 'tensorflow', 'converters', 'matplotlib')\n"
        "         if m in sys.modules]\n"
        "print(heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "[]"
