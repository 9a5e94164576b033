"""edge_agent.doctor: every check against fake sysfs trees, fake vcgencmd/nvpmodel, the real runtimes
installed here (LiteRT, onnxruntime), a real Mosquitto, and the firmware notes' headings."""

from __future__ import annotations

import json
import os
import platform
import re
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edge_agent import doctor
from edge_agent.doctor import Check, DoctorOptions, check_broker, check_camera, check_folder, run_checks
from edge_agent.profiles import list_profiles, load_profile
from tests.fakes_sysfs import jetson_nano, jetson_orin_nano, rapl, write
from tests.mosquitto import Mosquitto, free_port
from tests.test_power_pmic import CAPTURE

ROOT = Path(__file__).resolve().parent.parent
NOTES = ROOT / "firmware_notes"
ON_X86_64 = doctor.platform_arch(platform.machine(), struct.calcsize("P") * 8) == "x86_64"


# --------------------------------------------------------------------------------------------------
# fake boards


def thermal_zone(root: Path, n: int, kind: str, millideg: int) -> None:
    write(root / "class" / "thermal" / f"thermal_zone{n}" / "type", kind)
    write(root / "class" / "thermal" / f"thermal_zone{n}" / "temp", millideg)


def cpufreq(root: Path, cores: int, cur_khz: int, max_khz: int, governor: str = "ondemand") -> None:
    for n in range(cores):
        d = root / "devices" / "system" / "cpu" / f"cpu{n}" / "cpufreq"
        write(d / "scaling_cur_freq", cur_khz)
        write(d / "scaling_max_freq", max_khz)
        write(d / "scaling_governor", governor)


def script(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def fake_vcgencmd(folder: Path, throttled: str = "0x0") -> Path:
    """vcgencmd answering pmic_read_adc with a real Pi 5 capture and get_throttled with ``throttled``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "capture.txt").write_text(CAPTURE)
    return script(folder / "bin", "vcgencmd", f"""\
case "$1" in
  pmic_read_adc) cat "{folder / 'capture.txt'}" ;;
  get_throttled) echo "throttled={throttled}" ;;
  *) echo "error=2 error_msg=\\"Invalid arguments\\"" >&2; exit 2 ;;
esac
""")


@pytest.fixture
def pubkey(keypair: tuple[Path, Path], tmp_path: Path) -> Path:
    """The pinned key alone in its folder, as on a device."""
    folder = tmp_path / "etc-edge-agent"
    folder.mkdir()
    key = folder / "trusted.pub"
    key.write_bytes(keypair[1].read_bytes())
    key.chmod(0o644)
    return key


@pytest.fixture
def rpi5(tmp_path: Path, pubkey: Path) -> DoctorOptions:
    """A Raspberry Pi 5 as the kernel and firmware show it: cpu-thermal, 4 cores, vcgencmd."""
    sys_root = tmp_path / "sys"
    thermal_zone(sys_root, 0, "cpu-thermal", 52350)
    cpufreq(sys_root, 4, 2400000, 2400000)
    vcgencmd = fake_vcgencmd(tmp_path / "pi")
    state = tmp_path / "state"
    state.mkdir()
    return DoctorOptions(state_dir=state, sysfs_root=sys_root, vcgencmd=str(vcgencmd), pubkey=pubkey)


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# --------------------------------------------------------------------------------------------------
# the firmware notes: every anchor doctor names is a heading of the note


def slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation but - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(note: Path, under: str | None = None) -> set[str]:
    """Anchors of the headings of ``note`` (only those after the ``## <under>`` heading when given)."""
    found: set[str] = set()
    inside = under is None
    fenced = False
    for line in note.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        if under is not None and len(m.group(1)) == 2:
            inside = slug(m.group(2)) == slug(under)
            continue
        if inside:
            found.add(slug(m.group(2)))
    return found


def assert_notes_exist(checks: list[Check]) -> None:
    for c in checks:
        path, _, anchor = c.note.partition("#")
        assert anchor, c
        assert anchor in headings(ROOT / path, under="Checklist"), f"{c.name}: {c.note} is not a heading"


def test_slug_is_githubs() -> None:
    assert slug("Power measurement") == "power-measurement"
    assert slug("Edge TPU device") == "edge-tpu-device"
    assert slug("`libedgetpu`") == "libedgetpu"
    assert slug("OS image and Python") == "os-image-and-python"
    assert slug("Power modes: nvpmodel and jetson_clocks") == "power-modes-nvpmodel-and-jetson_clocks"


@pytest.mark.parametrize("profile", [p.name for p in list_profiles()])
def test_every_anchor_doctor_names_is_a_checklist_heading_of_the_note(profile: str) -> None:
    note = NOTES / f"{profile}.md"
    assert note.is_file(), f"no firmware note for the shipped profile {profile}"
    checklist = headings(note, under="Checklist")
    for name, anchors in doctor.plan(load_profile(profile)):
        for anchor in anchors:
            assert anchor in checklist, f"{profile}: check {name} names #{anchor}, not a heading under Checklist"
    # the power package's hints point at this section (edge_agent/power/base.py NOTE_ANCHOR)
    assert "power-measurement" in headings(note)


def test_links_inside_the_notes_resolve() -> None:
    for note in NOTES.glob("*.md"):
        text = note.read_text()
        for target, anchor in re.findall(r"\]\(([\w.-]*\.md)?#([\w-]+)\)", text):
            where = NOTES / target if target else note
            assert anchor in headings(where), f"{note.name}: link to {target}#{anchor} has no heading"


def test_every_shipped_profile_has_its_own_note() -> None:
    assert set(doctor.BOARDS) == {p.name for p in list_profiles()}
    assert {p.stem for p in NOTES.glob("*.md")} - {"README"} == set(doctor.BOARDS)


# --------------------------------------------------------------------------------------------------
# the built-in test models


def build_tiny_tflite() -> bytes:
    """TINY_TFLITE, written with LiteRT's own flatbuffer schema (how the constant was made)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    def tensor(name: str, shape: list[int], ttype: int, buf: int) -> object:
        q = s.QuantizationParametersT()
        q.scale, q.zeroPoint = [1.0], [0]
        t = s.TensorT()
        t.name, t.shape, t.type, t.buffer, t.quantization = name, shape, ttype, buf, q
        return t

    m = s.ModelT()
    m.version, m.description = 3, "edgekit doctor probe"
    bufs = [s.BufferT() for _ in range(3)]
    bufs[1].data = list(np.array([[1, 2, 3, 4], [-1, 0, 1, 0]], np.int8).tobytes())
    bufs[2].data = list(np.array([1, -2], np.int32).tobytes())
    m.buffers = bufs
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.FULLY_CONNECTED
    code.version = 4
    m.operatorCodes = [code]
    g = s.SubGraphT()
    g.name = "main"
    g.tensors = [tensor("x", [1, 4], s.TensorType.INT8, 0), tensor("w", [2, 4], s.TensorType.INT8, 1),
                 tensor("b", [2], s.TensorType.INT32, 2), tensor("y", [1, 2], s.TensorType.INT8, 0)]
    op = s.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1, 2], [3]
    op.builtinOptionsType, op.builtinOptions = s.BuiltinOptions.FullyConnectedOptions, s.FullyConnectedOptionsT()
    g.operators, g.inputs, g.outputs = [op], [0], [3]
    m.subgraphs = [g]
    b = flatbuffers.Builder(0)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def test_tiny_tflite_is_the_generated_model_and_computes_w_x_plus_b() -> None:
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    embedded = s.ModelT.InitFromPackedBuf(doctor.TINY_TFLITE, 0)
    b = flatbuffers.Builder(0)
    b.Finish(embedded.Pack(b), file_identifier=b"TFL3")
    assert bytes(b.Output()) == build_tiny_tflite(), "TINY_TFLITE drifted from build_tiny_tflite(): regenerate it"
    w = np.array([[1, 2, 3, 4], [-1, 0, 1, 0]])
    assert tuple(w @ np.array(doctor.TINY_TFLITE_IN) + [1, -2]) == doctor.TINY_TFLITE_OUT
    for resolver in (OpResolverType.BUILTIN, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
        it = Interpreter(model_content=doctor.TINY_TFLITE, experimental_op_resolver_type=resolver)
        assert [d["dtype"] for d in it.get_input_details()] == [np.int8]
        assert doctor._invoke_tflite(it, np) == list(doctor.TINY_TFLITE_OUT)


def test_tiny_onnx_is_the_one_node_model_onnx_helper_writes() -> None:
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "doctor", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgekit-doctor",
                              ir_version=7)
    onnx.checker.check_model(model)
    assert model.SerializeToString() == doctor.TINY_ONNX
    out = ort.InferenceSession(doctor.TINY_ONNX, providers=["CPUExecutionProvider"]).run(
        None, {"x": np.array([doctor.TINY_ONNX_IN], np.float32)})[0]
    assert tuple(out.reshape(-1)) == doctor.TINY_ONNX_OUT


# --------------------------------------------------------------------------------------------------
# whole boards


def test_rpi5_on_a_fake_board(rpi5: DoctorOptions) -> None:
    profile = load_profile("rpi5")
    checks = run_checks(profile, options=rpi5)
    assert [c.name for c in checks] == [n for n, _ in doctor.plan(profile)] == [
        "python", "glibc", "runtime", "delegate:xnnpack", "power", "thermal", "cpufreq", "throttle", "camera",
        "state-dir", "broker", "pubkey"]
    c = by_name(checks)
    if ON_X86_64:  # this machine is not an aarch64 board: said plainly
        assert c["python"].status == "fail" and "the profile is for aarch64" in c["python"].detail
    assert c["glibc"].status == "pass" and "manylinux_2_27" in c["glibc"].detail
    assert c["runtime"].status == "pass" and c["runtime"].detail.startswith("ai-edge-litert")
    assert c["delegate:xnnpack"].status == "pass" and "took 1 of 1 node" in c["delegate:xnnpack"].detail
    assert c["power"].status == "pass" and c["power"].detail.startswith("pmic: 7.24 W now")
    assert "VDD_CORE 5.36 W" in c["power"].detail
    assert c["thermal"] == ("thermal", "pass", "cpu-thermal 52.4 C (throttle at 85 C)",
                            "firmware_notes/rpi5.md#thermal-zones")
    assert c["cpufreq"].status == "pass" and "4 core(s) at 2400 MHz" in c["cpufreq"].detail
    assert "governor ondemand" in c["cpufreq"].detail
    assert c["throttle"].status == "pass" and "throttled=0x0" in c["throttle"].detail
    assert c["camera"].status == "skip" and c["broker"].status == "skip"
    assert c["state-dir"].status == "pass" and "MiB free" in c["state-dir"].detail
    assert c["pubkey"].status == "pass" and "SHA256:" in c["pubkey"].detail
    assert all(x.note.startswith("firmware_notes/rpi5.md#") for x in checks)
    assert_notes_exist(checks)
    assert not list(rpi5.state_dir.iterdir()), "the write probe left a file behind"


def test_rpi5_throttling_and_hot_zone_are_warnings(rpi5: DoctorOptions, tmp_path: Path) -> None:
    vcgencmd = fake_vcgencmd(tmp_path / "pi2", throttled="0x50005")
    thermal_zone(rpi5.sysfs_root, 0, "cpu-thermal", 86000)
    opts = DoctorOptions(**{**rpi5.__dict__, "vcgencmd": str(vcgencmd)})
    c = by_name(run_checks(load_profile("rpi5"), options=opts))
    assert c["throttle"].status == "warn"
    assert "now under_voltage, throttled" in c["throttle"].detail
    assert c["thermal"].status == "warn" and "at or above 85 C" in c["thermal"].detail


def test_rpi5_without_vcgencmd_is_absent_not_a_crash(rpi5: DoctorOptions, tmp_path: Path) -> None:
    opts = DoctorOptions(**{**rpi5.__dict__, "vcgencmd": str(tmp_path / "nope" / "vcgencmd")})
    checks = run_checks(load_profile("rpi5"), options=opts)
    c = by_name(checks)
    assert c["power"].status == "absent" and "vcgencmd" in c["power"].detail
    assert "--power none" in c["power"].detail and c["power"].note == "firmware_notes/rpi5.md#power"
    assert c["throttle"].status == "absent"


def test_vcgencmd_without_video_group(rpi5: DoctorOptions, tmp_path: Path) -> None:
    denied = script(tmp_path / "denied", "vcgencmd", 'echo "Can\'t open device file: /dev/vcio" >&2; exit 255\n')
    c = by_name(run_checks(load_profile("rpi5"), options=DoctorOptions(**{**rpi5.__dict__,
                                                                          "vcgencmd": str(denied)})))
    assert c["power"].status == "fail"  # the agent would not start with this profile
    assert c["throttle"].status == "warn"  # the agent runs, throttling from the thermal zones only
    for name in ("power", "throttle"):
        assert "/dev/vcio" in c[name].detail and "video" in c[name].detail


def jetson_options(tmp_path: Path, pubkey: Path, board: str) -> DoctorOptions:
    sys_root = tmp_path / "sys"
    if board == "jetson-orin-nano":
        jetson_orin_nano(sys_root)
        for n, zone in enumerate(("cpu-thermal", "gpu-thermal", "tj-thermal")):
            thermal_zone(sys_root, n, zone, 45000 + 1000 * n)
        cpufreq(sys_root, 6, 1510400, 1510400, "schedutil")
    else:
        jetson_nano(sys_root)
        for n, zone in enumerate(("CPU-therm", "GPU-therm")):
            thermal_zone(sys_root, n, zone, 40500)
        cpufreq(sys_root, 4, 1479000, 1479000, "schedutil")
    nvpmodel = script(tmp_path / "bin", "nvpmodel",
                      'echo "NV Fan Mode:quiet"\necho "NV Power Mode: 15W"\necho 0\n')
    state = tmp_path / "state"
    state.mkdir()
    return DoctorOptions(state_dir=state, sysfs_root=sys_root, nvpmodel=str(nvpmodel), pubkey=pubkey)


def test_jetson_orin_nano_on_a_fake_board(tmp_path: Path, pubkey: Path) -> None:
    # a copy of the profile whose TensorRT cache lies in the test's folder
    cache = tmp_path / "trt-cache"
    cache.mkdir()
    text = (ROOT / "device_profiles" / "jetson-orin-nano.toml").read_text()
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "jetson-orin-nano.toml").write_text(
        text.replace('trt_cache_dir = "/var/lib/edge-agent/trt-cache"', f'trt_cache_dir = "{cache}"'))
    profile = load_profile("jetson-orin-nano", profiles)
    checks = run_checks(profile, options=jetson_options(tmp_path, pubkey, "jetson-orin-nano"))
    assert [c.name for c in checks] == [
        "python", "glibc", "runtime", "provider:TensorrtExecutionProvider", "provider:CUDAExecutionProvider",
        "trt-cache", "power", "power-mode", "thermal", "cpufreq", "camera", "state-dir", "broker", "pubkey"]
    c = by_name(checks)
    assert c["runtime"].status == "pass" and c["runtime"].detail.startswith("onnxruntime ")
    for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        row = c[f"provider:{p}"]
        assert row.status == "fail", row  # this machine has no NVIDIA GPU build of onnxruntime
        assert f"{p} is not in this onnxruntime" in row.detail and "degraded" in row.detail
        assert row.note == "firmware_notes/jetson-orin-nano.md#gpu-providers"
    assert c["trt-cache"].status == "pass"
    assert c["power"].status == "pass" and c["power"].detail.startswith("ina3221: 6.70 W now (VDD_IN")
    assert "VDD_CPU_GPU_CV 1.58 W" in c["power"].detail
    assert c["power-mode"].status == "pass" and "power mode 15W (id 0)" in c["power-mode"].detail
    assert c["thermal"].status == "pass" and "tj-thermal 47.0 C" in c["thermal"].detail
    assert c["cpufreq"].status == "pass" and "6 core(s)" in c["cpufreq"].detail
    assert_notes_exist(checks)


def test_jetson_nano_iio_layout(tmp_path: Path, pubkey: Path) -> None:
    c = by_name(run_checks(load_profile("jetson-nano"), options=jetson_options(tmp_path, pubkey, "jetson-nano")))
    assert c["power"].status == "pass" and c["power"].detail.startswith("ina3221: 3.15 W now (POM_5V_IN")
    assert c["thermal"].status == "pass" and c["power-mode"].status == "pass"
    assert c["trt-cache"].note == "firmware_notes/jetson-nano.md#tensorrt-cache"


def test_x86_64_with_rapl(tmp_path: Path, pubkey: Path) -> None:
    sys_root = tmp_path / "sys"
    rapl(sys_root, energy_uj=123_456_789)
    thermal_zone(sys_root, 0, "acpitz", 27800)
    thermal_zone(sys_root, 1, "x86_pkg_temp", 54000)
    cpufreq(sys_root, 4, 3100000, 4200000, "powersave")
    state = tmp_path / "state"
    state.mkdir()
    opts = DoctorOptions(state_dir=state, sysfs_root=sys_root, pubkey=pubkey)
    checks = run_checks(load_profile("x86-64"), options=opts)
    assert [c.name for c in checks] == ["python", "glibc", "runtime", "power", "thermal", "cpufreq", "camera",
                                        "state-dir", "broker", "pubkey"]
    c = by_name(checks)
    assert c["power"].status == "pass" and c["power"].detail.startswith("rapl: 0.00 W now")
    assert "package-0" in c["power"].detail
    assert c["thermal"].detail.startswith("x86_pkg_temp 54.0 C")
    assert c["cpufreq"].status == "pass" and "max 4200 MHz" in c["cpufreq"].detail
    assert_notes_exist(checks)
    if ON_X86_64:
        assert {x.status for x in checks} == {"pass", "skip"}, checks
        assert doctor.exit_code(checks) == 0


def test_power_absent_and_power_broken_are_told_apart(tmp_path: Path) -> None:
    profile = load_profile("x86-64")
    absent = doctor.check_power(profile, DoctorOptions(sysfs_root=tmp_path / "empty"), "x86-64")
    assert absent[0] == "absent" and "looked for" in absent[1] and "intel-rapl:0/energy_uj" in absent[1]
    rapl(tmp_path / "sys", energy_uj=1)
    write(tmp_path / "sys" / "class" / "powercap" / "intel-rapl:0" / "energy_uj", "garbage")
    broken = doctor.check_power(profile, DoctorOptions(sysfs_root=tmp_path / "sys"), "x86-64")
    assert broken[0] == "fail" and "not an integer" in broken[1] and "hint:" in broken[1]
    none = doctor.check_power(load_profile("rpi4"), DoctorOptions(), "rpi4")
    assert none[0] == "skip" and "'none'" in none[1]


def test_missing_zones_and_a_core_count_mismatch(tmp_path: Path) -> None:
    profile = load_profile("jetson-orin-nano")
    thermal_zone(tmp_path, 0, "cpu-thermal", 50000)
    thermal_zone(tmp_path, 1, "soc0-thermal", 48000)
    status, detail = doctor.check_thermal(profile, tmp_path)
    assert status == "warn" and "gpu-thermal, tj-thermal not here" in detail and "soc0-thermal" in detail
    assert doctor.check_thermal(load_profile("x86-64"), tmp_path)[0] == "absent"
    assert doctor.check_cpufreq(profile, tmp_path)[0] == "absent"
    cpufreq(tmp_path, 2, 1000000, 1500000)
    status, detail = doctor.check_cpufreq(profile, tmp_path)
    assert status == "warn" and "the profile says 6 cores" in detail


# --------------------------------------------------------------------------------------------------
# runtime and delegates


@pytest.mark.parametrize(("profile", "consequence"), [("coral-usb", "degraded"), ("coral-devboard", "refuse")])
def test_edgetpu_delegate_fails_with_the_libedgetpu_hint(tmp_path: Path, profile: str, consequence: str) -> None:
    import ctypes.util

    if ctypes.util.find_library("edgetpu"):
        pytest.skip("libedgetpu is installed on this machine")
    checks = run_checks(load_profile(profile), options=DoctorOptions(sysfs_root=tmp_path, state_dir=tmp_path))
    c = by_name(checks)
    assert c["runtime"].status == "pass"
    row = c["delegate:edgetpu"]
    assert row.status == "fail"
    assert row.note == f"firmware_notes/{profile}.md#libedgetpu"
    assert "libedgetpu.so.1: cannot open shared object file" in row.detail
    assert "libedgetpu1-std" in row.detail and consequence in row.detail
    assert_notes_exist(checks)


def _crashing_python(folder: Path, body: str) -> Path:
    return script(folder, "python", "cat >/dev/null\necho '@@edgekit-doctor {\"start\": \"runtime\"}'\n" + body)


def test_a_runtime_that_crashes_is_a_fail_row(tmp_path: Path) -> None:
    crash = _crashing_python(tmp_path / "crash", 'echo "Segmentation fault in libfoo" >&2\nkill -SEGV $$\n')
    opts = DoctorOptions(sysfs_root=tmp_path, state_dir=tmp_path, probe_python=str(crash))
    c = by_name(run_checks(load_profile("rpi5"), options=opts))
    assert c["runtime"].status == "fail"
    assert "crashed (SIGSEGV) while checking runtime" in c["runtime"].detail
    assert "Segmentation fault in libfoo" in c["runtime"].detail
    assert c["delegate:xnnpack"].status == "skip" and "not run" in c["delegate:xnnpack"].detail
    assert c["thermal"].status == "absent"  # the other checks went on


def test_a_runtime_that_hangs_is_a_fail_row(tmp_path: Path) -> None:
    hang = _crashing_python(tmp_path / "hang", "exec sleep 30\n")
    opts = DoctorOptions(sysfs_root=tmp_path, state_dir=tmp_path, probe_python=str(hang), probe_timeout_s=1)
    c = by_name(run_checks(load_profile("x86-64"), options=opts))
    assert c["runtime"].status == "fail" and "did not finish within 1 s" in c["runtime"].detail


def test_a_probe_that_cannot_start_fails_every_runtime_row(tmp_path: Path) -> None:
    opts = DoctorOptions(sysfs_root=tmp_path, state_dir=tmp_path, probe_python=str(tmp_path / "no-python"))
    c = by_name(run_checks(load_profile("coral-usb"), options=opts))
    for name in ("runtime", "delegate:edgetpu"):
        assert c[name].status == "fail" and "cannot start the runtime probe" in c[name].detail


def test_an_unexpected_exception_becomes_an_internal_error_row(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> tuple[str, str]:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(doctor, "check_thermal", boom)
    c = by_name(run_checks(load_profile("x86-64"), options=DoctorOptions(sysfs_root=tmp_path, state_dir=tmp_path)))
    assert c["thermal"] == ("thermal", "fail", "internal error ZeroDivisionError: division by zero",
                            "firmware_notes/x86-64.md#thermal-zones")


# --------------------------------------------------------------------------------------------------
# the state folder


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only even for root (chmod, and the immutable attribute when we are root)."""
    folder.chmod(0o555)
    immutable = False
    try:
        if os.geteuid() == 0:
            r = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
            if r.returncode != 0:
                pytest.skip(f"running as root and cannot make {folder} immutable: {r.stderr.strip()}")
            immutable = True
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_state_dir_checks(tmp_path: Path) -> None:
    ok = check_folder(tmp_path, "the state folder", min_free_mb=1)
    assert ok[0] == "pass" and "fsynced, renamed and removed" in ok[1]
    assert list(tmp_path.iterdir()) == []
    short = check_folder(tmp_path, "the state folder", min_free_mb=1e12)
    assert short[0] == "warn" and "below" in short[1]
    missing = check_folder(tmp_path / "a" / "b", "the state folder", min_free_mb=1)
    assert missing[0] == "warn" and "does not exist yet" in missing[1] and "install -d" in missing[1]
    (tmp_path / "file").write_text("x")
    assert check_folder(tmp_path / "file", "the state folder", min_free_mb=1)[0] == "fail"


def test_state_dir_read_only_fails(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with read_only(state):
        status, detail = check_folder(state, "the state folder", min_free_mb=1)
        opts = DoctorOptions(sysfs_root=tmp_path, state_dir=state)
        c = by_name(run_checks(load_profile("x86-64"), options=opts))
    assert status == "fail" and f"cannot write in the state folder {state}" in detail
    assert c["state-dir"].status == "fail" and c["state-dir"].note == "firmware_notes/x86-64.md#state-folder"
    assert list(state.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# broker, camera, key


@pytest.mark.mqtt
def test_broker_reachable_then_closed(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        status, detail = check_broker(broker.address, 5.0)
        assert status == "pass", detail
        assert "CONNACK Success" in detail and "throwaway client id edgekit-doctor-" in detail
    finally:
        broker.stop()
    status, detail = check_broker(broker.address, 2.0)
    assert status == "fail" and "cannot open a TCP connection" in detail and "Connection refused" in detail


@pytest.mark.mqtt
def test_broker_refusing_anonymous_clients_is_a_warning(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "broker", anonymous=False).start()
    try:
        status, detail = check_broker(broker.address, 5.0)
    finally:
        broker.stop()
    assert status == "warn" and "refuses an anonymous client (Not authorized)" in detail


def test_broker_that_never_answers_mqtt_fails(tmp_path: Path) -> None:
    import socket

    with socket.socket() as server:  # accepts TCP, never speaks MQTT
        server.bind(("127.0.0.1", 0))
        server.listen()
        status, detail = check_broker(f"127.0.0.1:{server.getsockname()[1]}", 0.5)
    assert status == "fail" and "accepts TCP but" in detail


def test_broker_closed_port_through_run_checks(tmp_path: Path) -> None:
    opts = DoctorOptions(sysfs_root=tmp_path, state_dir=tmp_path, mqtt=f"127.0.0.1:{free_port()}", timeout_s=2)
    row = by_name(run_checks(load_profile("x86-64"), options=opts))["broker"]
    assert row.status == "fail" and row.note == "firmware_notes/x86-64.md#broker"


def test_camera_sources(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(3):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    status, detail = check_camera(f"video:{video}")
    assert status == "pass" and "a 64x48 frame (3 channel(s), uint8)" in detail
    assert check_camera(None)[0] == "skip"
    assert check_camera("camera:/dev/video-doctor-test")[0] == "absent"
    assert check_camera("images:/tmp")[0] == "skip"
    assert check_camera(f"video:{tmp_path / 'nope.avi'}")[0] == "fail"
    assert check_camera("webcam")[0] == "fail"
    broken = tmp_path / "broken.avi"
    broken.write_bytes(b"not a video")
    assert check_camera(f"video:{broken}")[0] == "fail"


def test_pubkey_checks(keypair: tuple[Path, Path], pubkey: Path, tmp_path: Path) -> None:
    private, _ = keypair
    assert doctor.check_pubkey(pubkey)[0] == "pass"
    status, detail = doctor.check_pubkey(private)
    assert status == "fail" and "PRIVATE key" in detail
    assert doctor.check_pubkey(tmp_path / "nope.pub")[0] == "fail"
    pubkey.chmod(0o666)
    status, detail = doctor.check_pubkey(pubkey)
    assert status == "warn" and "writable by group/others" in detail
    pubkey.chmod(0o644)
    (pubkey.parent / "edgekit-signing.key").write_bytes(private.read_bytes())
    status, detail = doctor.check_pubkey(pubkey)
    assert status == "warn" and "edgekit-signing.key" in detail


# --------------------------------------------------------------------------------------------------
# pure verdicts


def test_platform_and_python_verdicts() -> None:
    assert doctor.platform_arch("aarch64", 64) == "aarch64"
    assert doctor.platform_arch("aarch64", 32) == "armv7l"  # 32-bit Raspberry Pi OS on a 64-bit kernel
    assert doctor.platform_arch("armv7l", 32) == "armv7l"
    assert doctor.platform_arch("AMD64", 64) == "x86_64"
    assert doctor.python_status((3, 11, 2), "CPython", "Linux", "aarch64", "aarch64")[0] == "pass"
    status, detail = doctor.python_status((3, 11, 2), "CPython", "Linux", "armv7l", "aarch64")
    assert status == "fail" and "32-bit user space" in detail
    status, detail = doctor.python_status((3, 6, 9), "CPython", "Linux", "aarch64", "aarch64")
    assert status == "fail" and "Python >= 3.10" in detail


def test_glibc_verdicts() -> None:
    assert doctor.glibc_status((2, 36), "litert", "aarch64", False)[0] == "pass"
    status, detail = doctor.glibc_status((2, 31), "litert", "aarch64", True)
    assert status == "fail" and "2.34" in detail and "tflite-runtime" in detail
    assert doctor.glibc_status((2, 31), "litert", "aarch64", False)[0] == "pass"
    assert doctor.glibc_status((2, 27), "onnxruntime", "aarch64", False)[0] == "pass"  # Jetson Nano, JetPack 4.6
    assert doctor.glibc_status((2, 24), "onnxruntime", "x86_64", False)[0] == "fail"
    status, detail = doctor.glibc_status(None, "litert", "aarch64", False)
    assert status == "fail" and "musl" in detail
    version = doctor.glibc_version()
    assert version is None or version >= (2, 17)


def test_note_board_for_copied_profiles(tmp_path: Path) -> None:
    text = (ROOT / "device_profiles" / "rpi5.toml").read_text().replace('name = "rpi5"', 'name = "line-3-pi"')
    (tmp_path / "line-3-pi.toml").write_text(text)
    board, why = doctor.note_board(load_profile(str(tmp_path / "line-3-pi.toml")))
    assert board == "rpi5" and why is not None and "description" in why
    text = (ROOT / "device_profiles" / "x86-64.toml").read_text().replace('name = "x86-64"', 'name = "nuc"')
    (tmp_path / "nuc.toml").write_text(text.replace("Generic x86-64 Linux box", "Intel NUC 13"))
    board, why = doctor.note_board(load_profile(str(tmp_path / "nuc.toml")))
    assert board == "x86-64" and why is not None and "closest" in why
    assert doctor.note_board(load_profile("coral-usb")) == ("coral-usb", None)


def test_exit_codes() -> None:
    rows = [Check("a", "pass", "", ""), Check("b", "absent", "", ""), Check("c", "warn", "", "")]
    assert doctor.exit_code(rows) == 0 and doctor.exit_code(rows, strict=True) == 1
    assert doctor.exit_code([*rows, Check("d", "fail", "", "")]) == 1


# --------------------------------------------------------------------------------------------------
# the command line


def doctor_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_agent.doctor", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)


def test_json_through_the_real_cli(rpi5: DoctorOptions) -> None:
    r = doctor_cli("--profile", "rpi5", "--sysfs-root", str(rpi5.sysfs_root), "--json", "--vcgencmd",
                   rpi5.vcgencmd, "--state-dir", str(rpi5.state_dir), "--pubkey", str(rpi5.pubkey))
    doc = json.loads(r.stdout)  # stdout is the JSON document and nothing else
    assert r.returncode == doc["exit_code"] == (0 if doc["ok"] else 1)
    assert doc["profile"] == "rpi5" and doc["note"] == "firmware_notes/rpi5.md" and doc["note_reason"] is None
    rows = {c["name"]: c for c in doc["checks"]}
    assert set(rows) == {n for n, _ in doctor.plan(load_profile("rpi5"))}
    assert all(set(c) == {"name", "status", "detail", "note"} for c in doc["checks"])
    assert rows["power"]["status"] == "pass" and rows["delegate:xnnpack"]["status"] == "pass"
    assert sum(doc["counts"].values()) == len(doc["checks"])
    if ON_X86_64:
        assert r.returncode == 1 and rows["python"]["status"] == "fail"


def test_text_table_and_exit_code(rpi5: DoctorOptions, tmp_path: Path) -> None:
    r = doctor_cli("--profile", "x86-64", "--sysfs-root", str(tmp_path / "nothing"), "--state-dir",
                   str(rpi5.state_dir), "--pubkey", str(rpi5.pubkey), "--strict")
    assert r.returncode == 1  # absent power, thermal and cpufreq with --strict
    assert "x86-64.md#power" in r.stdout and "NOT OK" in r.stdout and "absent" in r.stdout
    r = doctor_cli("--profile", "x86-64", "--sysfs-root", str(tmp_path / "nothing"), "--state-dir",
                   str(rpi5.state_dir), "--pubkey", str(rpi5.pubkey))
    if ON_X86_64:
        assert r.returncode == 0, r.stdout
        assert "\nOK: " in r.stdout


def test_bad_profile_is_exit_2_with_a_json_error() -> None:
    r = doctor_cli("--profile", "no-such-board", "--json")
    assert r.returncode == 2
    assert json.loads(r.stdout)["error"] == "ProfileError" and "known profiles" in r.stderr


def test_tables_plain_and_rich(capsys: pytest.CaptureFixture[str]) -> None:
    rows = [Check("power", "absent", "power source 'pmic': the vcgencmd command is not there " * 3,
                  "firmware_notes/rpi5.md#power"),
            Check("runtime", "pass", "ok", "firmware_notes/rpi5.md#runtime")]
    doctor.print_table(rows, use_rich=False, width=100)
    plain = capsys.readouterr().out
    assert plain.splitlines()[0].split() == ["check", "status", "detail", "read"]
    assert "rpi5.md#power" in plain and max(len(line) for line in plain.splitlines()) <= 100
    pytest.importorskip("rich")
    doctor.print_table(rows, use_rich=True, width=120)
    fancy = capsys.readouterr().out
    assert "rpi5.md#runtime" in fancy and "absent" in fancy


def test_add_doctor_parser_plugs_into_a_cli() -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="edge-agent")
    sub = parser.add_subparsers(dest="command")
    doctor.add_doctor_parser(sub)
    args = parser.parse_args(["doctor", "--profile", "rpi5", "--mqtt", "broker:1883", "--json"])
    assert args.command == "doctor" and args.profile == "rpi5" and args.mqtt == "broker:1883"
    assert args.state_dir == "/var/lib/edge-agent" and args.sysfs_root == "/sys" and not args.strict
    opts = doctor.options_from_args(args)
    assert opts.mqtt == "broker:1883" and opts.pubkey is None


def test_importing_doctor_loads_no_runtime() -> None:
    code = ("import sys, edge_agent.doctor\n"
            "print([m for m in ('onnxruntime', 'ai_edge_litert', 'tflite_runtime', 'cv2', 'rich', 'onnx', "
            "'tensorflow', 'paho') if m in sys.modules])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == "[]"
