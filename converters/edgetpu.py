"""Compile a full-int8 .tflite for the Edge TPU with Google's ``edgetpu_compiler``, and read what it did.

The compiler (https://coral.ai/docs/edgetpu/compiler/) is a closed-source command-line tool for 64-bit x86-64
Debian/Ubuntu hosts only; Coral stopped building it for ARM64 with version 2.1, and 16.0.384591198 (2022) is
its last release. edgekit runs it as a subprocess when it is installed and never needs it otherwise:

* :func:`find_compiler` finds it (``PATH`` or an explicit path).
* :func:`decide` turns "is it there, is the Edge TPU required" into ``"compile"`` or ``"cpu_only"``, or an
  :class:`InputError` (exit 2) when ``--require-edgetpu`` was given and there is no compiler.
* :func:`compile_for_edgetpu` runs ``edgetpu_compiler -s -o DIR MODEL``, parses its console output and moves
  the ``*_edgetpu.tflite`` (and its ``.log``) into place only after both checked out.
* :func:`parse_compiler_output` is the pure parser behind it; it reads the console output of any version
  seen in the wild (2.1, 14.1, 15.0, 16.0) and the ``.log`` file the compiler writes next to the model.

What the compiler reports, and how to read it
---------------------------------------------
After ``Model compiled successfully in N ms.`` it prints the input/output model and sizes, the on-chip memory
used and remaining for caching parameters (about 8 MiB on an Edge TPU), the off-chip memory used for
*streaming* parameters that did not fit (sent from the host on every inference: slower), the number of Edge
TPU subgraphs and of operations, and, when not everything was mapped, "Number of operations that will run on
Edge TPU: N" / "... on CPU: M". With ``-s`` (``--show_operations``) it also prints the operation table
(``Operator  Count  Status``) that it always writes to the ``.log`` file.

**Where mapping stops.** By default (without ``-a``) the compiler makes one Edge TPU subgraph: it maps ops from
the start of the graph until the first op it cannot map; that op and every op after it run on the CPU, even
those the Edge TPU supports (a maintainer's explanation in google-coral/edgetpu#461; Coral's "TensorFlow models
on the Edge TPU" page says the same). Those later ops are listed with the status "More than one subgraph is not
supported". The table is grouped by (operator, status) and is **not** in graph order (google-coral/edgetpu#342
lists such rows before the op that caused them), so the first non-mapped row is not, in general, where mapping
stopped. ``first_unmapped_op`` is
therefore the first row whose status gives a reason of its own (anything but "Mapped to Edge TPU" and "More
than one subgraph is not supported"); only when no row has one (e.g. the ops were cut off by intermediate
tensors) is it the first non-mapped row. When several rows give a reason of their own, the log cannot tell
which came first in the graph: the first listed is reported and a warning names them all. Ops that cannot be
mapped at the very start or end of the graph (a float QUANTIZE/DEQUANTIZE, a CUSTOM post-processing op) do not
split the model; they just run on the CPU before or after the Edge TPU subgraph.

Sizes are printed with two decimals in binary units ("3.24MiB"), so the byte counts are exact only to about
half a unit in the last place (±5 KiB for MiB figures).

A CPU-only bundle
-----------------
Without the compiler (or on an ARM host, where it does not exist) a bundle for a Coral profile still holds the
uncompiled full-int8 model. On the device it runs on the CPU with LiteRT, which applies XNNPACK to full-int8
models; the Edge TPU is not used (an uncompiled model has no ``edgetpu-custom-op`` for libedgetpu to run). The
report says so (:func:`cpu_only_note`), and ``--require-edgetpu`` turns it into an error instead.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edge_agent.errors import ConversionError, InputError

COMPILER = "edgetpu_compiler"
MAPPED = "Mapped to Edge TPU"
AFTER_STOP = "More than one subgraph is not supported"
DOCS_URL = "https://coral.ai/docs/edgetpu/compiler/"
COLAB_URL = "https://colab.research.google.com/github/google-coral/tutorials/blob/master/compile_for_edgetpu.ipynb"
# Coral's documented steps, with a keyring file in place of the deprecated `apt-key add` (as in
# firmware_notes/coral-usb.md for the runtime).
INSTALL_STEPS = (
    "curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo gpg --dearmor -o "
    "/usr/share/keyrings/coral-edgetpu.gpg\n"
    'echo "deb [signed-by=/usr/share/keyrings/coral-edgetpu.gpg] https://packages.cloud.google.com/apt '
    'coral-edgetpu-stable main" | sudo tee /etc/apt/sources.list.d/coral-edgetpu.list\n'
    "sudo apt-get update && sudo apt-get install edgetpu-compiler"
)

Decision = Literal["compile", "cpu_only"]

_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB)")
_VERSION = re.compile(r"Edge TPU Compiler version (\S+)")
_COMPILED = re.compile(r"Model compiled successfully in (\d+) ms\.?")
_HEADER = re.compile(r"Operator\s+Count\s+Status")
_ROW = re.compile(r"(\S+)\s+(\d+)\s+(\S.*)")
_FIELD = re.compile(r"([A-Za-z][A-Za-z -]*?):\s*(.*)")
_CRASHES = ("Segmentation fault", "core dumped", "terminating with uncaught", "Exec format error",
            "cannot execute binary file")
_ARM = ("aarch64", "arm64", "armv6l", "armv7l", "armv8l", "arm")
_X86_64 = ("x86_64", "amd64")

# "Key: value" lines of a compiled model (console) or of the .log file ("Input:", "Output:").
_FIELDS: dict[str, tuple[str, str]] = {
    "input model": ("input_model", "name"),
    "input": ("input_model", "name"),
    "output model": ("output_model", "name"),
    "output": ("output_model", "name"),
    "operation log": ("operation_log", "name"),
    "input size": ("input_size_bytes", "size"),
    "output size": ("output_size_bytes", "size"),
    "on-chip memory used for caching model parameters": ("on_chip_memory_used_bytes", "size"),
    "on-chip memory remaining for caching model parameters": ("on_chip_memory_remaining_bytes", "size"),
    "off-chip memory used for streaming uncached model parameters": ("off_chip_memory_bytes", "size"),
    "number of edge tpu subgraphs": ("subgraphs", "int"),
    "total number of operations": ("total_ops", "int"),
    "number of operations that will run on edge tpu": ("mapped_ops", "int"),
    "number of operations that will run on cpu": ("cpu_ops", "int"),
}

# (pattern in the compiler's output, hint); the first match gives the hint of a failure.
_FAILURE_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"Model not quantized"),
     "the Edge TPU runs only full-integer models: convert with quantization mode int8 (the Coral profiles' "
     "default) and without --allow-float-ops, so that every op and tensor is int8/uint8"),
    (re.compile(r"Didn't find op for builtin opcode '([^']+)' version '(\d+)'"),
     "this edgetpu_compiler does not know version {2} of {1}: newer TensorFlow converters write op versions "
     "that the compiler (16.0, its last release) predates (google-coral/edgetpu#631, #845); the model cannot be "
     "compiled as it is: convert it with an older TensorFlow in its own environment, or avoid that op"),
    (re.compile(r"Model could not be parsed"),
     "the compiler could not read this .tflite (often an op version newer than the compiler); check that the "
     "model loads in LiteRT, and look at the ERROR lines above"),
    (re.compile(r"large activation tensors"),
     "an intermediate tensor is too large for the Edge TPU: lower the model's input resolution or the width of "
     "its largest layers"),
    (re.compile(r"dynamic-sized tensors"),
     "the model has dynamic shapes; the Edge TPU needs every dimension fixed (edgekit fixes the batch to 1: "
     "export the model with fixed spatial dimensions too)"),
    (re.compile(r"Compilation timeout"),
     "the compiler's own timer ran out (180 s by default): pass a longer compiler timeout (-t/--timeout_sec), "
     "or lower the input resolution"),
    (re.compile(r"Internal compiler error"),
     "the compiler gives no detail; known causes are a model too large for the Edge TPU (lower the input "
     "resolution) and compiler bugs, and a second run has been seen to succeed (google-coral/edgetpu#211): "
     f"run it again, or try Coral's web compiler ({COLAB_URL})"),
    (re.compile(r"Segmentation fault|core dumped|terminating with uncaught exception"),
     f"the compiler crashed; run it again, or try Coral's web compiler ({COLAB_URL})"),
    (re.compile(r"Exec format error|cannot execute binary file"),
     "this edgetpu_compiler is an x86-64 binary and cannot run on this host: compile on an x86-64 Debian/Ubuntu "
     "machine"),
)
_GENERIC_HINT = (f"read the compiler's output above; Coral's compiler page ({DOCS_URL}) and the operation table "
                 "(edgetpu_compiler -s) say which ops the Edge TPU supports")


# --------------------------------------------------------------------------------------------------
# the report


def parse_size(text: str) -> int:
    """Bytes in a size as the compiler prints it: "3.24MiB", "512.00KiB", "0.00B", "1.5GiB".

    Units are binary (KiB = 1024 B). Raises ``ValueError`` for anything else (no sign, no decimal comma, no
    SI units: the compiler prints none of those).
    """
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a size like '3.24MiB': {text!r}")
    return round(float(m.group(1)) * _UNITS[m.group(2)])


@dataclass(frozen=True)
class EdgeTpuOp:
    """One row of the operation table: an operator, how many of it, and what the compiler did with them."""

    op: str
    count: int
    status: str

    @property
    def mapped(self) -> bool:
        return self.status.startswith(MAPPED)

    @property
    def stop_reason(self) -> bool:
        """True when the status is a reason of its own (not mapped, and not just "after the stop")."""
        return not self.mapped and not self.status.startswith(AFTER_STOP)

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "count": self.count, "status": self.status, "mapped": self.mapped}


@dataclass
class EdgeTpuModel:
    """One compiled model: a "Model compiled successfully" block (one per segment with ``-n``), or a .log file.

    File names are as the compiler printed them, without their folder. Fields the output did not hold are None.
    """

    input_model: str | None = None
    output_model: str | None = None
    operation_log: str | None = None
    compile_ms: int | None = None
    input_size_bytes: int | None = None
    output_size_bytes: int | None = None
    on_chip_memory_used_bytes: int | None = None
    on_chip_memory_remaining_bytes: int | None = None
    off_chip_memory_bytes: int | None = None
    subgraphs: int | None = None
    total_ops: int | None = None
    mapped_ops: int | None = None
    cpu_ops: int | None = None
    ops: list[EdgeTpuOp] = field(default_factory=list)
    table_lists_all: bool = True  # False after "... All other operators were mapped successfully."
    not_all_mapped: bool = False  # the "not all operations are supported" sentence was printed

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in vars(self).items() if k not in ("ops", "table_lists_all", "not_all_mapped")}
        out["ops"] = [o.to_dict() for o in self.ops]
        return out


@dataclass
class EdgeTpuReport:
    """What ``edgetpu_compiler`` did with a model, read from its output.

    ``mapped_ops`` / ``cpu_ops`` / ``total_ops`` count operations; with several segments (``-n``) they,
    ``subgraphs`` and the used memory figures are sums over the segments (each segment runs on its own Edge
    TPU) and ``on_chip_memory_remaining_bytes`` is the smallest. Memory fields are None when the text had no
    such line (a ``.log`` file). ``first_unmapped_op`` is ``{"op", "count", "status"}`` of the op where
    mapping stopped (see the module docstring), or None when every op was mapped. ``warnings`` are plain
    English, for the conversion report's notes.
    """

    compiler_version: str | None
    mapped_ops: int
    cpu_ops: int
    total_ops: int
    subgraphs: int | None
    on_chip_memory_used_bytes: int | None
    on_chip_memory_remaining_bytes: int | None
    off_chip_memory_bytes: int | None
    first_unmapped_op: dict[str, Any] | None
    ops: list[EdgeTpuOp]
    warnings: list[str]
    models: list[EdgeTpuModel]

    @property
    def cut_off(self) -> bool:
        """True when ops after the first unmapped one run on the CPU only because they come after it."""
        return any(o.status.startswith(AFTER_STOP) for o in self.ops)

    @property
    def output_models(self) -> list[str]:
        """File names of the compiled models, in segment order."""
        return [m.output_model for m in self.models if m.output_model]

    def to_dict(self) -> dict[str, Any]:
        return {
            "compiler_version": self.compiler_version,
            "mapped_ops": self.mapped_ops,
            "cpu_ops": self.cpu_ops,
            "total_ops": self.total_ops,
            "subgraphs": self.subgraphs,
            "on_chip_memory_used_bytes": self.on_chip_memory_used_bytes,
            "on_chip_memory_remaining_bytes": self.on_chip_memory_remaining_bytes,
            "off_chip_memory_bytes": self.off_chip_memory_bytes,
            "first_unmapped_op": dict(self.first_unmapped_op) if self.first_unmapped_op else None,
            "ops": [o.to_dict() for o in self.ops],
            "warnings": list(self.warnings),
            "output_models": self.output_models,
            "models": [m.to_dict() for m in self.models],
        }

    def summary(self) -> str:
        """One sentence for the conversion report's notes."""
        who = f"edgetpu_compiler {self.compiler_version}" if self.compiler_version else "edgetpu_compiler"
        text = f"{who}: {self.mapped_ops} of {self.total_ops} ops run on the Edge TPU"
        if self.cpu_ops:
            text += f", {self.cpu_ops} on the CPU"
            if self.first_unmapped_op:
                how = "mapping stopped at" if self.cut_off else "not mapped:"
                text += f" ({how} {self.first_unmapped_op['op']}: {self.first_unmapped_op['status']})"
        if self.on_chip_memory_used_bytes is not None:
            text += f"; parameters: {_human(self.on_chip_memory_used_bytes)} cached on chip"
            if self.off_chip_memory_bytes:
                text += f", {_human(self.off_chip_memory_bytes)} streamed from the host on every inference"
        return text


def _human(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.2f} {unit}"
    return f"{n} B"


# --------------------------------------------------------------------------------------------------
# the parser


@dataclass
class _Scan:
    version: str | None = None
    models: list[EdgeTpuModel] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # ("ok" | "fail", detail), in order
    errors: list[str] = field(default_factory=list)  # "ERROR: ..." and "Compilation failed: ..." texts
    compiler_warnings: list[str] = field(default_factory=list)


def _scan(text: str) -> _Scan:
    s = _Scan()
    current: EdgeTpuModel | None = None
    in_table = False
    invalid: str | None = None  # "Invalid model: X": the reason is on the next non-empty line
    for raw in text.splitlines():
        line = raw.strip()
        if in_table:
            row = _ROW.fullmatch(line) if line else None
            if not line:
                continue
            if row is not None and current is not None:
                current.ops.append(EdgeTpuOp(row.group(1), int(row.group(2)), row.group(3).strip()))
                continue
            in_table = False
            if line.startswith("... All other operators were mapped successfully") and current is not None:
                current.table_lists_all = False
                continue
        if not line:
            continue
        if invalid is not None:
            s.events.append(("fail", f"invalid model {invalid}: {line}"))
            invalid = None
            continue
        if (m := _VERSION.match(line)) is not None:
            s.version = s.version or m.group(1)
        elif (m := _COMPILED.match(line)) is not None:
            current = EdgeTpuModel(compile_ms=int(m.group(1)))
            s.models.append(current)
            s.events.append(("ok", "model compiled"))
        elif _HEADER.fullmatch(line):
            if current is None:
                current = EdgeTpuModel()
                s.models.append(current)
            in_table = True
        elif line.startswith("Model successfully compiled but not all operations"):
            if current is not None:
                current.not_all_mapped = True
        elif line.startswith("Invalid model:"):
            invalid = line.partition(":")[2].strip()
        elif line.startswith("Internal compiler error"):
            s.events.append(("fail", "Internal compiler error. Aborting!"))
        elif line.startswith("Compilation failed:"):
            s.errors.append(line.partition(":")[2].strip())
        elif line.startswith("Compilation timeout"):
            s.errors.append(line)
        elif line.startswith("Compilation failed!"):
            s.events.append(("fail", "compilation failed"))
        elif line.startswith("Compilation succeeded!"):
            s.events.append(("ok", "compilation succeeded"))
        elif line.startswith("ERROR:"):
            error = line.partition(":")[2].strip()
            if not error.startswith("Restored original execution plan"):  # says only that it gave up
                s.errors.append(error)
        elif line.startswith("Warning:"):
            s.compiler_warnings.append(line.partition(":")[2].strip())
        elif any(crash in line for crash in _CRASHES):
            s.errors.append(line)
            s.events.append(("fail", "the compiler crashed or could not start"))
        elif (m := _FIELD.fullmatch(line)) is not None and m.group(1).lower() in _FIELDS:
            name, kind = _FIELDS[m.group(1).lower()]
            if current is None or (name == "input_model" and current.input_model is not None):
                current = EdgeTpuModel()  # a .log file ("Input: ..."), or a pasted excerpt
                s.models.append(current)
            setattr(current, name, _field_value(m.group(1), m.group(2), kind))
    if invalid is not None:
        s.events.append(("fail", f"invalid model {invalid}"))
    return s


def _field_value(key: str, value: str, kind: str) -> str | int:
    value = value.strip()
    try:
        if kind == "size":
            return parse_size(value)
        if kind == "int":
            return int(value)
    except ValueError:
        raise ConversionError(f"cannot read the edgetpu_compiler output: {key!r} is {value!r}",
                              hint="is this the output of edgetpu_compiler? (compare with "
                                   f"{DOCS_URL})") from None
    return Path(value).name if value else value


def _failure(s: _Scan, text: str) -> ConversionError:
    """The error for a failed compilation: the compiler's own words, and a hint that matches them."""
    details: list[str] = []
    for what in [*(d for kind, d in s.events if kind == "fail"), *s.errors]:
        if what not in details and what not in ("compilation failed", "model compiled"):
            details.append(what)
    # put the most specific first: an "Invalid model" reason or a "Compilation failed:" reason
    details.sort(key=lambda d: 0 if d.startswith("invalid model") else 1)
    who = f"edgetpu_compiler {s.version}" if s.version else "edgetpu_compiler"
    if s.models:
        done = len(s.models)
        lead = f"{who} failed after compiling {done} segment{'s' if done > 1 else ''}"
    else:
        lead = f"{who} failed"
    message = f"{lead} (step: edgetpu compile): {'; '.join(details) or 'Compilation failed! (no reason given)'}"
    hint = _GENERIC_HINT
    for pattern, template in _FAILURE_HINTS:
        if (m := pattern.search(text)) is not None:
            hint = template.format(*([m.group(0), *m.groups()]))
            break
    return ConversionError(message, hint=hint)


def _counts(m: EdgeTpuModel, warnings: list[str]) -> tuple[int, int, int]:
    """(mapped, cpu, total) ops of one compiled model, from the summary lines or the table."""
    table_mapped = sum(o.count for o in m.ops if o.mapped)
    table_cpu = sum(o.count for o in m.ops if not o.mapped)
    total = m.total_ops if m.total_ops is not None else table_mapped + table_cpu
    if m.mapped_ops is not None and m.cpu_ops is not None:
        mapped, cpu = m.mapped_ops, m.cpu_ops
        if m.ops and m.table_lists_all and (table_mapped, table_cpu) != (mapped, cpu):
            warnings.append(f"the operation table counts {table_mapped} mapped and {table_cpu} CPU ops, the "
                            f"summary {mapped} and {cpu}; the summary is reported")
    elif m.ops and m.table_lists_all:
        mapped, cpu = table_mapped, table_cpu
    elif m.ops:  # only the non-mapped rows were listed
        mapped, cpu = total - table_cpu, table_cpu
    elif m.total_ops is not None and not m.not_all_mapped:
        mapped, cpu = m.total_ops, 0  # the compiler prints the op counts only when not all were mapped
    else:
        raise ConversionError("cannot tell from the edgetpu_compiler output how many ops were mapped to the "
                              "Edge TPU: it has neither the operation counts nor the operation table",
                              hint="run the compiler with -s (--show_operations), or parse its .log file")
    if mapped + cpu != total:
        warnings.append(f"the compiler reports {total} ops in total but {mapped} + {cpu} mapped and CPU ops")
    return mapped, cpu, total


def _first_unmapped(ops: list[EdgeTpuOp], warnings: list[str]) -> dict[str, Any] | None:
    reasons = [o for o in ops if o.stop_reason]
    unmapped = [o for o in ops if not o.mapped]
    if not unmapped:
        return None
    first = reasons[0] if reasons else unmapped[0]
    if len({(o.op, o.status) for o in reasons}) > 1:
        listed = "; ".join(f"{o.op} x{o.count} ({o.status})" for o in reasons)
        warnings.append("several ops could not be mapped for a reason of their own, and the operation table is "
                        "grouped by operator, not in graph order, so it cannot tell which came first in the "
                        f"graph: {listed}")
    if not reasons:
        warnings.append(f"no op has a reason of its own for not being mapped; the ops listed as '{AFTER_STOP}' "
                        "come after the end of the Edge TPU subgraph (e.g. chosen intermediate tensors)")
    return {"op": first.op, "count": first.count, "status": first.status}


def _total(values: list[int | None], how: str = "sum") -> int | None:
    if not values or any(v is None for v in values):
        return None
    known = [v for v in values if v is not None]
    return min(known) if how == "min" else sum(known)


def parse_compiler_output(text: str) -> EdgeTpuReport:
    """Read ``edgetpu_compiler``'s console output (stdout and stderr together), or its ``.log`` file.

    Pure: no I/O. A failed compilation (``Model not quantized``, ``Internal compiler error``, ``Compilation
    failed!`` after the last success, ...) raises :class:`ConversionError` with the compiler's message and a
    hint; so does text that is not compiler output at all.
    """
    s = _scan(text)
    last = s.events[-1][0] if s.events else None
    if last == "fail" or (not s.models and (s.errors or any(p.search(text) for p, _ in _FAILURE_HINTS))):
        raise _failure(s, text)
    if not s.models:
        if s.version is not None:
            raise ConversionError(f"edgetpu_compiler {s.version} printed its version and nothing else: no model "
                                  "was compiled (step: edgetpu compile)",
                                  hint="the compiler has been seen to exit like this with -n/--num_segments on "
                                       "some models (google-coral/edgetpu#411); compile without segments")
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
        raise ConversionError("this is not edgetpu_compiler output: no 'Edge TPU Compiler version', no compiled "
                              f"model, no operation table (it starts with {first[:80]!r})",
                              hint=f"compare with the output shown on {DOCS_URL}")
    warnings: list[str] = []
    failed_before = [d for kind, d in s.events[:-1] if kind == "fail"]
    if failed_before:
        reasons = sorted(set(s.errors)) or ["no reason given"]
        warnings.append(f"the compiler gave up on {len(failed_before)} larger segment(s) before this one "
                        f"compiled (delegate search): {'; '.join(reasons)}")
    warnings.extend(f"edgetpu_compiler: {w}" for w in s.compiler_warnings)
    counts = [_counts(m, warnings) for m in s.models]
    ops = [o for m in s.models for o in m.ops]
    mapped, cpu, total = (sum(c[i] for c in counts) for i in range(3))
    report = EdgeTpuReport(
        compiler_version=s.version,
        mapped_ops=mapped,
        cpu_ops=cpu,
        total_ops=total,
        subgraphs=_total([m.subgraphs for m in s.models]),
        on_chip_memory_used_bytes=_total([m.on_chip_memory_used_bytes for m in s.models]),
        on_chip_memory_remaining_bytes=_total([m.on_chip_memory_remaining_bytes for m in s.models], "min"),
        off_chip_memory_bytes=_total([m.off_chip_memory_bytes for m in s.models]),
        first_unmapped_op=None,
        ops=ops,
        warnings=warnings,
        models=s.models,
    )
    _explain(report, warnings)
    return report


def _explain(r: EdgeTpuReport, warnings: list[str]) -> None:
    """The plain-English warnings a user should read about a compiled model."""
    if len(r.models) > 1:
        warnings.append(f"the model was compiled into {len(r.models)} segments, one per Edge TPU (pipelining); "
                        "each segment needs its own Edge TPU")
    r.first_unmapped_op = _first_unmapped(r.ops, warnings)
    if r.subgraphs == 0 or (r.total_ops and r.mapped_ops == 0):
        warnings.append("no op was mapped to the Edge TPU (0 Edge TPU subgraphs): the compiled model runs "
                        "entirely on the CPU")
    elif r.cpu_ops:
        where = ""
        first = r.first_unmapped_op
        if first is not None and r.cut_off:
            where = f"; mapping stopped at {first['op']} ({first['status']})"
        elif first is not None:
            plural = "s" if (r.subgraphs or 0) > 1 else ""
            where = (f"; not mapped: {first['op']} ({first['status']}); no op was cut off after it, so the CPU "
                     f"ops sit before or after the Edge TPU subgraph{plural} (e.g. float I/O conversion or "
                     "post-processing)")
        elif not r.ops:
            log = next((m.operation_log for m in r.models if m.operation_log), None)
            where = ("; the output has no operation table: run the compiler with -s, or read "
                     f"{log or 'its .log file'}")
        warnings.append(f"{r.cpu_ops} of {r.total_ops} ops run on the CPU, not the Edge TPU{where}")
        if r.cut_off:
            warnings.append(f"ops after that point run on the CPU too ('{AFTER_STOP}'), even those the Edge TPU "
                            "supports: the compiler makes one Edge TPU subgraph")
    if r.subgraphs is not None and r.subgraphs > 1 and len(r.models) == 1:
        warnings.append(f"{r.subgraphs} Edge TPU subgraphs: every switch between the CPU and the Edge TPU costs a "
                        "transfer of the tensors in between")
    if r.off_chip_memory_bytes:
        warnings.append(f"{_human(r.off_chip_memory_bytes)} of parameters do not fit the Edge TPU's on-chip "
                        "memory and are streamed from the host on every inference (slower); a smaller model fits")


# --------------------------------------------------------------------------------------------------
# finding, deciding, running


def find_compiler(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The ``edgetpu_compiler`` to run: ``path`` when given (a path, or a name looked up on PATH), else the one
    on PATH, else None. An explicit path that is missing or not executable is an :class:`InputError`."""
    if path is None:
        found = shutil.which(COMPILER)
        return Path(found) if found else None
    text = os.fspath(path)
    if os.sep not in text and (os.altsep is None or os.altsep not in text):
        found = shutil.which(text)
        if found is None:
            raise InputError(f"edgetpu compiler {text!r} is not on PATH", hint=missing_compiler_message())
        return Path(found)
    p = Path(text)
    if not p.is_file():
        raise InputError(f"edgetpu compiler {p} does not exist", hint="give the path to edgetpu_compiler "
                         "(usually /usr/bin/edgetpu_compiler)")
    if not os.access(p, os.X_OK):
        raise InputError(f"edgetpu compiler {p} is not executable", hint=f"chmod +x {p}")
    return p


def missing_compiler_message(arch: str | None = None, system: str | None = None) -> str:
    """How to get ``edgetpu_compiler`` on this host (``arch`` = ``platform.machine()``, ``system`` =
    ``platform.system()`` by default). It exists for 64-bit x86-64 Debian/Ubuntu only (Coral's compiler page)."""
    arch = (arch or platform.machine()).lower()
    system = system or platform.system()
    head = "edgetpu_compiler (Google's Edge TPU Compiler) is not installed, or not on PATH."
    if arch in _ARM:
        return (f"{head} It does not exist for {arch} hosts: Coral builds it for 64-bit x86-64 Debian/Ubuntu only "
                "(no ARM64 builds since compiler 2.1). Compile on an x86-64 Debian/Ubuntu machine (run edgekit "
                f"convert there), or with Coral's web compiler ({COLAB_URL}). See {DOCS_URL}")
    if arch in _X86_64 and system == "Linux":
        return (f"{head} Install it from Coral's apt repository ({DOCS_URL}) on a 64-bit Debian/Ubuntu host:\n"
                f"{INSTALL_STEPS}\n"
                "then check with `edgetpu_compiler --version`, or give its path with --edgetpu-compiler. If apt "
                "reports a key error, take the current key location from Coral's page.")
    return (f"{head} It runs only on 64-bit x86-64 Debian/Ubuntu Linux, not on {system} {arch}: use such a "
            f"machine or container, or Coral's web compiler ({COLAB_URL}). See {DOCS_URL}")


def cpu_only_note(arch: str | None = None, system: str | None = None) -> str:
    """The note a CPU-only bundle for an Edge TPU profile carries in its report."""
    return ("the model was not compiled for the Edge TPU, so this bundle is CPU-only: on the device the full-int8 "
            "model runs on the CPU with LiteRT (which applies XNNPACK to full-int8 models), and the Edge TPU is "
            "not used. " + missing_compiler_message(arch, system))


def decide(compiler: Path | None, require_edgetpu: bool, *, arch: str | None = None,
           system: str | None = None) -> Decision:
    """``"compile"`` when there is a compiler; ``"cpu_only"`` when there is none and the Edge TPU is not
    required (the bundle is then CPU-only and says so, see :func:`cpu_only_note`); an :class:`InputError`
    (exit 2) when there is none and ``--require-edgetpu`` was given."""
    if compiler is not None:
        return "compile"
    if require_edgetpu:
        raise InputError(missing_compiler_message(arch, system),
                         hint="install edgetpu_compiler or give its path with --edgetpu-compiler; or drop "
                              "--require-edgetpu to write a CPU-only bundle")
    return "cpu_only"


def _command(compiler: Path, model: Path, out_dir: Path, num_segments: int | None,
             min_runtime_version: int | None, compiler_timeout_s: int | None) -> list[str]:
    """The documented flags: -s/--show_operations, -o/--out_dir, -n/--num_segments,
    -m/--min_runtime_version, -t/--timeout_sec (16.0 only)."""
    cmd = [str(compiler), "-s", "-o", str(out_dir)]
    if num_segments is not None and num_segments > 1:
        cmd += ["-n", str(num_segments)]
    if min_runtime_version is not None:
        cmd += ["-m", str(min_runtime_version)]
    if compiler_timeout_s is not None:
        cmd += ["-t", str(compiler_timeout_s)]
    return [*cmd, str(model)]


def _run(cmd: list[str], cwd: Path, timeout_s: float) -> tuple[str, int]:
    """Run the compiler in its own process group; (stdout + stderr in order, exit code)."""
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)
    except OSError as e:
        if e.errno == errno.ENOEXEC:
            raise InputError(f"{cmd[0]} cannot run on this host: {e.strerror}",
                             hint=missing_compiler_message()) from e
        raise InputError(f"cannot run {cmd[0]}: {e.strerror or e}",
                         hint="check the path given with --edgetpu-compiler and its permissions") from e
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # the compiler forks a child process for the compilation: stop the whole group we started
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise ConversionError(f"edgetpu_compiler did not finish within {timeout_s:g} s and was stopped "
                              "(step: edgetpu compile)",
                              hint="large models take longer: allow more time, or lower the input "
                                   "resolution") from None
    return out, proc.returncode


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _check_tflite(path: Path, report: EdgeTpuReport) -> None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConversionError(f"edgetpu_compiler reported success but wrote no {path.name} "
                              "(step: edgetpu compile)",
                              hint="run the compiler by hand to see what it does") from None
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ConversionError(f"edgetpu_compiler wrote {path.name}, which is not a .tflite file "
                              "(step: edgetpu compile)", hint="run the compiler by hand to see what it does")
    if report.mapped_ops and b"edgetpu-custom-op" not in data:
        report.warnings.append(f"{path.name} holds no edgetpu-custom-op although the compiler reports "
                               f"{report.mapped_ops} mapped ops")


def compile_for_edgetpu(model: Path, out_dir: Path, *, compiler: Path, timeout_s: float = 600,
                        num_segments: int | None = None, min_runtime_version: int | None = None,
                        compiler_timeout_s: int | None = None) -> tuple[Path, EdgeTpuReport]:
    """Compile the full-int8 ``model`` with ``compiler``; (path of the compiled model in ``out_dir``, report).

    Runs ``compiler -s -o TMP [-n N] [-m V] [-t T] model`` in a fresh folder inside ``out_dir``, parses the
    output, checks every ``*_edgetpu.tflite`` it reports (a .tflite file, holding ``edgetpu-custom-op`` when
    ops were mapped), and only then renames them and their ``.log`` files into ``out_dir``. With
    ``num_segments`` > 1 the compiler writes one ``*_segment_K_of_N_edgetpu.tflite`` per segment: the path
    returned is the first, and ``report.output_models`` names them all. ``timeout_s`` bounds the whole run
    (the process group is killed after it); ``compiler_timeout_s`` is the compiler's own ``-t`` (16.0 only).

    A failed compilation (non-zero exit, or failure text) is a :class:`ConversionError` with the compiler's
    message and a hint; nothing is left in ``out_dir`` then.
    """
    model, out_dir = Path(model), Path(out_dir)
    if not model.is_file():
        raise InputError(f"model {model} does not exist", hint="give the full-int8 .tflite to compile")
    if num_segments is not None and num_segments < 1:
        raise InputError(f"num_segments must be 1 or more, not {num_segments}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".edgetpu-", dir=out_dir))
    except OSError as e:
        raise ConversionError(f"cannot write to {out_dir}: {e.strerror or e}",
                              hint="check the output folder") from e
    try:
        cmd = _command(Path(compiler), model.resolve(), work, num_segments, min_runtime_version,
                       compiler_timeout_s)
        text, code = _run(cmd, work, timeout_s)
        try:
            report = parse_compiler_output(text)
        except ConversionError as e:
            if code != 0:
                raise ConversionError(f"{e.message} (the compiler {_exit_text(code)})", hint=e.hint) from e
            raise
        if code != 0:
            tail = " | ".join(ln.strip() for ln in text.splitlines()[-5:] if ln.strip())
            raise ConversionError(f"edgetpu_compiler {_exit_text(code)} although its output reports a compiled "
                                  f"model (step: edgetpu compile); last lines: {tail}",
                                  hint="run the compiler by hand to see what it does")
        names = report.output_models or [f"{model.stem}_edgetpu.tflite"]
        for name in names:
            _check_tflite(work / name, report)
        logs = [m.operation_log for m in report.models if m.operation_log and (work / m.operation_log).is_file()]
        try:
            for name in [*names, *logs]:
                os.replace(work / name, out_dir / name)
        except OSError as e:
            raise ConversionError(f"cannot move the compiled model into {out_dir}: {e.strerror or e}",
                                  hint="check the output folder") from e
        return out_dir / names[0], report
    finally:
        shutil.rmtree(work, ignore_errors=True)
