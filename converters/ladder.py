"""The recovery ladder: what `edgekit convert` tries when the quantized model fails the accuracy gate.

Each rung re-quantizes the float model with changed settings, re-validates it on the **same** validation
samples and runs the gate (``converters.gate``). The first rung that passes wins; every rung tried (and
every rung skipped, with the reason) is recorded for the report. In order:

1. ``per_tensor`` / ``per_channel``: the other weight granularity than the one tried first.
2. ``method_<name>``: each other calibration method the backend has (minmax -> entropy -> percentile;
   TFLite's converter has min/max only, so these rungs are recorded as skipped there).
3. ``float_layers_<k>``: keep the layers with the largest quantization error in float. The backend ranks
   them on the best model so far (ONNX: onnxruntime's ``qdq_loss_debug``, the SQNR of each activation
   before vs after its QuantizeLinear/DequantizeLinear pair; TFLite: TF's ``QuantizationDebugger``, the
   RMSE of each quantized tensor over its scale). k = 1, 2, 4, ... worst layers, on top of that model's
   settings, as long as the nodes kept in float stay within ``max_float_nodes`` (half of the model's
   nodes, at most ``MAX_FLOAT_NODES``): past that the model would hardly be quantized any more.

When no rung passes, ``LadderResult.passed`` is None and the caller raises a ``GateError`` carrying
``attempts_table`` and the worst layers; no bundle is written.

The ladder is generic: a backend (``LadderBackend``) quantizes, evaluates and ranks layers for one
runtime, so the order, the bookkeeping and the stopping rules are tested without any model.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from converters.gate import GateResult, json_number
from edge_agent.errors import ConversionError

METHODS = ("minmax", "entropy", "percentile")
MAX_FLOAT_NODES = 16
INITIAL = "initial"


@dataclass(frozen=True)
class QuantSettings:
    """The quantization settings one rung uses."""

    per_channel: bool
    method: str
    exclude_nodes: tuple[str, ...] = ()  # asked for by the user (profile or --exclude-nodes)
    exclude_op_types: tuple[str, ...] = ()
    float_layers: tuple[str, ...] = ()  # nodes (ONNX) / tensors (TFLite) the ladder keeps in float

    @property
    def float_nodes(self) -> tuple[str, ...]:
        """Every node kept in float: the user's and the ladder's, in order, without repeats."""
        return tuple(dict.fromkeys((*self.exclude_nodes, *self.float_layers)))

    def describe(self) -> str:
        parts = ["per-channel" if self.per_channel else "per-tensor", self.method]
        if self.float_layers:
            parts.append(f"{len(self.float_layers)} node(s) kept in float")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"per_channel": self.per_channel, "method": self.method, "exclude_nodes": list(self.exclude_nodes),
                "exclude_op_types": list(self.exclude_op_types), "float_layers": list(self.float_layers)}


@dataclass(frozen=True)
class LayerError:
    """One layer's quantization error: ``error_db`` is an SQNR in dB (lower is worse).

    ``nodes`` are what the backend keeps in float to remove that error (ONNX: the nodes producing and
    consuming the activation; TFLite: the tensor name the debugger denylists).
    """

    name: str
    error_db: float
    nodes: tuple[str, ...]
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "error_db": json_number(self.error_db), "nodes": list(self.nodes),
                "detail": self.detail}


@dataclass
class Attempt:
    """One rung: its settings, the gate's verdict (None when the rung was skipped or failed to build)."""

    rung: str
    settings: QuantSettings
    gate: GateResult | None = None
    seconds: float = 0.0
    model: Path | None = None
    quality: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # why the rung produced no model (skipped, or the quantizer failed)

    @property
    def passed(self) -> bool:
        return self.gate is not None and self.gate.passed

    def to_dict(self) -> dict[str, Any]:
        g = self.gate
        return {"rung": self.rung, "settings": self.settings.to_dict(), "describe": self.settings.describe(),
                "metric": g.metric if g else None, "value": json_number(g.value) if g else None,
                "threshold": g.threshold if g else None, "passed": self.passed, "seconds": round(self.seconds, 3),
                "error": self.error}


@dataclass
class LadderResult:
    attempts: list[Attempt]
    passed: Attempt | None
    worst_layers: list[LayerError]


class LadderBackend(Protocol):
    """What the ladder needs from one runtime's converter."""

    methods: tuple[str, ...]  # calibration methods this backend can use
    node_count: int  # nodes of the model (bounds the layers kept in float)

    def quantize(self, settings: QuantSettings, dst: Path) -> list[str]:
        """Quantize with ``settings`` into ``dst``; returns notes; raises ConversionError on failure."""
        ...

    def evaluate(self, model: Path) -> dict[str, Any]:
        """The gate's figures of ``model`` on the validation samples (``validate.quality_figures``)."""
        ...

    def layer_errors(self, model: Path, settings: QuantSettings) -> list[LayerError]:
        """The layers of ``model`` (quantized with ``settings``), worst first."""
        ...


def max_float_nodes(node_count: int) -> int:
    """How many nodes the ladder may keep in float: half the model's nodes, at least 1, at most 16."""
    return max(1, min(MAX_FLOAT_NODES, node_count // 2))


def first_rungs(initial: QuantSettings, methods: tuple[str, ...]) -> list[tuple[str, QuantSettings, str | None]]:
    """Rungs 1 and 2 as (name, settings, reason it is skipped or None), in order."""
    flip = not initial.per_channel
    rungs: list[tuple[str, QuantSettings, str | None]] = [
        ("per_channel" if flip else "per_tensor", dataclasses.replace(initial, per_channel=flip), None)]
    for method in METHODS:
        if method == initial.method:
            continue
        skip = None if method in methods else f"calibration method {method!r} is not available for this format"
        rungs.append((f"method_{method}", dataclasses.replace(initial, method=method), skip))
    return rungs


def float_layer_rungs(base: QuantSettings, ranking: list[LayerError],
                      limit: int) -> tuple[list[tuple[str, QuantSettings]], str | None]:
    """Rung 3: (name, settings) for the k = 1, 2, 4, ... worst layers in float, and why it stopped early.

    Layers whose nodes are all in float already add nothing and are passed over. A k whose nodes would
    exceed ``limit`` float nodes (counting those the user keeps in float) ends the rung.
    """
    useful = [layer for layer in ranking if set(layer.nodes) - set(base.float_nodes)]
    if not useful:
        return [], "no layer with a quantization error is left to keep in float"
    counts, k = [], 1
    while k < len(useful):
        counts.append(k)
        k *= 2
    counts.append(len(useful))
    rungs: list[tuple[str, QuantSettings]] = []
    for k in counts:
        top = useful[:k]
        extra = (n for layer in top for n in layer.nodes if n not in base.float_nodes)
        layers = tuple(dict.fromkeys((*base.float_layers, *extra)))
        total = len(dict.fromkeys((*base.exclude_nodes, *layers)))
        if total > limit:
            return rungs, (f"keeping the {k} worst layer(s) in float needs {total} float nodes, more than the "
                           f"ladder's limit of {limit} (half the model's nodes, at most {MAX_FLOAT_NODES})")
        rungs.append((f"float_layers_{k}", dataclasses.replace(base, float_layers=layers)))
    return rungs, None


def _better(a: Attempt, b: Attempt | None) -> bool:
    """a has a higher gate value than b (attempts without a value never win)."""
    if a.gate is None or a.gate.value is None or (isinstance(a.gate.value, float) and math.isnan(a.gate.value)):
        return False
    if b is None or b.gate is None or b.gate.value is None:
        return True
    return a.gate.value > b.gate.value


def _try(backend: LadderBackend, rung: str, settings: QuantSettings, judge: Callable[[dict[str, Any]], GateResult],
         dst: Path, progress: Callable[[str], None] | None) -> Attempt:
    if progress is not None:
        progress(f"ladder: {rung} ({settings.describe()})")
    t0 = time.perf_counter()
    attempt = Attempt(rung, settings, model=dst)
    try:
        attempt.notes = backend.quantize(settings, dst)
        attempt.quality = backend.evaluate(dst)
        attempt.gate = judge(attempt.quality)
    except ConversionError as e:  # a rung the quantizer cannot build is recorded, and the ladder goes on
        attempt.error = e.message
        attempt.model = None
    attempt.seconds = time.perf_counter() - t0
    return attempt


def run_ladder(backend: LadderBackend, first: Attempt, judge: Callable[[dict[str, Any]], GateResult],
               workdir: Path, progress: Callable[[str], None] | None = None) -> LadderResult:
    """Climb the ladder after ``first`` (the attempt with the initial settings) failed the gate."""
    attempts = [first]
    best: Attempt | None = first if _better(first, None) else None
    n = 0

    def dst() -> Path:
        nonlocal n
        n += 1
        return Path(workdir) / f"rung{n}.model"

    for rung, settings, skip in first_rungs(first.settings, backend.methods):
        if skip is not None:
            attempts.append(Attempt(rung, settings, error=f"skipped: {skip}"))
            continue
        attempt = _try(backend, rung, settings, judge, dst(), progress)
        attempts.append(attempt)
        if attempt.passed:
            return LadderResult(attempts, attempt, [])
        if _better(attempt, best):
            best = attempt
    if best is None or best.model is None:
        attempts.append(Attempt("float_layers", first.settings,
                                error="skipped: no rung produced a model to rank the layers of"))
        return LadderResult(attempts, None, [])
    if progress is not None:
        progress(f"ladder: ranking layers of {best.rung} by quantization error")
    try:
        ranking = backend.layer_errors(best.model, best.settings)
    except ConversionError as e:  # recorded: the ladder ends without this rung
        attempts.append(Attempt("float_layers", best.settings, error=f"skipped: {e.message}"))
        return LadderResult(attempts, None, [])
    limit = max_float_nodes(backend.node_count)
    rungs, stop = float_layer_rungs(best.settings, ranking, limit)
    for rung, settings in rungs:
        attempt = _try(backend, rung, settings, judge, dst(), progress)
        attempts.append(attempt)
        if attempt.passed:
            return LadderResult(attempts, attempt, ranking)
    if stop is not None:
        attempts.append(Attempt("float_layers", best.settings, error=f"stopped: {stop}"))
    return LadderResult(attempts, None, ranking)


def attempts_table(attempts: list[Attempt], worst: list[LayerError], limit: int = 8) -> str:
    """The plain-text table of what was tried, and the worst layers, for error messages."""
    rows = [("rung", "settings", "metric", "value", "threshold", "passed", "seconds")]
    for a in attempts:
        g = a.gate
        value = "-" if g is None or g.value is None else _num(g.value)
        rows.append((a.rung, a.settings.describe(), g.metric if g else "-", value,
                     _num(g.threshold) if g else "-", "yes" if a.passed else ("no" if g else "-"),
                     f"{a.seconds:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for a in attempts:
        if a.error:
            lines.append(f"  {a.rung}: {a.error}")
    if worst:
        lines.append("worst layers (SQNR of the quantized activation vs float, dB; lower is worse):")
        for layer in worst[:limit]:
            nodes = f" (nodes: {', '.join(layer.nodes)})" if layer.nodes else ""
            lines.append(f"  {layer.name}: {_num(layer.error_db)} dB{nodes}")
    return "\n".join(lines)


def _num(v: float) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    return f"{v:.4g}"
