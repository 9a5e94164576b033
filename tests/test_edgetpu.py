"""converters.edgetpu: the edgetpu_compiler output parser, the compile/CPU-only decision, and the real subprocess
path against a fake ``edgetpu_compiler`` (the real one is x86-64 Debian only and not installed here).

The outputs in tests/data/edgetpu are shaped exactly like the compiler's console output and .log file as shown
in Coral's docs and in google-coral/edgetpu issues (each file names its sources; see its README.md).
"""

from __future__ import annotations

import json
import stat
import sys
import time
from pathlib import Path

import pytest

from converters.edgetpu import (
    AFTER_STOP,
    MAPPED,
    EdgeTpuOp,
    compile_for_edgetpu,
    cpu_only_note,
    decide,
    find_compiler,
    missing_compiler_message,
    parse_compiler_output,
    parse_size,
)
from edge_agent.errors import ConversionError, InputError

DATA = Path(__file__).resolve().parent / "data" / "edgetpu"
MiB, KiB = 1 << 20, 1 << 10
UNSPECIFIED = "Operation is otherwise supported, but not mapped due to some unspecified limitation"


def load(name: str) -> str:
    """A test output without its leading '# source' comment lines."""
    lines = (DATA / name).read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith("#"))


# --------------------------------------------------------------------------------------------------
# sizes


@pytest.mark.parametrize(("text", "expected"), [
    ("0.00B", 0),
    ("12B", 12),
    ("512.00KiB", 512 * KiB),
    ("7.75KiB", 7936),
    ("41.75KiB", 42752),
    ("3.24MiB", round(3.24 * MiB)),
    ("4.50MiB", 4 * MiB + 512 * KiB),
    ("1.5GiB", 3 * (1 << 29)),
    (" 6.02MiB ", round(6.02 * MiB)),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "3.24", "3.24 MB", "3,24MiB", "-1.00B", "1.5gib", "lots"])
def test_parse_size_refuses_what_the_compiler_never_prints(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


# --------------------------------------------------------------------------------------------------
# successful compilations


def test_fully_mapped_v16() -> None:
    r = parse_compiler_output(load("mapped_v16.txt"))
    assert r.compiler_version == "16.0.384591198"
    assert (r.mapped_ops, r.cpu_ops, r.total_ops, r.subgraphs) == (33, 0, 33, 1)
    assert r.on_chip_memory_used_bytes == round(1.18 * MiB)
    assert r.on_chip_memory_remaining_bytes == round(6.55 * MiB)
    assert r.off_chip_memory_bytes == 0
    assert r.first_unmapped_op is None
    assert r.warnings == []
    assert r.output_models == ["model_edgetpu.tflite"]
    assert [o.op for o in r.ops] == ["QUANTIZE", "CONV_2D", "DEPTHWISE_CONV_2D", "MEAN", "FULLY_CONNECTED",
                                     "SOFTMAX"]
    assert all(o.mapped for o in r.ops)
    m = r.models[0]
    assert (m.input_model, m.operation_log, m.compile_ms) == ("model.tflite", "model_edgetpu.log", 412)
    assert m.input_size_bytes == round(1.21 * MiB)
    assert r.summary() == ("edgetpu_compiler 16.0.384591198: 33 of 33 ops run on the Edge TPU; parameters: "
                           "1.18 MiB cached on chip")


def test_mapping_stops_at_the_op_with_a_reason_not_at_the_first_unmapped_row() -> None:
    r = parse_compiler_output(load("stops_v15.txt"))
    assert (r.mapped_ops, r.cpu_ops, r.total_ops) == (69, 34, 103)
    # the table agrees with the summary lines
    assert sum(o.count for o in r.ops if o.mapped) == 69
    assert sum(o.count for o in r.ops if not o.mapped) == 34
    # the first non-mapped row is an op cut off *after* the stop; the table is not in graph order
    first_row = next(o for o in r.ops if not o.mapped)
    assert (first_row.op, first_row.status) == ("CONV_2D", AFTER_STOP)
    assert r.first_unmapped_op == {"op": "TRANSPOSE", "count": 1, "status": "Operation not supported"}
    assert r.cut_off
    assert any("mapping stopped at TRANSPOSE (Operation not supported)" in w for w in r.warnings)
    assert any("ops after that point run on the CPU too" in w for w in r.warnings)
    assert "mapping stopped at TRANSPOSE: Operation not supported" in r.summary()


def test_off_chip_memory_is_reported_and_warned_about() -> None:
    r = parse_compiler_output(load("offchip_v2_1.txt"))
    assert r.compiler_version == "2.1.302470888"
    assert r.off_chip_memory_bytes == round(1.07 * MiB)
    assert r.on_chip_memory_remaining_bytes == 7936
    assert (r.mapped_ops, r.cpu_ops) == (51, 7)
    assert r.first_unmapped_op is not None and r.first_unmapped_op["op"] == "RESIZE_BILINEAR"
    assert any("streamed from the host on every inference" in w for w in r.warnings)
    assert "1.07 MiB streamed from the host" in r.summary()


def test_output_without_the_table_counts_from_the_summary_lines() -> None:
    r = parse_compiler_output(load("no_table_v14.txt"))  # the summary sentence is wrapped over 4 lines here
    assert (r.mapped_ops, r.cpu_ops, r.total_ops) == (6, 18, 24)
    assert r.ops == [] and r.first_unmapped_op is None
    assert any("no operation table" in w and "tiny_int8_edgetpu.log" in w for w in r.warnings)


def test_several_edge_tpu_subgraphs() -> None:
    r = parse_compiler_output(load("multi_subgraph_v15.txt"))
    assert r.subgraphs == 3
    assert (r.mapped_ops, r.cpu_ops) == (23, 2)
    assert any("3 Edge TPU subgraphs" in w for w in r.warnings)
    # two ops have reasons of their own: the first listed is reported, and the warning names both
    assert r.first_unmapped_op is not None and r.first_unmapped_op["op"] == "FULLY_CONNECTED"
    assert any("not in graph order" in w and "SQUEEZE" in w for w in r.warnings)


def test_segments_are_summed_and_listed() -> None:
    r = parse_compiler_output(load("segments_v16.txt"))
    assert r.output_models == ["model_segment_0_of_2_edgetpu.tflite", "model_segment_1_of_2_edgetpu.tflite"]
    assert len(r.models) == 2
    assert (r.mapped_ops, r.cpu_ops, r.total_ops, r.subgraphs) == (142, 2, 144, 2)
    assert r.on_chip_memory_used_bytes == round(6.02 * MiB) + round(2.75 * MiB)
    assert r.on_chip_memory_remaining_bytes == round(1.02 * MiB)  # the tightest Edge TPU
    assert r.models[1].cpu_ops == 2 and r.models[0].cpu_ops is None
    assert any("2 segments" in w for w in r.warnings)
    # DEQUANTIZE/CUSTOM at the end of the graph: nothing was cut off after them
    assert not r.cut_off
    assert any("not mapped: DEQUANTIZE" in w and "no op was cut off" in w for w in r.warnings)


def test_delegate_search_failures_before_a_success_are_warnings() -> None:
    r = parse_compiler_output(load("search_delegate_v16.txt"))
    assert (r.mapped_ops, r.cpu_ops, r.total_ops) == (132, 20, 152)
    assert any("gave up on 2 larger segment(s)" in w and "large activation tensors" in w for w in r.warnings)
    # no row has a reason of its own (the search cut the graph): fall back to the first non-mapped row
    assert r.first_unmapped_op == {"op": "CONV_2D", "count": 8, "status": AFTER_STOP}
    assert any("no op has a reason of its own" in w for w in r.warnings)


def test_the_operation_log_file() -> None:
    r = parse_compiler_output(load("operation_log_v16.log"))
    assert r.compiler_version == "16.0.384591198"
    assert (r.mapped_ops, r.cpu_ops, r.total_ops) == (252, 3, 255)
    assert r.subgraphs is None and r.on_chip_memory_used_bytes is None and r.off_chip_memory_bytes is None
    assert r.models[0].input_model == "detector_int8.tflite"
    assert r.output_models == ["detector_int8_edgetpu.tflite"]
    assert r.first_unmapped_op == {"op": "CUSTOM", "count": 1, "status": "Operation is working on an "
                                                                          "unsupported data type"}


def test_nothing_mapped() -> None:
    r = parse_compiler_output(load("zero_subgraphs_v15.txt"))
    assert (r.mapped_ops, r.cpu_ops, r.subgraphs) == (0, 12, 0)
    assert any("no op was mapped to the Edge TPU" in w for w in r.warnings)


def test_a_table_of_only_the_unmapped_rows() -> None:
    # This short form ("... All other operators were mapped successfully.") was seen once, in a project README
    # quoting compiler 16.0; the parser takes the mapped count from the summary lines.
    text = load("mapped_v16.txt").replace("Total number of operations: 33", "Total number of operations: 35")
    head, _, _ = text.partition("Operator ")
    text = (head + "Number of operations that will run on Edge TPU: 33\nNumber of operations that will run on "
            "CPU: 2\n\nOperator                       Count      Status\n\n"
            f"{'RESHAPE':<31}{1:<11}{UNSPECIFIED}\n{'QUANTIZE':<31}{1:<11}{UNSPECIFIED}\n"
            "... All other operators were mapped successfully. See model_edgetpu.log.\n")
    r = parse_compiler_output(text)
    assert (r.mapped_ops, r.cpu_ops, r.total_ops) == (33, 2, 35)
    assert r.first_unmapped_op is not None and r.first_unmapped_op["op"] == "RESHAPE"
    assert not any("the operation table counts" in w for w in r.warnings)


def test_disagreeing_counts_are_a_warning() -> None:
    text = load("stops_v15.txt").replace("run on Edge TPU: 69", "run on Edge TPU: 70").replace(
        "Total number of operations: 103", "Total number of operations: 104")
    r = parse_compiler_output(text)
    assert r.mapped_ops == 70
    assert any("the operation table counts 69 mapped and 34 CPU ops" in w for w in r.warnings)


def test_report_is_json_ready() -> None:
    r = parse_compiler_output(load("segments_v16.txt"))
    d = json.loads(json.dumps(r.to_dict()))
    assert d["mapped_ops"] == 142 and d["first_unmapped_op"]["op"] == "DEQUANTIZE"
    assert d["ops"][0] == {"op": "QUANTIZE", "count": 1, "status": MAPPED, "mapped": True}
    assert d["output_models"] == r.output_models
    assert d["models"][1]["output_model"] == "model_segment_1_of_2_edgetpu.tflite"
    assert EdgeTpuOp("X", 1, AFTER_STOP).to_dict()["mapped"] is False


def test_crlf_and_indented_output() -> None:
    text = "\r\n".join("   " + line for line in load("mapped_v16.txt").splitlines())
    r = parse_compiler_output(text)
    assert (r.mapped_ops, r.total_ops, len(r.ops)) == (33, 33, 6)


# --------------------------------------------------------------------------------------------------
# failures and garbage


@pytest.mark.parametrize(("name", "message", "hint"), [
    ("fail_not_quantized_v14.txt", "invalid model model.tflite: Model not quantized", "full-integer"),
    ("fail_internal_v15.txt", "Internal compiler error. Aborting!", "second run"),
    ("fail_opcode_version_v16.txt", "Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'",
     "does not know version 12 of FULLY_CONNECTED"),
    ("fail_large_activations_v16.txt", "Compilation failed due to large activation tensors in model.",
     "input resolution"),
    ("fail_second_segment_v16.txt", "failed after compiling 1 segment", "too large for the Edge TPU"),
    ("fail_dynamic_v16.txt", "dynamic-sized tensors", "dynamic shapes"),
    ("fail_timeout_v16.txt", "Compilation timeout.", "-t/--timeout_sec"),
    ("fail_segfault_v16.txt", "Segmentation fault", "crashed"),
])
def test_compiler_failures_raise_with_its_message_and_a_hint(name: str, message: str, hint: str) -> None:
    with pytest.raises(ConversionError) as info:
        parse_compiler_output(load(name))
    e = info.value
    assert message in e.message
    assert e.hint is not None and hint in e.hint
    assert e.exit_code == 1
    assert "(step: edgetpu compile)" in e.message


@pytest.mark.parametrize(("text", "message"), [
    ("", "not edgetpu_compiler output"),
    ("hello\nworld\n", "not edgetpu_compiler output"),
    ("\x00\x01PK\x03\x04 garbage", "not edgetpu_compiler output"),
    ("Edge TPU Compiler version 15.0.340273435\n", "printed its version and nothing else"),
    ("Model compiled successfully in 12 ms.\n\nOn-chip memory used for caching model parameters: lots\n",
     "'On-chip memory used for caching model parameters' is 'lots'"),
    ("Model compiled successfully in 12 ms.\nNumber of Edge TPU subgraphs: one\n", "is 'one'"),
])
def test_garbled_output_is_a_conversion_error(text: str, message: str) -> None:
    with pytest.raises(ConversionError) as info:
        parse_compiler_output(text)
    assert message in info.value.message


def test_truncated_output_that_cannot_say_what_was_mapped() -> None:
    text = load("no_table_v14.txt").split("Number of operations that will run")[0]
    with pytest.raises(ConversionError, match="how many ops were mapped"):
        parse_compiler_output(text)


# --------------------------------------------------------------------------------------------------
# install message and the decision


def test_missing_compiler_message_on_x86_64_linux_says_how_to_install() -> None:
    text = missing_compiler_message("x86_64", "Linux")
    assert "coral-edgetpu-stable main" in text
    assert "sudo apt-get install edgetpu-compiler" in text
    assert "https://packages.cloud.google.com/apt" in text
    assert "https://coral.ai/docs/edgetpu/compiler/" in text


@pytest.mark.parametrize("arch", ["aarch64", "arm64", "armv7l"])
def test_missing_compiler_message_on_arm_says_it_does_not_exist(arch: str) -> None:
    text = missing_compiler_message(arch, "Linux")
    assert f"does not exist for {arch} hosts" in text
    assert "x86-64 Debian/Ubuntu" in text
    assert "apt-get install" not in text


def test_missing_compiler_message_elsewhere() -> None:
    text = missing_compiler_message("x86_64", "Darwin")
    assert "not on Darwin x86_64" in text and "apt-get" not in text


def test_cpu_only_note() -> None:
    note = cpu_only_note("aarch64", "Linux")
    assert "CPU-only" in note and "XNNPACK" in note and "does not exist for aarch64" in note


def test_decide_all_three_cases() -> None:
    compiler = Path("/usr/bin/edgetpu_compiler")
    assert decide(compiler, require_edgetpu=False) == "compile"
    assert decide(compiler, require_edgetpu=True) == "compile"
    assert decide(None, require_edgetpu=False) == "cpu_only"
    with pytest.raises(InputError) as info:
        decide(None, require_edgetpu=True, arch="x86_64", system="Linux")
    assert info.value.exit_code == 2
    assert info.value.message == missing_compiler_message("x86_64", "Linux")
    assert info.value.hint is not None and "--require-edgetpu" in info.value.hint


# --------------------------------------------------------------------------------------------------
# finding the compiler


def _executable(path: Path, text: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_find_compiler_explicit_path(tmp_path: Path) -> None:
    fake = _executable(tmp_path / "my_compiler")
    assert find_compiler(fake) == fake
    assert find_compiler(str(fake)) == fake


def test_find_compiler_explicit_path_problems(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        find_compiler(tmp_path / "nope" / "edgetpu_compiler")
    plain = tmp_path / "edgetpu_compiler"
    plain.write_text("#!/bin/sh\n")
    plain.chmod(0o644)
    with pytest.raises(InputError, match="is not executable"):
        find_compiler(plain)


def test_find_compiler_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_compiler() is None
    with pytest.raises(InputError, match="not on PATH"):
        find_compiler("edgetpu_compiler")
    fake = _executable(bin_dir / "edgetpu_compiler")
    assert find_compiler() == fake
    assert find_compiler("edgetpu_compiler") == fake


# --------------------------------------------------------------------------------------------------
# compile_for_edgetpu against a fake edgetpu_compiler (the real subprocess path)

# It parses the documented flags, records its argv, optionally starts a child (the real compiler forks one) and
# writes *_edgetpu.tflite copies (+ edgetpu-custom-op) and .log files into -o, then prints the configured output.
FAKE = r'''#!@PYTHON@
import json, os, subprocess, sys
cfg = json.load(open(@CONFIG@))
args = sys.argv[1:]
with open(@ARGV@, "w") as f:
    json.dump(args, f)
out_dir, segments, model, i = ".", 1, None, 0
while i < len(args):
    a = args[i]
    if a in ("-o", "-n", "-m", "-t"):
        if a == "-o":
            out_dir = args[i + 1]
        if a == "-n":
            segments = int(args[i + 1])
        i += 2
        continue
    if not a.startswith("-"):
        model = a
    i += 1
if cfg.get("child_pid_file"):
    child = subprocess.Popen(["sleep", "60"])
    with open(cfg["child_pid_file"], "w") as f:
        f.write(str(child.pid))
    child.wait()
stem = os.path.splitext(os.path.basename(model))[0]
if cfg.get("write", True):
    names = [stem + "_edgetpu"] if segments == 1 else [
        "%s_segment_%d_of_%d_edgetpu" % (stem, k, segments) for k in range(segments)]
    data = open(model, "rb").read() + b"edgetpu-custom-op"
    for n in names:
        with open(os.path.join(out_dir, n + ".tflite"), "wb") as f:
            f.write(data)
        with open(os.path.join(out_dir, n + ".log"), "w") as f:
            f.write("Edge TPU Compiler version 16.0.384591198\n")
sys.stdout.write(cfg.get("stdout", ""))
sys.stdout.flush()
sys.stderr.write(cfg.get("stderr", ""))
sys.exit(cfg.get("exit", 0))
'''

TFLITE = b"\x1c\x00\x00\x00TFL3" + bytes(56)


def fake_compiler(tmp_path: Path, **cfg: object) -> tuple[Path, Path]:
    """(fake edgetpu_compiler, file where it records its argv)."""
    folder = tmp_path / "fakebin"
    folder.mkdir(exist_ok=True)
    config, argv = folder / "config.json", folder / "argv.json"
    config.write_text(json.dumps(cfg))
    script = (FAKE.replace("@PYTHON@", sys.executable).replace("@CONFIG@", repr(str(config)))
              .replace("@ARGV@", repr(str(argv))))
    return _executable(folder / "edgetpu_compiler", script), argv


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "work" / "model.tflite"
    path.parent.mkdir()
    path.write_bytes(TFLITE)
    return path


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def test_compile_runs_the_compiler_and_moves_its_output_into_place(tmp_path: Path, model: Path) -> None:
    compiler, argv = fake_compiler(tmp_path, stdout=load("mapped_v16.txt"))
    out = tmp_path / "out"
    path, report = compile_for_edgetpu(model, out, compiler=compiler)
    assert path == out / "model_edgetpu.tflite"
    assert path.read_bytes() == TFLITE + b"edgetpu-custom-op"
    assert _leftovers(out) == ["model_edgetpu.log", "model_edgetpu.tflite"]  # no temporary folder left
    args = json.loads(argv.read_text())
    assert args[0] == "-s" and args[1] == "-o" and args[-1] == str(model.resolve())
    assert Path(args[2]).parent == out and Path(args[2]).name.startswith(".edgetpu-")
    assert (report.mapped_ops, report.cpu_ops, report.compiler_version) == (33, 0, "16.0.384591198")
    assert report.warnings == []


def test_compile_passes_the_documented_flags(tmp_path: Path, model: Path) -> None:
    compiler, argv = fake_compiler(tmp_path, stdout=load("segments_v16.txt"))
    out = tmp_path / "out"
    path, report = compile_for_edgetpu(model, out, compiler=compiler, num_segments=2, min_runtime_version=14,
                                       compiler_timeout_s=300)
    args = json.loads(argv.read_text())
    assert args[3:9] == ["-n", "2", "-m", "14", "-t", "300"]
    assert path == out / "model_segment_0_of_2_edgetpu.tflite"
    assert _leftovers(out) == ["model_segment_0_of_2_edgetpu.log", "model_segment_0_of_2_edgetpu.tflite",
                               "model_segment_1_of_2_edgetpu.log", "model_segment_1_of_2_edgetpu.tflite"]
    assert report.output_models == ["model_segment_0_of_2_edgetpu.tflite", "model_segment_1_of_2_edgetpu.tflite"]


def test_compile_failure_with_exit_1_leaves_nothing(tmp_path: Path, model: Path) -> None:
    # the compiler wrote files before failing: none of them may reach the output folder
    compiler, _ = fake_compiler(tmp_path, stdout="Edge TPU Compiler version 14.1.317412892\n",
                                stderr="Invalid model: model.tflite\nModel not quantized\n", exit=1)
    out = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        compile_for_edgetpu(model, out, compiler=compiler)
    assert "Model not quantized" in info.value.message
    assert "exited with code 1" in info.value.message
    assert info.value.hint is not None and "full-integer" in info.value.hint
    assert _leftovers(out) == []


def test_compile_failure_text_with_exit_0_is_still_a_failure(tmp_path: Path, model: Path) -> None:
    compiler, _ = fake_compiler(tmp_path, stdout=load("fail_internal_v15.txt"), write=False)
    with pytest.raises(ConversionError, match="Internal compiler error"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler)


def test_compile_crash_reports_the_exit_code(tmp_path: Path, model: Path) -> None:
    compiler, _ = fake_compiler(tmp_path, stdout=load("fail_segfault_v16.txt"), write=False, exit=139)
    with pytest.raises(ConversionError) as info:
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler)
    assert "exited with code 139" in info.value.message and "crashed" in (info.value.hint or "")


def test_success_text_with_a_non_zero_exit_is_a_failure(tmp_path: Path, model: Path) -> None:
    compiler, _ = fake_compiler(tmp_path, stdout=load("mapped_v16.txt"), exit=3)
    with pytest.raises(ConversionError, match="exited with code 3 although its output reports a compiled model"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler)
    assert _leftovers(tmp_path / "out") == []


def test_success_without_the_compiled_file(tmp_path: Path, model: Path) -> None:
    compiler, _ = fake_compiler(tmp_path, stdout=load("mapped_v16.txt"), write=False)
    with pytest.raises(ConversionError, match=r"wrote no model_edgetpu\.tflite"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler)


def test_compiled_file_that_is_not_tflite(tmp_path: Path, model: Path) -> None:
    model.write_bytes(b"not a flatbuffer at all")
    compiler, _ = fake_compiler(tmp_path, stdout=load("mapped_v16.txt"))
    with pytest.raises(ConversionError, match=r"not a \.tflite file"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler)
    assert _leftovers(tmp_path / "out") == []


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to check the child process")
def test_compile_timeout_stops_the_compiler_and_its_child(tmp_path: Path, model: Path) -> None:
    pid_file = tmp_path / "child.pid"
    compiler, _ = fake_compiler(tmp_path, stdout=load("mapped_v16.txt"), child_pid_file=str(pid_file))
    t0 = time.monotonic()
    with pytest.raises(ConversionError, match=r"did not finish within 1\.5 s"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler, timeout_s=1.5)
    assert time.monotonic() - t0 < 10
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child)
    assert _leftovers(tmp_path / "out") == []


def test_compile_input_errors(tmp_path: Path, model: Path) -> None:
    compiler, _ = fake_compiler(tmp_path, stdout=load("mapped_v16.txt"))
    with pytest.raises(InputError, match="does not exist"):
        compile_for_edgetpu(tmp_path / "missing.tflite", tmp_path / "out", compiler=compiler)
    with pytest.raises(InputError, match="num_segments"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler, num_segments=0)
    compiler.chmod(0o644)
    with pytest.raises(InputError, match="cannot run"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=compiler)
    assert _leftovers(tmp_path / "out") == []


def test_compile_with_a_compiler_that_cannot_start(tmp_path: Path, model: Path) -> None:
    bogus = tmp_path / "edgetpu_compiler"
    bogus.write_bytes(b"\x7fELF\x02\x01\x01" + bytes(57))  # an ELF header for no machine: Exec format error
    bogus.chmod(0o755)
    with pytest.raises(InputError, match="cannot run on this host"):
        compile_for_edgetpu(model, tmp_path / "out", compiler=bogus)
