"""Power, energy, thermal and throttling wired into `edge-agent run` / `bench` / `calibrate-idle`: real
subprocesses and real signed bundles, with the board played by a fake sysfs tree (hwmon INA219, thermal
zones, cpufreq) under --sysfs-root, a fake vcgencmd / nvpmodel, and a UM25C meter behind a real pty.

No timing thresholds: a fake sensor gives a constant power, so the figures are checked exactly."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from edge_agent.errors import InputError, SourceError
from edge_agent.hardware import (
    IDLE_FILE,
    IDLE_KEYS,
    DeviceOptions,
    IdleBaseline,
    load_idle,
    parse_idle,
    power_std_w,
    read_idle,
    resolve_device,
    save_idle,
)
from edge_agent.telemetry.schema import OPTIONAL_FIELDS, build_window, validate_window
from tests.fakes_sysfs import hwmon_chip, write
from tests.test_agent_cli import AGENT, NO_POWER, ROOT, RUNTIME, json_lines, make_bundle
from tests.test_throttle import NVPMODEL_Q, THROTTLED_UV, cpufreq_tree, fake_command, fake_vcgencmd, thermal

BOARD = "test-board"
WATTS = 4.2  # the fake INA219's power1_input, 4 200 000 µW


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    """``edge-agent ARGS`` exactly as given (test_agent_cli's helper adds --power none)."""
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ))


def board_profile(folder: Path, name: str = BOARD, *, source: str = "hwmon:ina219", sample_hz: float = 50,
                  serial_port: str = "") -> Path:
    """A valid profile (the shipped x86-64 one with another name, power and thermal sections)."""
    from edge_agent.profiles import builtin_profiles_dir

    text = (builtin_profiles_dir() / "x86-64.toml").read_text()
    head, _, _ = text.partition("[power]")
    head = head.replace('name = "x86-64"', f'name = "{name}"')
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(head + f'[power]\nsource = "{source}"\nsample_hz = {sample_hz}\n'
                    f'serial_port = "{serial_port}"\n\n[thermal]\nzones = ["cpu-thermal"]\nthrottle_c = 70.0\n')
    return path


def board_sysfs(root: Path, watts: float = WATTS) -> Path:
    """/sys of the test board: an INA219 on hwmon1, two thermal zones, cpufreq on two cores."""
    hwmon_chip(root, 0, "acpitz", {"temp1_input": 27800})
    hwmon_chip(root, 1, "ina219", {"power1_input": round(watts * 1e6), "in1_input": 5000, "curr1_input": 840})
    thermal(root, {"cpu-thermal": 51_000, "gpu-thermal": 99_000})  # gpu-thermal is not one of the profile's
    cpufreq_tree(root, {0: (1_200_000, 1_800_000), 1: (1_200_000, 1_800_000)})
    return root


def set_watts(root: Path, watts: float) -> None:
    write(root / "class" / "hwmon" / "hwmon1" / "power1_input", round(watts * 1e6))


@pytest.fixture(scope="module")
def board_bundles(tmp_path_factory: pytest.TempPathFactory, keypair: tuple[Path, Path]) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("power-bundles")
    private, public = keypair
    return {"board": _bundle(d / "board.edgebundle", private, BOARD),
            "x86": make_bundle(d / "x86.edgebundle", private),
            "unknown": _bundle(d / "unknown.edgebundle", private, "nowhere-board"),
            "pub": public}


def _bundle(out: Path, private: Path, profile: str) -> Path:
    from converters.package import build_bundle
    from tests.models import tiny_mlp

    manifest = {"name": "mlp", "version": "1.0.0", "profile": profile, "format": "onnx", "engine": "onnxruntime",
                "model": "model.onnx", "inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}],
                "outputs": [{"name": "logits", "shape": [1, 4], "dtype": "float32"}], "runtime": RUNTIME,
                "tools": {"edgekit": "0.1.0"}}
    return build_bundle(out, manifest, {"model.onnx": tiny_mlp(out.with_suffix(".onnx"))}, private)


@pytest.fixture
def board(tmp_path: Path) -> dict[str, Path]:
    profiles = tmp_path / "profiles"
    board_profile(profiles)
    return {"profiles": profiles, "sys": board_sysfs(tmp_path / "sys"), "state": tmp_path / "state"}


def on_board(board_bundles: dict[str, Path], board: dict[str, Path], cmd: str, *args: str,
             bundle: str = "board") -> list[str]:
    return [cmd, "--bundle", str(board_bundles[bundle]), "--pubkey", str(board_bundles["pub"]),
            "--profiles-dir", str(board["profiles"]), "--sysfs-root", str(board["sys"]), *args]


def powered(windows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [w for w in windows if w["power_w"]["mean"] is not None and w["count"] > 0]


# ------------------------------------------------------------------------------------------------ run


def test_run_windows_carry_power_energy_temperature_and_mhz(board_bundles: dict[str, Path],
                                                             board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "run", "--duration", "0.8", "--window", "0.2", "--json"))
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert windows and all(validate_window(w) == [] for w in windows)
    assert all(w["power_w"]["source"] == "hwmon:ina219" and w["power_w"]["idle"] is None for w in windows)
    with_power = powered(windows)
    assert with_power, windows  # 50 Hz sampling: windows of 0.2 s hold about 10 samples
    for w in with_power:
        assert w["power_w"]["mean"] == pytest.approx(WATTS)
        want = WATTS * (w["ts_end"] - w["ts_start"]) / w["count"] * 1000  # the board's whole energy
        assert w["energy_mj_per_inference"] == pytest.approx(want, rel=1e-3)
        assert w["energy_mj_per_inference"] > 0
    for w in windows:
        assert w["temp_c"] == 51.0  # cpu-thermal only: the profile's zones
        assert w["throttled"] is False  # 51 C < throttle_c 70 C, and no vcgencmd
        assert w["cpu_mhz"] == 1200.0
    assert "power: hwmon:ina219 at 50 Hz" not in r.stderr  # info-level lines stay quiet without -v


def test_run_throttled_when_a_profile_zone_is_hot(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    write(board["sys"] / "class" / "thermal" / "thermal_zone0" / "temp", 71_500)
    r = agent(*on_board(board_bundles, board, "run", "--duration", "0.3", "--window", "0.1", "--json"))
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert windows and all(w["throttled"] is True and w["temp_c"] == 71.5 for w in windows)
    assert "cpu-thermal at 71.5 C >= 70 C" in r.stderr


def test_run_with_a_pty_meter_in_process(board: dict[str, Path], board_bundles: dict[str, Path]) -> None:
    from edge_agent.service import run_agent
    from tests.test_power_serial import UM25C, PtyMeter

    meter = PtyMeter(UM25C)  # 6.324 W
    try:
        profile = board_profile(board["profiles"], "meter-board", source="serial:um25c", sample_hz=20,
                                serial_port=meter.port)
        windows: list[dict[str, Any]] = []
        before = {t.name for t in threading.enumerate()}
        run_agent(board_bundles["board"], board_bundles["pub"], duration=0.6, window_s=0.3, device_id="t",
                  on_window=windows.append, hardware=DeviceOptions(profile=str(profile), sysfs_root=board["sys"]))
        assert {t.name for t in threading.enumerate()} - before == set()  # the sampler thread is gone
    finally:
        meter.close()
    assert windows and all(w["power_w"]["source"] == "serial:um25c" for w in windows)
    assert powered(windows) and all(w["power_w"]["mean"] == pytest.approx(6.324) for w in powered(windows))
    assert meter.requests.count(b"\xf0") >= 2  # the meter was asked: once at open, then by the sampler


# ------------------------------------------------------------------------------------------------ idle baseline


def test_calibrate_idle_then_run_subtracts_it(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    r = agent("calibrate-idle", "--profile", str(board["profiles"] / f"{BOARD}.toml"), "--sysfs-root",
              str(board["sys"]), "--state-dir", str(board["state"]), "--duration", "0.3", "--settle", "0",
              "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    stored = json.loads((board["state"] / IDLE_FILE).read_text())
    assert set(stored) == set(IDLE_KEYS)
    assert {k: out[k] for k in IDLE_KEYS} == stored and out["path"] == str(board["state"] / IDLE_FILE)
    assert stored["source"] == "hwmon:ina219" and stored["mean_w"] == pytest.approx(WATTS)
    assert stored["std_w"] == 0.0 and stored["samples"] >= 2 and stored["duration_s"] >= 0.3
    assert sorted(p.name for p in board["state"].iterdir()) == [IDLE_FILE]  # no temp file left

    set_watts(board["sys"], 5.0)  # the model now draws 0.8 W above idle
    r = agent(*on_board(board_bundles, board, "run", "--duration", "0.6", "--window", "0.2", "--json",
                        "--state-dir", str(board["state"])))
    assert r.returncode == 0, r.stderr
    with_power = powered(json_lines(r.stdout))
    assert with_power
    for w in with_power:
        assert w["power_w"] == {"mean": pytest.approx(5.0), "idle": pytest.approx(WATTS), "source": "hwmon:ina219"}
        want = (5.0 - WATTS) * (w["ts_end"] - w["ts_start"]) / w["count"] * 1000
        assert w["energy_mj_per_inference"] == pytest.approx(want, rel=1e-3)

    r = agent(*on_board(board_bundles, board, "bench", "--count", "50", "--json", "--state-dir",
                        str(board["state"])))
    assert r.returncode == 0, r.stderr
    power = json.loads(r.stdout)["power"]
    assert power["idle_w"] == pytest.approx(WATTS) and power["mean_w"] == pytest.approx(5.0)
    assert power["energy_mj_per_inference"] > 0


def test_idle_of_another_source_is_not_used(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    save_idle(board["state"], IdleBaseline(3.0, 0.1, 20, "rapl", 1.8e9, 10.0))
    r = agent(*on_board(board_bundles, board, "run", "--duration", "0.3", "--window", "0.1", "--json",
                        "--state-dir", str(board["state"])))
    assert r.returncode == 0, r.stderr
    windows = json_lines(r.stdout)
    assert windows and all(w["power_w"]["idle"] is None for w in windows)
    assert "measured with power source 'rapl', this run measures 'hwmon:ina219': not used" in r.stderr


def test_calibrate_idle_needs_a_source(board: dict[str, Path], tmp_path: Path) -> None:
    r = agent("calibrate-idle", "--state-dir", str(tmp_path / "s"), "--duration", "0.1", "--settle", "0")
    assert r.returncode == 2 and "pass --profile NAME|PATH or --power SPEC" in r.stderr
    r = agent("calibrate-idle", "--state-dir", str(tmp_path / "s"), "--profile", "rpi4", "--duration", "0.1")
    assert r.returncode == 2 and "calibrate-idle needs a power source" in r.stderr  # rpi4: source = "none"
    r = agent("calibrate-idle", "--state-dir", str(tmp_path / "s"), "--power", "rapl", "--sysfs-root",
              str(board["sys"]), "--duration", "0.1", "--settle", "0", "--json")
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "SourceError"
    assert not (tmp_path / "s" / IDLE_FILE).exists()


def test_calibrate_idle_with_power_override_and_text_output(board: dict[str, Path]) -> None:
    r = agent("calibrate-idle", "--power", "hwmon:ina219", "--sysfs-root", str(board["sys"]), "--state-dir",
              str(board["state"]), "--duration", "0.2", "--settle", "0")
    assert r.returncode == 0, r.stderr
    assert "idle power 4.2000 W" in r.stdout and "hwmon:ina219" in r.stdout and "keep the board idle" in r.stderr
    assert read_idle(board["state"]) is not None


# ------------------------------------------------------------------------------------- absent / none / profiles


def test_absent_configured_source_is_exit_2(board_bundles: dict[str, Path], board: dict[str, Path],
                                            tmp_path: Path) -> None:
    empty = tmp_path / "empty-sys"
    empty.mkdir()
    r = agent("run", "--bundle", str(board_bundles["x86"]), "--pubkey", str(board_bundles["pub"]), "--sysfs-root",
              str(empty), "--duration", "0.2", "--json", "--power", "rapl")
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == "SourceError"
    assert f"no RAPL package zone; looked for: {empty}/class/powercap/intel-rapl:0/energy_uj" in r.stderr
    assert "firmware_notes/x86-64.md#power-measurement" in r.stderr and "--power none" in r.stderr
    write(board["sys"] / "class" / "hwmon" / "hwmon1" / "name", "ina226")  # the board's chip is not there
    r = agent(*on_board(board_bundles, board, "run", "--duration", "0.2"))
    assert r.returncode == 2 and "no hwmon chip named 'ina219'" in r.stderr and "hwmon1='ina226'" in r.stderr


def test_x86_profile_on_a_machine_without_rapl(board_bundles: dict[str, Path], tmp_path: Path) -> None:
    r = agent("bench", "--bundle", str(board_bundles["x86"]), "--pubkey", str(board_bundles["pub"]),
              "--sysfs-root", str(tmp_path), "--count", "5", "--json")
    assert r.returncode == 2 and "power source 'rapl'" in r.stderr  # the x86-64 profile's source
    assert json.loads(r.stdout)["error"] == "SourceError"


def test_power_none_runs_with_null_power(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "bench", "--count", "20", "--json", *NO_POWER))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["power"] is None and out["device"]["power_source"] == "none"
    assert out["temp_c_start"] == 51.0  # thermal still read


def test_bundle_profile_not_found_runs_without_and_says_so(board_bundles: dict[str, Path],
                                                            board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "bench", "--count", "20", "--json", bundle="unknown"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    dev = out["device"]
    assert dev["profile"] is None and "'nowhere-board' is not among the profiles found" in dev["profile_note"]
    assert out["power"] is None and dev["throttle_c"] is None
    assert dev["thermal_zones"] == ["cpu-thermal", "gpu-thermal"]  # no profile: every zone
    assert out["temp_c_start"] == 99.0 and out["throttled_seen"] is None  # no throttle temperature to judge by
    assert "not among the profiles found" in r.stderr  # in the log too (a warning)
    r = agent(*on_board(board_bundles, board, "bench", "--count", "20", "--json", "--power", "hwmon:ina219",
                        bundle="unknown"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["power"]["mean_w"] == pytest.approx(WATTS)


def test_explicit_profile_that_does_not_exist_is_exit_2(board_bundles: dict[str, Path],
                                                        board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "run", "--profile", "no-such-board", "--duration", "0.2"))
    assert r.returncode == 2 and "unknown profile 'no-such-board'" in r.stderr


def test_power_port_needs_a_serial_source(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "run", "--power-port", "/dev/ttyUSB0", "--duration", "0.2"))
    assert r.returncode == 2 and "--power-port is for serial meters" in r.stderr
    r = agent(*on_board(board_bundles, board, "run", "--power", "serial:um99", "--duration", "0.2"))
    assert r.returncode == 2 and "unknown power source 'serial:um99'" in r.stderr


# ------------------------------------------------------------------------------------------------ bench


BENCH_KEYS = {"power", "temp_c_start", "temp_c_end", "throttled_seen", "throttle_reasons", "cpu_mhz_start",
              "cpu_mhz_end", "device", "stop_rule", "wall_s", "get_throttled"}


def test_bench_json_power_thermal_and_mhz(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "bench", "--count", "100", "--json"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert BENCH_KEYS <= set(out)
    power = out["power"]
    assert {"source", "mean_w", "idle_w", "energy_mj_per_inference"} <= set(power)
    assert power["source"] == "hwmon:ina219" and power["mean_w"] == pytest.approx(WATTS)
    assert power["idle_w"] is None and power["samples"] >= 1
    assert power["energy_mj_per_inference"] == pytest.approx(WATTS * out["wall_s"] / 100 * 1000, rel=1e-3)
    assert out["temp_c_start"] == out["temp_c_end"] == 51.0
    assert out["cpu_mhz_start"] == out["cpu_mhz_end"] == 1200.0
    assert out["throttled_seen"] is False and out["throttle_reasons"] == []
    assert out["get_throttled"] is None  # no vcgencmd here
    dev = out["device"]
    assert dev["profile"] == BOARD and dev["profile_file"] == str(board["profiles"] / f"{BOARD}.toml")
    assert dev["thermal_zones"] == ["cpu-thermal"] and dev["throttle_c"] == 70.0 and dev["sample_hz"] == 50


def test_bench_text_table_shows_the_device_rows(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "bench", "--count", "30"))
    assert r.returncode == 0, r.stderr
    assert "4.200 W mean (hwmon:ina219" in r.stdout
    for row in ("device profile", "energy/inference", "idle power", "temperature", "51.0 C -> 51.0 C",
                "cpu frequency", "1200 MHz -> 1200 MHz", "throttled"):
        assert row in r.stdout, row


def test_bench_throttled_seen_through_a_fake_vcgencmd_and_jetson_power_mode(
        board_bundles: dict[str, Path], board: dict[str, Path], tmp_path: Path) -> None:
    vcgencmd, _ = fake_vcgencmd(tmp_path, THROTTLED_UV)
    (tmp_path / "q.txt").write_text(NVPMODEL_Q)
    nvpmodel = fake_command(tmp_path / "bin", "nvpmodel", "-q", tmp_path / "q.txt")
    r = agent(*on_board(board_bundles, board, "bench", "--count", "20", "--json", "--vcgencmd", str(vcgencmd),
                        "--nvpmodel", str(nvpmodel)))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["throttled_seen"] is True
    assert "under_voltage (get_throttled)" in out["throttle_reasons"]
    assert out["get_throttled"] == {"value": "0x50005", "now": ["under_voltage", "throttled"],
                                    "occurred": ["under_voltage", "throttled"]}
    assert out["device"]["power_mode"] == {"name": "MAXN", "id": 0} and out["device"]["get_throttled"] is True
    r = agent(*on_board(board_bundles, board, "run", "--duration", "0.2", "--window", "0.1", "--json",
                        "--vcgencmd", str(vcgencmd)))
    assert r.returncode == 0, r.stderr
    assert all(w["throttled"] is True for w in json_lines(r.stdout))


def test_bench_count_is_exact(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "bench", "--count", "37", "--json", *NO_POWER))
    out = json.loads(r.stdout)
    assert out["count"] == 37 and out["stop_rule"] == {"count": 37}
    r = agent(*on_board(board_bundles, board, "bench", "--json", *NO_POWER))
    out = json.loads(r.stdout)
    assert out["count"] == 500 and out["stop_rule"] == {"count": 500}  # the default


def test_bench_min_count_and_duration_both_hold(board_bundles: dict[str, Path], board: dict[str, Path]) -> None:
    r = agent(*on_board(board_bundles, board, "bench", "--min-count", "3000", "--duration", "0.05", "--json",
                        *NO_POWER))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["count"] >= 3000 and out["wall_s"] >= 0.05
    assert out["stop_rule"] == {"min_count": 3000, "duration_s": 0.05}
    r = agent(*on_board(board_bundles, board, "bench", "--duration", "0.2", "--min-count", "1", "--json",
                        *NO_POWER))
    out = json.loads(r.stdout)
    assert out["wall_s"] >= 0.2 and out["count"] >= 1
    r = agent(*on_board(board_bundles, board, "bench", "--duration", "0.1", "--json", *NO_POWER))
    out = json.loads(r.stdout)
    assert out["wall_s"] >= 0.1 and out["stop_rule"] == {"min_count": 1, "duration_s": 0.1}
    r = agent(*on_board(board_bundles, board, "bench", "--min-count", "40", "--json", *NO_POWER))
    out = json.loads(r.stdout)
    assert out["count"] == 40 and out["stop_rule"] == {"min_count": 40, "duration_s": 0.0}


@pytest.mark.parametrize("args, message", [
    (["--count", "10", "--duration", "1"], "cannot be combined with --duration or --min-count"),
    (["--count", "10", "--min-count", "5"], "cannot be combined"),
    (["--duration", "0"], "--duration must be longer than 0 s"),
    (["--min-count", "0"], "--min-count must be at least 1"),
])
def test_bench_stop_rule_errors(board_bundles: dict[str, Path], board: dict[str, Path], args: list[str],
                                message: str) -> None:
    r = agent(*on_board(board_bundles, board, "bench", *args, *NO_POWER))
    assert r.returncode == 2 and message in r.stderr


def test_stop_rule_is_pure() -> None:
    from edge_agent.benchmark import DEFAULT_COUNT, stop_rule

    assert stop_rule(None, None, None) == (DEFAULT_COUNT, 0.0)
    assert stop_rule(7, None, None) == (7, 0.0)
    assert stop_rule(None, 2.5, None) == (1, 2.5)
    assert stop_rule(None, None, 1024) == (1024, 0.0)
    assert stop_rule(None, 60.0, 1024) == (1024, 60.0)
    with pytest.raises(InputError):
        stop_rule(7, 1.0, None)


# ------------------------------------------------------------------------------------------------ pure parts


def test_resolve_device_precedence(board: dict[str, Path]) -> None:
    c = resolve_device(DeviceOptions(profiles_dir=str(board["profiles"])), BOARD)
    assert (c.profile, c.power_spec, c.sample_hz, c.zones, c.throttle_c) == (
        BOARD, "hwmon:ina219", 50.0, ("cpu-thermal",), 70.0)
    c = resolve_device(DeviceOptions(profiles_dir=str(board["profiles"]), power="none"), BOARD)
    assert c.power_spec == "none" and c.zones == ("cpu-thermal",)
    c = resolve_device(DeviceOptions(profile="rpi5"), BOARD)  # --profile wins over the manifest's
    assert (c.profile, c.power_spec, c.sample_hz, c.throttle_c) == ("rpi5", "pmic", 5.0, 85.0)
    c = resolve_device(DeviceOptions(power="serial:um25c", power_port="/dev/rfcomm0"), "nowhere")
    assert c.profile is None and c.profile_note and c.power_spec == "serial:um25c"
    assert c.serial_port == "/dev/rfcomm0" and c.sample_hz == 10.0 and c.throttle_c is None
    with pytest.raises(SourceError, match="unknown power source"):
        resolve_device(DeviceOptions(power="battery"), None)


def test_idle_file_validation(tmp_path: Path) -> None:
    good = {"mean_w": 3.1, "std_w": None, "samples": 4, "source": "rapl", "measured_at": 1.8e9, "duration_s": 10}
    assert parse_idle(good, "f") == IdleBaseline(3.1, None, 4, "rapl", 1.8e9, 10.0)
    for bad in ({**good, "mean_w": "3"}, {**good, "samples": 0}, {**good, "source": ""}, [1, 2],
                {k: v for k, v in good.items() if k != "source"}, {**good, "std_w": float("nan")}):
        with pytest.raises(InputError, match="calibrate-idle"):
            parse_idle(bad, "f")
    assert read_idle(tmp_path) is None and load_idle(tmp_path, "rapl") is None and load_idle(None, "rapl") is None
    (tmp_path / IDLE_FILE).write_text("{not json")
    with pytest.raises(InputError, match="not JSON"):
        load_idle(tmp_path, "rapl")
    save_idle(tmp_path, IdleBaseline(3.0, 0.1, 20, "rapl", 1.8e9, 10.0))
    assert load_idle(tmp_path, "rapl") == IdleBaseline(3.0, 0.1, 20, "rapl", 1.8e9, 10.0)
    assert load_idle(tmp_path, "pmic") is None and load_idle(tmp_path, None) is None


def test_power_std() -> None:
    assert power_std_w([(0, 2.0), (10, 4.0)], counter=False) == pytest.approx(1.0)
    assert power_std_w([(0, 2.0)], counter=False) is None
    # counter: 1 J in the first second, 3 J in the next: interval powers 1 W and 3 W
    assert power_std_w([(0, 0.0), (10**9, 1.0), (2 * 10**9, 4.0)], counter=True) == pytest.approx(1.0)
    assert power_std_w([(0, 0.0), (10**9, 1.0)], counter=True) is None


def test_cpu_mhz_is_an_optional_window_field() -> None:
    kw: dict[str, Any] = dict(device="d", seq=0, ts_start=1.0, ts_end=2.0, model={"name": "m", "version": "1",
                              "sha256": "ab" * 32}, backend_info={"engine": "onnxruntime", "providers": []},
                              latencies_ns=[1000], power=None, temp_c=None, cpu_pct=1.0, rss_mb=1.0,
                              throttled=None, dropped=0)
    assert OPTIONAL_FIELDS[0] == "cpu_mhz"  # later additive fields (spool_depth, ...) follow it
    without = build_window(**kw)
    assert "cpu_mhz" not in without and validate_window(without) == []  # an older agent's window
    w = build_window(**kw, cpu_mhz=1199.96)
    keys = list(w)
    assert keys[keys.index("cpu_pct") + 1] == "cpu_mhz" and w["cpu_mhz"] == 1200.0
    assert validate_window(w) == []
    assert build_window(**kw, cpu_mhz=None)["cpu_mhz"] is None
    assert validate_window({**w, "cpu_mhz": "fast"}) == ["cpu_mhz: expected a number or null, got 'fast'"]
