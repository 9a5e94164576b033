"""converters/onnx2tf_tool.py: the isolated onnx2tf environment and the ONNX -> TFLite conversion.

Unit tests use fake Python interpreters (small scripts) in place of the base Python, the environment's
Python, pip and onnx2tf, so the environment logic, the command, the files handed to onnx2tf and the error
wrapping are tested in milliseconds. The one end-to-end test (marks ``slow`` and ``onnx2tf``) builds the
real environment once in ~/.cache/edgekit (about 1.5 min and 2.6 GB the first time; reused afterwards) and
converts a small CNN to full-integer TFLite, run in LiteRT against onnxruntime.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from converters import onnx2tf_tool as o2t
from edge_agent.errors import ConversionError, InputError, ModelError
from tests import onnx2tf_env
from tests.models import tiny_cnn, tiny_mlp

onnx2tf_python = onnx2tf_env.onnx2tf_python  # the real tool environment (a shared session fixture)

# --------------------------------------------------------------------------------------------------
# requirements, hash, cache location


def test_requirements_are_exact_pins_with_reasons() -> None:
    names = [req.split("==")[0] for req in o2t.REQUIREMENTS]
    assert all(req.count("==") == 1 for req in o2t.REQUIREMENTS)
    assert len(set(names)) == len(names)
    assert o2t.REQUIREMENTS[0] == f"onnx2tf=={o2t.ONNX2TF_VERSION}"
    assert {"tensorflow==2.19.0", "numpy==1.26.4", "onnx==1.19.1", "onnxruntime==1.23.0",
            "opencv-python==4.11.0.86"} <= set(o2t.REQUIREMENTS)
    assert all(reason.strip() for _, reason in o2t.PINS)
    assert o2t.PIP_REQUIREMENT.startswith("pip==")
    assert "--only-binary=:all:" in o2t.PIP_OPTIONS


def test_requirements_hash_is_stable_and_covers_every_input() -> None:
    h = o2t.requirements_hash()
    assert h == o2t.requirements_hash() and len(h) == 16 and int(h, 16) >= 0
    changed = [*o2t.REQUIREMENTS[:-1], "requests==2.32.4"]
    assert o2t.requirements_hash(changed) != h
    assert o2t.requirements_hash(pip="pip==25.0") != h
    assert o2t.requirements_hash(options=()) != h


def test_default_env_dir_is_under_the_cache_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert o2t.cache_root() == Path.home() / ".cache" / "edgekit"
    assert o2t.default_env_dir() == Path.home() / ".cache" / "edgekit" / f"onnx2tf-{o2t.requirements_hash()}"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert o2t.default_env_dir().parent == tmp_path / "edgekit"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the spec says
    assert o2t.cache_root() == Path.home() / ".cache" / "edgekit"


# --------------------------------------------------------------------------------------------------
# marker


def _complete_env(env_dir: Path, **marker: Any) -> Path:
    py = o2t.env_python(env_dir)
    py.parent.mkdir(parents=True)
    py.write_text("")
    (env_dir / "pyvenv.cfg").write_text("home = /usr/bin\n")
    o2t.write_marker(env_dir, {"requirements_hash": o2t.requirements_hash(), **marker})
    return py


def test_installed_needs_a_marker_with_the_current_hash(tmp_path: Path) -> None:
    env_dir = tmp_path / "env"
    assert not o2t.installed(env_dir)
    _complete_env(env_dir, python="3.11.7")
    assert o2t.installed(env_dir)
    assert not list(env_dir.glob("*.partial"))
    info = o2t.env_info(env_dir)
    assert info["installed"] and info["python"] == "3.11.7" and info["env_dir"] == str(env_dir)

    o2t.write_marker(env_dir, {"requirements_hash": "0" * 16})  # built for other pins
    assert not o2t.installed(env_dir)
    (env_dir / o2t.MARKER).write_text("{not json")
    assert not o2t.installed(env_dir) and o2t.read_marker(env_dir) is None
    (env_dir / o2t.MARKER).write_text("[1, 2]")
    assert o2t.read_marker(env_dir) is None


def test_half_built_env_is_not_installed(tmp_path: Path) -> None:
    env_dir = tmp_path / "env"
    py = o2t.env_python(env_dir)
    py.parent.mkdir(parents=True)
    py.write_text("")
    (env_dir / "pyvenv.cfg").write_text("")
    assert not o2t.installed(env_dir)  # a killed pip leaves exactly this
    assert not o2t.env_info(env_dir)["installed"]


# --------------------------------------------------------------------------------------------------
# pure parts of the conversion


def test_calibration_array_goes_channels_last() -> None:
    rng = np.random.default_rng(0)
    calib = rng.random((5, 1, 3, 4, 6), dtype=np.float32)
    out = o2t.calibration_array(calib, (1, 3, 4, 6))
    assert out.shape == (5, 4, 6, 3) and out.dtype == np.float32 and out.flags.c_contiguous
    for n, c, h, w in [(0, 0, 0, 0), (4, 2, 3, 5), (2, 1, 2, 4)]:
        assert out[n, h, w, c] == calib[n, 0, c, h, w]
    flat = rng.random((3, 1, 7)).astype(np.float64)  # rank 2: no transpose, made float32
    out2 = o2t.calibration_array(flat, (1, 7))
    assert out2.shape == (3, 7) and out2.dtype == np.float32
    np.testing.assert_array_equal(out2, flat[:, 0].astype(np.float32))
    assert o2t.calibration_array(calib, (-1, 3, 4, 6)).shape == (5, 4, 6, 3)  # dynamic batch


def test_samples_to_tflite_layout() -> None:
    x = np.random.default_rng(3).random((4, 1, 3, 5, 6), dtype=np.float32)
    y = o2t.samples_to_tflite_layout(x)
    assert y.shape == (4, 1, 5, 6, 3) and y.flags.c_contiguous
    assert y[3, 0, 4, 5, 2] == x[3, 0, 2, 4, 5]
    np.testing.assert_array_equal(y[:, 0], o2t.calibration_array(x, (1, 3, 5, 6)))
    flat = np.zeros((2, 1, 7), np.float32)
    assert o2t.samples_to_tflite_layout(flat).shape == (2, 1, 7)


@pytest.mark.parametrize(("shape", "input_shape"), [
    ((5, 3, 4, 6), (1, 3, 4, 6)),  # no batch axis per sample
    ((5, 2, 3, 4, 6), (1, 3, 4, 6)),  # batch axis of 2
    ((5, 1, 3, 4, 7), (1, 3, 4, 6)),  # wrong width
    ((0, 1, 3, 4, 6), (1, 3, 4, 6)),  # no samples
])
def test_calibration_array_rejects_wrong_shapes(shape: tuple[int, ...], input_shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError):
        o2t.calibration_array(np.zeros(shape, np.float32), input_shape)


def test_shapes_and_layouts() -> None:
    assert o2t.channels_last_perm(4) == (0, 2, 3, 1)
    assert o2t.channels_last_perm(3) == (0, 2, 1)
    assert o2t.channels_last_perm(5) == (0, 2, 3, 4, 1)
    assert o2t.channels_last_perm(2) == (0, 1)
    assert o2t.expected_tflite_shape((-1, 3, 224, 224)) == (1, 224, 224, 3)
    assert o2t.expected_tflite_shape((1, 42)) == (1, 42)
    assert o2t.layout_name(4) == "NHWC" and o2t.layout_name(3) == "NWC" and o2t.layout_name(2) == "NC"
    assert o2t.shape_matches((1, 16, 16, 3), (1, -1, -1, 3))
    assert not o2t.shape_matches((1, 3, 16, 16), (1, 16, 16, 3))
    assert not o2t.shape_matches((1, 16, 16), (1, 16, 16, 3))


def test_sample_file(tmp_path: Path) -> None:
    grey = o2t.sample_file_array()
    assert grey.shape == o2t.SAMPLE_SHAPE and grey.dtype == np.float32 and np.all(grey == 0.5)
    assert o2t.sample_file_array(np.zeros((4, 8, 8, 1), np.float32)).shape == o2t.SAMPLE_SHAPE  # 1 channel: grey
    samples = np.random.default_rng(1).random((3, 16, 8, 3), dtype=np.float32)
    arr = o2t.sample_file_array(samples)
    assert arr.shape == o2t.SAMPLE_SHAPE and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[0, 0, 0], samples[0, 0, 0])
    np.testing.assert_array_equal(arr[4, 127, 127], samples[1, 15, 7])  # sample 4 is sample 1 again
    np.testing.assert_array_equal(arr[2, 64, 64], samples[2, 8, 4])  # nearest neighbour
    path = o2t.write_sample_file(tmp_path, samples)
    assert path.name == "calibration_image_sample_data_20x128x128x3_float32.npy"
    np.testing.assert_array_equal(np.load(path), arr)


def test_build_command(tmp_path: Path) -> None:
    py, model, out, cal = tmp_path / "py", tmp_path / "m.onnx", tmp_path / "out", tmp_path / "c.npy"
    cmd = o2t.build_command(py, model, out, mode="int8", io_dtype="uint8", per_channel=True, input_name="image",
                            calib_file=cal)
    assert cmd[:7] == [str(py), "-m", "onnx2tf", "-i", str(model), "-o", str(out)]
    assert cmd[cmd.index("-b") + 1] == "1"
    assert "-oiqt" in cmd and cmd[cmd.index("-qt") + 1] == "per-channel"
    i = cmd.index("-cind")
    assert cmd[i + 1:i + 5] == ["image", str(cal), "[0.0]", "[1.0]"]
    assert cmd[cmd.index("-iqd") + 1] == "uint8" and cmd[cmd.index("-oqd") + 1] == "uint8"
    per_tensor = o2t.build_command(py, model, out, mode="int8", io_dtype="int8", per_channel=False,
                                   input_name="x", calib_file=cal)
    assert per_tensor[per_tensor.index("-qt") + 1] == "per-tensor"
    dynamic = o2t.build_command(py, model, out, mode="dynamic", io_dtype="int8", per_channel=True,
                                input_name=None, calib_file=None)
    assert "-odrqt" in dynamic and "-oiqt" not in dynamic and "-cind" not in dynamic
    for mode in ("fp16", "none"):
        cmd = o2t.build_command(py, model, out, mode=mode, io_dtype="int8", per_channel=True, input_name=None,
                                calib_file=None)
        assert not {"-oiqt", "-odrqt", "-cind"} & set(cmd)
    with pytest.raises(InputError):
        o2t.build_command(py, model, out, mode="int4", io_dtype="int8", per_channel=True, input_name="x",
                          calib_file=cal)
    with pytest.raises(InputError):
        o2t.build_command(py, model, out, mode="int8", io_dtype="int16", per_channel=True, input_name="x",
                          calib_file=cal)
    with pytest.raises(InputError):
        o2t.build_command(py, model, out, mode="int8", io_dtype="int8", per_channel=True, input_name="x",
                          calib_file=None)


def test_output_paths_and_names(tmp_path: Path) -> None:
    paths = o2t.output_paths(tmp_path, "net", "int8")
    assert paths == {"float32": tmp_path / "net_float32.tflite",
                     "model": tmp_path / "net_full_integer_quant.tflite"}
    assert o2t.output_paths(tmp_path, "net", "dynamic")["model"].name == "net_dynamic_range_quant.tflite"
    assert o2t.output_paths(tmp_path, "net", "fp16")["model"].name == "net_float16.tflite"
    assert o2t.output_paths(tmp_path, "net", "none")["model"] == paths["float32"]
    assert o2t.tf_input_name("input:0") == "input__0"
    assert o2t.tf_input_name("/stem/x") == "wa/stem/x"
    assert o2t.tf_input_name("input.1") == "input.1"


def test_log_reading() -> None:
    assert o2t.clean_line("\x1b[33mWARNING:\x1b[0m Failed to optimize the onnx file.  \n") == \
        "WARNING: Failed to optimize the onnx file."
    lines = ["real error", "", "W0000 00:00:1795286868.078023    5016 computation_placer.cc:177] noise",
             "E0000 00:00:1795286868.056774    5016 cuda_dnn.cc:8579] more noise", "last words"]
    assert o2t.meaningful_tail(lines) == ["real error", "last words"]
    assert o2t.meaningful_tail(lines, 1) == ["last words"]
    url = ("urllib3.exceptions.MaxRetryError: HTTPSConnectionPool(host='github.com', port=443): Max retries "
           "exceeded with url: /PINTO0309/onnx2tf/releases/download/1.20.4/calibration_image_sample_data_"
           "20x128x128x3_float32.npy")
    assert o2t.download_attempted(["x", url]) and not o2t.download_attempted(lines)
    notes = o2t.log_notes(["WARNING: Failed to optimize the onnx file.",
                           "WARNING: The optimization process for shape estimation is skipped because ..."])
    assert len(notes) == 2 and "onnx-simplifier" in notes[0] and "#929" in notes[1]
    assert o2t.log_notes(["all good"]) == []
    assert o2t.flex_ops(["CONV_2D", "FlexErf", "CUSTOM", "MEAN"]) == ["FlexErf", "CUSTOM"]


def test_pip_progress_reports_packages_and_bytes() -> None:
    p = o2t.PipProgress(expected_distributions=4, expected_bytes=1_000_000)
    lines = [
        "Looking in indexes: https://pypi.org/simple",
        "Collecting onnx2tf==1.29.24",
        "  Downloading onnx2tf-1.29.24-py3-none-any.whl (538 kB)",
        "Progress 0 of 538000",
        "Progress 538000 of 538000",
        "Processing /opt/pypi/files/numpy-1.26.4-cp311-cp311-manylinux2014_x86_64.whl (from onnx2tf==1.29.24)",
        "Collecting h5py==3.11.0",
        "  Using cached h5py-3.11.0-cp311-cp311-manylinux2014_x86_64.whl (0.4 MB)",
        "Requirement already satisfied: setuptools in ./lib/python3.11/site-packages (65.5.0)",
        "Installing collected packages: numpy, h5py, onnx2tf",
        "Successfully installed h5py-3.11.0 numpy-1.26.4 onnx2tf-1.29.24",
    ]
    events = [e for e in (p.feed(line) for line in lines) if e is not None]
    messages = [m for m, _ in events]
    fractions = [f for _, f in events]
    assert messages[0] == "collecting onnx2tf==1.29.24"
    assert messages[1] == "downloading onnx2tf-1.29.24-py3-none-any.whl (538 kB)"
    assert messages[3] == "downloading onnx2tf-1.29.24-py3-none-any.whl (1/1 MB)"
    assert "collecting numpy-1.26.4-cp311-cp311-manylinux2014_x86_64.whl" in messages
    assert messages[-2].startswith("installing 3 packages") and messages[-1] == "installed"
    assert fractions == sorted(fractions) and 0.05 <= fractions[0] and fractions[-1] == 0.95
    assert p.done_bytes == 938_000


def test_tool_env_isolates_and_blocks_the_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    py = tmp_path / "env" / "bin" / "python"
    env = o2t.tool_env(py)
    assert env["PATH"].split(os.pathsep)[0] == str(py.parent)
    assert "PYTHONPATH" not in env and env["PYTHONNOUSERSITE"] == "1"
    assert env["HTTPS_PROXY"] == env["https_proxy"] == env["HTTP_PROXY"] == o2t.BLOCKED_PROXY
    assert env["NO_PROXY"] == ""
    assert o2t.tool_env(py, block_network=False)["HTTPS_PROXY"] == "http://proxy.example:3128"


# --------------------------------------------------------------------------------------------------
# subprocess runner


def test_run_streaming_streams_and_logs(tmp_path: Path) -> None:
    seen: list[str] = []
    log = tmp_path / "run.log"
    code = "import sys\nfor i in range(3): print(f'\\x1b[32mline {i}\\x1b[0m', flush=True)\nsys.exit(3)"
    run = o2t.run_streaming([sys.executable, "-c", code], env=dict(os.environ), timeout_s=60, on_line=seen.append,
                            log=log)
    assert run.returncode == 3 and not run.timed_out
    assert seen == ["line 0", "line 1", "line 2"] == run.tail
    assert "\x1b[32mline 2" in log.read_text()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to watch the grandchild process")
def test_run_streaming_timeout_kills_the_process_group(tmp_path: Path) -> None:
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            "print(p.pid, flush=True)\ntime.sleep(120)")
    t0 = time.perf_counter()
    run = o2t.run_streaming([sys.executable, "-c", code], env=dict(os.environ), timeout_s=2)
    assert run.timed_out and time.perf_counter() - t0 < 30
    grandchild = int(run.tail[0])
    deadline = time.monotonic() + 10
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_run_streaming_missing_command(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="cannot start"):
        o2t.run_streaming([tmp_path / "nope"], env=dict(os.environ), timeout_s=5)


# --------------------------------------------------------------------------------------------------
# ensure_env with fake interpreters

_FAKE_ENV_PYTHON = '''\
#!{python}
"""A fake virtual-environment Python: pip and onnx2tf as the tests script them."""
import json, os, sys
with open("{calls}", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[:3] == ["-m", "pip", "install"]:
    if "pip==" in " ".join(args):
        print("Successfully installed pip-26.3")
        sys.exit(0)
    print("Collecting onnx2tf==1.29.24")
    print("  Downloading onnx2tf-1.29.24-py3-none-any.whl (538 kB)")
    print("Progress 538000 of 538000")
    if {pip_fail}:
        print("ERROR: Could not find a version that satisfies the requirement tensorflow==2.19.0")
        print("ERROR: No matching distribution found for tensorflow==2.19.0")
        sys.exit(1)
    print("Installing collected packages: onnx2tf")
    print("Successfully installed onnx2tf-1.29.24")
    sys.exit(0)
if args[:3] == ["-m", "pip", "check"]:
    print("No broken requirements found.")
    sys.exit(0)
if args[:3] == ["-m", "pip", "list"]:
    print(json.dumps([{{"name": "onnx2tf", "version": "1.29.24"}}, {{"name": "numpy", "version": "1.26.4"}}]))
    sys.exit(0)
if args[:1] == ["-c"]:
    print("onnx2tf 1.29.24")
    sys.exit(0)
sys.exit(99)
'''

_FAKE_BASE_PYTHON = '''\
#!{python}
"""A fake base Python {version}: runs -m venv by writing a venv whose python is the fake env python."""
import os, shutil, sys
from pathlib import Path
args = sys.argv[1:]
if args[:1] == ["-c"]:
    print("{version}")
    sys.exit(0)
if args[:2] == ["-m", "venv"]:
    env = Path(args[2])
    (env / "bin").mkdir(parents=True)
    (env / "pyvenv.cfg").write_text("home = /usr/bin\\n")
    shutil.copy("{env_python}", env / "bin" / "python")
    os.chmod(env / "bin" / "python", 0o755)
    sys.exit(0)
sys.exit(98)
'''


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def _fake_base(tmp_path: Path, version: str = "3.11.7", *, pip_fail: bool = False) -> Path:
    """A fake base Python; the calls to its environments' Python are logged in tmp_path/calls.log."""
    env_py = _script(tmp_path / "fake_env_python", _FAKE_ENV_PYTHON.format(
        python=sys.executable, calls=tmp_path / "calls.log", pip_fail=pip_fail))
    return _script(tmp_path / f"fake_python{version}", _FAKE_BASE_PYTHON.format(
        python=sys.executable, version=version, env_python=env_py))


def _calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def test_ensure_env_builds_then_reuses(tmp_path: Path) -> None:
    base = _fake_base(tmp_path)
    env_dir = tmp_path / "cache" / "onnx2tf-test"
    events: list[tuple[str, float | None]] = []
    py = o2t.ensure_env(env_dir, python=base, progress=lambda m, f: events.append((m, f)))
    assert py == o2t.env_python(env_dir) and py.is_file()
    assert o2t.installed(env_dir)
    marker = o2t.read_marker(env_dir)
    assert marker is not None
    assert marker["requirements"] == list(o2t.REQUIREMENTS) and marker["python"] == "3.11.7"
    assert marker["packages"] == {"onnx2tf": "1.29.24", "numpy": "1.26.4"}
    calls = _calls(tmp_path)
    install = next(c for c in calls if c[:3] == ["-m", "pip", "install"] and "onnx2tf==1.29.24" in c)
    assert [*o2t.PIP_OPTIONS, "--progress-bar", "raw", *o2t.REQUIREMENTS] == install[3:]
    assert any(c[:3] == ["-m", "pip", "install"] and o2t.PIP_REQUIREMENT in c for c in calls)
    assert ["-m", "pip", "check"] in calls
    fractions = [f for _, f in events if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("downloading onnx2tf") for m, _ in events)
    assert (env_dir.parent / "onnx2tf-test.install.log").is_file()

    n = len(calls)
    assert o2t.ensure_env(env_dir, python=base) == py  # complete: reused, nothing run
    assert o2t.ensure_env(env_dir, python=tmp_path / "no-such-python", offline=True) == py
    assert len(_calls(tmp_path)) == n


def test_ensure_env_pip_failure(tmp_path: Path) -> None:
    base = _fake_base(tmp_path, pip_fail=True)
    env_dir = tmp_path / "cache" / "env"
    with pytest.raises(ConversionError) as e:
        o2t.ensure_env(env_dir, python=base)
    text = str(e.value)
    assert "(step: pip install)" in text
    assert "No matching distribution found for tensorflow==2.19.0" in text
    assert "hint:" in text and "pip config list" in text
    assert not env_dir.exists()  # the half-built env is removed
    assert not o2t.installed(env_dir)
    assert "No matching distribution" in (env_dir.parent / "env.install.log").read_text()


def test_ensure_env_rebuilds_a_half_built_env(tmp_path: Path) -> None:
    base = _fake_base(tmp_path)
    env_dir = tmp_path / "env"
    (env_dir / "bin").mkdir(parents=True)
    (env_dir / "pyvenv.cfg").write_text("")
    (env_dir / "leftover").write_text("from a killed pip")
    o2t.ensure_env(env_dir, python=base)
    assert o2t.installed(env_dir) and not (env_dir / "leftover").exists()


def test_ensure_env_refuses_a_folder_that_is_not_a_venv(tmp_path: Path) -> None:
    env_dir = tmp_path / "precious"
    env_dir.mkdir()
    (env_dir / "thesis.tex").write_text("do not delete")
    with pytest.raises(InputError, match="not an edgekit tool environment"):
        o2t.ensure_env(env_dir, python=_fake_base(tmp_path))
    assert (env_dir / "thesis.tex").is_file()


def test_ensure_env_offline_without_env(tmp_path: Path) -> None:
    with pytest.raises(InputError) as e:
        o2t.ensure_env(tmp_path / "env", offline=True)
    assert o2t.INSTALL_COMMAND in str(e.value) and "cannot be built offline" in str(e.value)
    assert not (tmp_path / "env").exists()


@pytest.mark.parametrize("version", ["3.13.1", "3.10.11", "3.9.18"])
def test_ensure_env_checks_the_python_version(tmp_path: Path, version: str) -> None:
    with pytest.raises(InputError, match=f"Python {version}"):
        o2t.ensure_env(tmp_path / "env", python=_fake_base(tmp_path, version))
    assert not (tmp_path / "env").exists()


def test_ensure_env_missing_python(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        o2t.ensure_env(tmp_path / "env", python=tmp_path / "python3.11")


# --------------------------------------------------------------------------------------------------
# onnx_to_tflite with a fake onnx2tf

_FAKE_ONNX2TF = '''\
#!{python}
"""A fake tool-environment Python: `-m onnx2tf` and the inspect script, as spy.json's "behaviour" says."""
import json, os, sys
from pathlib import Path
import numpy as np
spy = Path("{spy}")
behaviour = json.loads((spy / "behaviour.json").read_text())
args = sys.argv[1:]
if args[:2] == ["-m", "onnx2tf"]:
    (spy / "argv.json").write_text(json.dumps(args))
    seen = {{k: os.environ.get(k) for k in ("PATH", "HTTPS_PROXY", "PYTHONPATH")}}
    (spy / "env.json").write_text(json.dumps(seen))
    cwd = Path.cwd()
    (spy / "cwd.json").write_text(json.dumps(sorted(p.name for p in cwd.iterdir())))
    if "-cind" in args:
        np.save(spy / "calib_seen.npy", np.load(args[args.index("-cind") + 2]))
    print("W0000 00:00:1795286868.078023    5016 computation_placer.cc:177] absl noise")
    kind = behaviour["onnx2tf"]
    if kind == "fail":
        print("Traceback (most recent call last):")
        print("  File onnx2tf.py, line 1, in convert")
        print("\\x1b[31mERROR:\\x1b[0m The trace log is below.")
        print("NotImplementedError: Unsupported ONNX op: FancyOp")
        sys.exit(1)
    if kind == "download":
        print("requests.exceptions.ProxyError: HTTPSConnectionPool(host='github.com', port=443): Max retries "
              "exceeded with url: /PINTO0309/onnx2tf/releases/download/1.20.4/x.npy")
        sys.exit(1)
    out = Path(args[args.index("-o") + 1])
    out.mkdir(parents=True)
    stem = Path(args[args.index("-i") + 1]).stem
    (out / f"{{stem}}_float32.tflite").write_bytes(b"fp32")
    print("\\x1b[32mINFO:\\x1b[0m \\x1b[32m1 / 2\\x1b[0m")
    print("\\x1b[32mINFO:\\x1b[0m \\x1b[32m2 / 2\\x1b[0m")
    print("\\x1b[32mFloat32 tflite output complete!\\x1b[0m")
    if kind == "int8_failed":
        print("Traceback (most recent call last):")
        print("RuntimeError: Quantization not yet supported for op: 'FANCY'")
        print("\\x1b[33mWARNING:\\x1b[0m Full INT8 Quantization tflite output failed.")
        sys.exit(0)
    (out / f"{{stem}}_full_integer_quant.tflite").write_bytes(b"int8")
    (out / f"{{stem}}_float16.tflite").write_bytes(b"fp16")
    print("WARNING: The optimization process for shape estimation is skipped because ...")
    sys.exit(0)
if args[:1] == ["-c"] and "EDGEKIT-INSPECT" in args[1]:
    models = json.loads(args[2])
    assert all(Path(p).is_file() for p in models.values())
    inputs = [{{"name": "serving_default_image:0", "shape": behaviour["tflite_input_shape"], "dtype": "int8",
               "scale": 0.0039, "zero_point": -128}}]
    detail = {{"inputs": inputs, "outputs": [], "ops": behaviour.get("ops", ["CONV_2D"])}}
    out = {{"tools": {{"onnx2tf": "1.29.24", "tensorflow": "2.19.0"}}, "models": {{k: detail for k in models}}}}
    if behaviour.get("inspect_error"):
        out["models"]["model"] = {{"error": behaviour["inspect_error"]}}
    print("EDGEKIT-INSPECT " + json.dumps(out))
    sys.exit(0)
sys.exit(97)
'''


@pytest.fixture
def fake_tool(tmp_path: Path) -> tuple[Path, Path]:
    """(the fake env python, its spy folder)."""
    spy = tmp_path / "spy"
    spy.mkdir()
    env_bin = tmp_path / "toolenv" / "bin"
    env_bin.mkdir(parents=True)
    py = _script(env_bin / "python", _FAKE_ONNX2TF.format(python=sys.executable, spy=spy))
    return py, spy


def _behave(spy: Path, **behaviour: Any) -> None:
    (spy / "behaviour.json").write_text(json.dumps({"tflite_input_shape": [1, 16, 16, 3], **behaviour}))


def _calib(n: int = 6) -> np.ndarray:
    return np.random.default_rng(2).random((n, 1, 3, 16, 16), dtype=np.float32)


def test_onnx_to_tflite_with_fake_onnx2tf(tmp_path: Path, fake_tool: tuple[Path, Path]) -> None:
    py, spy = fake_tool
    _behave(spy, onnx2tf="ok")
    model = tiny_cnn(tmp_path / "net.onnx", channels=3, size=16)
    out = tmp_path / "out"
    calib = _calib()
    events: list[tuple[str, float | None]] = []
    r = o2t.onnx_to_tflite(model, out, calib=calib, io_dtype="int8", env_python=py,
                           progress=lambda m, f: events.append((m, f)))
    assert r.model == out / "net_full_integer_quant.tflite" and r.model.read_bytes() == b"int8"
    assert r.float32 == out / "net_float32.tflite" and r.float32.read_bytes() == b"fp32"
    assert sorted(p.name for p in out.iterdir()) == ["net_float32.tflite", "net_full_integer_quant.tflite",
                                                     "onnx2tf.log"]  # no float16, no temp folder
    assert r.input_layout == "NHWC" and r.input_name == "image" and r.onnx_input_shape == (1, 3, 16, 16)
    assert r.version == "1.29.24" and r.tools["tensorflow"] == "2.19.0"
    assert any("#929" in n for n in r.notes) and any("NHWC" in n for n in r.notes)
    assert r.to_dict()["model"] == str(r.model)
    # what onnx2tf got: the calibration samples channels-last, the sample file in its working directory,
    # its bin folder first on PATH and the network blocked
    np.testing.assert_array_equal(np.load(spy / "calib_seen.npy"), calib[:, 0].transpose(0, 2, 3, 1))
    assert o2t.SAMPLE_FILE in json.loads((spy / "cwd.json").read_text())
    env = json.loads((spy / "env.json").read_text())
    assert env["PATH"].split(os.pathsep)[0] == str(py.parent)
    assert env["HTTPS_PROXY"] == o2t.BLOCKED_PROXY and env["PYTHONPATH"] is None
    argv = json.loads((spy / "argv.json").read_text())
    assert argv[argv.index("-cind") + 1] == "image" and "-oiqt" in argv
    fractions = [f for _, f in events if f is not None]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert ("onnx2tf: converting op 2 of 2", pytest.approx(0.6)) in events


def test_onnx_to_tflite_onnx2tf_fails(tmp_path: Path, fake_tool: tuple[Path, Path]) -> None:
    py, spy = fake_tool
    _behave(spy, onnx2tf="fail")
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as e:
        o2t.onnx_to_tflite(tiny_cnn(tmp_path / "net.onnx", channels=3, size=16), out, calib=_calib(),
                           env_python=py)
    text = str(e.value)
    assert "(step: onnx2tf)" in text and "exit code 1" in text
    assert "NotImplementedError: Unsupported ONNX op: FancyOp" in text
    assert "absl noise" not in text and "\x1b[" not in text
    assert "hint:" in text
    assert sorted(p.name for p in out.iterdir()) == ["onnx2tf.log"]  # the log stays, the temp folder goes
    assert "FancyOp" in (out / "onnx2tf.log").read_text()


def test_onnx_to_tflite_int8_failed_with_exit_code_0(tmp_path: Path, fake_tool: tuple[Path, Path]) -> None:
    py, spy = fake_tool
    _behave(spy, onnx2tf="int8_failed")
    with pytest.raises(ConversionError) as e:
        o2t.onnx_to_tflite(tiny_cnn(tmp_path / "net.onnx", channels=3, size=16), tmp_path / "out",
                           calib=_calib(), env_python=py)
    text = str(e.value)
    assert "did not write net_full_integer_quant.tflite" in text
    assert "Quantization not yet supported for op: 'FANCY'" in text


def test_onnx_to_tflite_download_attempt(tmp_path: Path, fake_tool: tuple[Path, Path]) -> None:
    py, spy = fake_tool
    _behave(spy, onnx2tf="download")
    with pytest.raises(ConversionError, match="tried to download"):
        o2t.onnx_to_tflite(tiny_cnn(tmp_path / "net.onnx", channels=3, size=16), tmp_path / "out",
                           calib=_calib(), env_python=py)


@pytest.mark.parametrize(("behaviour", "match"), [
    ({"tflite_input_shape": [1, 3, 16, 16]}, "edgekit expected \\[1, 16, 16, 3\\]"),
    ({"ops": ["CONV_2D", "FlexErf"]}, "FlexErf"),
    ({"inspect_error": "RuntimeError: Regular TensorFlow ops are not supported"}, "LiteRT cannot open"),
])
def test_onnx_to_tflite_checks_the_written_model(tmp_path: Path, fake_tool: tuple[Path, Path],
                                                 behaviour: dict[str, Any], match: str) -> None:
    py, spy = fake_tool
    _behave(spy, onnx2tf="ok", **behaviour)
    with pytest.raises(ConversionError, match=match):
        o2t.onnx_to_tflite(tiny_cnn(tmp_path / "net.onnx", channels=3, size=16), tmp_path / "out",
                           calib=_calib(), env_python=py)


def test_onnx_to_tflite_checks_the_io_dtype(tmp_path: Path, fake_tool: tuple[Path, Path]) -> None:
    py, spy = fake_tool
    _behave(spy, onnx2tf="ok")  # the fake writes int8 inputs whatever -iqd says
    with pytest.raises(ConversionError, match="asked for uint8"):
        o2t.onnx_to_tflite(tiny_cnn(tmp_path / "net.onnx", channels=3, size=16), tmp_path / "out",
                           calib=_calib(), io_dtype="uint8", env_python=py)
    argv = json.loads((spy / "argv.json").read_text())
    assert argv[argv.index("-iqd") + 1] == "uint8" and argv[argv.index("-oqd") + 1] == "uint8"


def test_onnx_to_tflite_input_errors(tmp_path: Path, fake_tool: tuple[Path, Path]) -> None:
    py, _ = fake_tool
    model = tiny_cnn(tmp_path / "net.onnx", channels=3, size=16)
    with pytest.raises(ModelError):
        o2t.onnx_to_tflite(tmp_path / "missing.onnx", tmp_path / "out", calib=_calib(), env_python=py)
    with pytest.raises(InputError, match=o2t.INSTALL_COMMAND):
        o2t.onnx_to_tflite(model, tmp_path / "out", calib=_calib(), env_python=tmp_path / "nope" / "python")
    with pytest.raises(InputError, match="calibration"):
        o2t.onnx_to_tflite(model, tmp_path / "out", calib=None, env_python=py)
    with pytest.raises(InputError):
        o2t.onnx_to_tflite(model, tmp_path / "out", calib=_calib()[:, 0], env_python=py)  # no batch axis
    with pytest.raises(InputError):
        o2t.onnx_to_tflite(model, tmp_path / "out", calib=_calib(), io_dtype="int16", env_python=py)
    two = tmp_path / "two.onnx"
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["c"])], "two",
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4]),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(two))
    with pytest.raises(InputError, match="2 inputs"):
        o2t.onnx_to_tflite(two, tmp_path / "out", calib=np.zeros((2, 1, 4), np.float32), env_python=py)
    flat = tiny_mlp(tmp_path / "mlp.onnx")  # rank 2 is passed as it is
    _behave(fake_tool[1], onnx2tf="ok", tflite_input_shape=[1, 16])
    r = o2t.onnx_to_tflite(flat, tmp_path / "out2", calib=np.zeros((3, 1, 16), np.float32), env_python=py)
    assert r.input_layout == "NC"
    np.testing.assert_array_equal(np.load(fake_tool[1] / "calib_seen.npy"), np.zeros((3, 16), np.float32))


# --------------------------------------------------------------------------------------------------
# end to end: the real onnx2tf environment, a real conversion, LiteRT against onnxruntime


@pytest.mark.slow
@pytest.mark.onnx2tf
def test_onnx2tf_end_to_end_full_int8_in_litert(tmp_path: Path, onnx2tf_python: Path) -> None:
    from converters.onnx_int8 import session
    from converters.tflite_int8 import interpreter

    model = tiny_cnn(tmp_path / "tiny_cnn.onnx", channels=3, size=16)
    rng = np.random.default_rng(0)
    calib = rng.random((64, 1, 3, 16, 16), dtype=np.float32)
    t0 = time.perf_counter()
    r = o2t.onnx_to_tflite(model, tmp_path / "out", calib=calib, io_dtype="int8", env_python=onnx2tf_python)
    print(f"\nonnx2tf conversion took {time.perf_counter() - t0:.1f} s (onnx2tf itself {r.seconds:.1f} s)")
    assert r.version == o2t.ONNX2TF_VERSION and r.tools["tensorflow"] == "2.19.0"
    assert r.input_layout == "NHWC" and r.inputs[0]["shape"] == [1, 16, 16, 3]
    assert r.inputs[0]["dtype"] == "int8" and r.outputs[0]["dtype"] == "int8"
    log = r.log.read_text(encoding="utf-8")
    assert not o2t.download_attempted(log.splitlines())
    assert "Failed to optimize the onnx file" not in log  # onnxsim was found on PATH

    ort = session(model)
    fp32 = interpreter(r.float32)
    int8 = interpreter(r.model)
    i_in, i_out = int8.get_input_details()[0], int8.get_output_details()[0]
    scale, zero = i_in["quantization"]
    out_scale, out_zero = i_out["quantization"]
    agree, n = 0, 50
    for _ in range(n):
        x = rng.random((1, 3, 16, 16), dtype=np.float32)
        ref = ort.run(None, {"image": x})[0]
        nhwc = x.transpose(0, 2, 3, 1)
        fp32.set_tensor(fp32.get_input_details()[0]["index"], nhwc)
        fp32.invoke()
        np.testing.assert_allclose(fp32.get_tensor(fp32.get_output_details()[0]["index"]), ref, atol=1e-4)
        q = np.clip(np.round(nhwc / scale + zero), -128, 127).astype(np.int8)
        int8.set_tensor(i_in["index"], q)
        int8.invoke()
        y = (int8.get_tensor(i_out["index"]).astype(np.float32) - out_zero) * out_scale
        agree += int(np.argmax(y) == np.argmax(ref))
    print(f"argmax agreement full-int8 LiteRT vs onnxruntime fp32: {agree}/{n}")
    assert agree / n >= 0.9, f"argmax agreement {agree}/{n}"
