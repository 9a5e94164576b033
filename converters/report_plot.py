"""The conversion report as a PNG, written next to the bundle (never inside it): ``<bundle stem>.png``.

* With labelled validation samples: top-1 accuracy per class, fp32 vs quantized, as grouped bars (at most
  ``MAX_CLASSES`` classes: beyond that, the classes whose accuracy dropped most).
* Without labels: the histogram of |fp32 - quantized| over every output element, per output, on log axes
  (the report keeps the bin edges and counts, not the raw errors: ``converters.validate.error_histogram``).

The title carries the model, version, profile and the gate's verdict. matplotlib (the ``host`` extra) is
imported only here, and only its object API with the Agg canvas is used: no pyplot, no global backend
switch, safe in worker processes and without a display. The PNG is written to a temporary file beside the
destination and renamed into place.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

from edge_agent.errors import ConversionError, missing_extra

MAX_CLASSES = 40
MAX_OUTPUTS = 6
SIZE_IN = (9.0, 5.0)
DPI = 100


def _figure() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise missing_extra("matplotlib", "host", "plotting the conversion report") from e
    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _num(v: Any) -> str:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def title(report: dict[str, Any]) -> str:
    """"name version for profile: gate passed (metric value >= threshold)"."""
    head = f"{report.get('name', '?')} {report.get('version', '?')} for {report.get('profile', '?')}"
    g = report.get("gate")
    if not g:
        return f"{head}: no gate"
    verdict = "gate passed" if g.get("passed") else "gate FAILED"
    rung = (report.get("validation") or {}).get("ladder_rung")
    extra = f", ladder rung {rung}" if rung and rung != "initial" else ""
    return f"{head}: {verdict} ({g.get('metric')} {_num(g.get('value'))} vs {_num(g.get('threshold'))}{extra})"


def _classes(per_class: dict[str, Any], labels: list[str] | None) -> tuple[list[int], str]:
    """The class indices to show, and a note when only some are."""
    n = int(per_class["classes"])
    have = [c for c in range(n) if per_class["count"][c]]
    if len(have) <= MAX_CLASSES:
        return have, ""

    def drop(c: int) -> float:
        return float(per_class["accuracy_fp32"][c]) - float(per_class["accuracy_quant"][c])

    worst = sorted(have, key=lambda c: (-drop(c), c))[:MAX_CLASSES]
    return sorted(worst), f" (the {MAX_CLASSES} of {len(have)} classes whose accuracy dropped most)"


def _per_class(ax: Any, per_class: dict[str, Any], labels: list[str] | None, samples: int) -> None:
    shown, note = _classes(per_class, labels)
    x = list(range(len(shown)))
    width = 0.4
    fp32 = [per_class["accuracy_fp32"][c] for c in shown]
    quant = [per_class["accuracy_quant"][c] for c in shown]
    ax.bar([i - width / 2 for i in x], fp32, width, label="fp32", color="#4c72b0")
    ax.bar([i + width / 2 for i in x], quant, width, label="quantized", color="#dd8452")
    names = [labels[c] if labels is not None and c < len(labels) else str(c) for c in shown]
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60 if len(shown) > 10 else 0, ha="right" if len(shown) > 10 else "center",
                       fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("top-1 accuracy")
    ax.set_xlabel(f"class{note}; {samples} validation samples")
    ax.legend(loc="lower right")


def _histograms(ax: Any, histograms: dict[str, dict[str, Any]]) -> None:
    shown = list(histograms.items())[:MAX_OUTPUTS]
    drawn = 0
    for name, h in shown:
        edges, counts = h.get("edges") or [], h.get("counts") or []
        zero = int(h.get("zero", 0))
        label = f"{name} ({h.get('total', 0)} values" + (f", {zero} exact" if zero else "") + ")"
        if edges and counts:
            ax.hist(edges[:-1], bins=edges, weights=counts, histtype="stepfilled", alpha=0.45, log=True,
                    label=label)
            drawn += 1
        else:
            ax.plot([], [], label=f"{label}: every value exact")
    if drawn:
        ax.set_xscale("log")
    ax.set_xlabel("|fp32 - quantized| per output value (dequantized)")
    ax.set_ylabel("count")
    more = len(histograms) - len(shown)
    ax.legend(loc="upper right", fontsize=8, title=f"+{more} outputs not shown" if more > 0 else None)


def plot_report(report: dict[str, Any], dst: Path, *, labels: list[str] | None = None) -> Path:
    """Write the report's PNG to ``dst`` (temp file + rename); returns ``dst``."""
    dst = Path(dst)
    validation = report.get("validation") or {}
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    per_class = validation.get("per_class")
    if per_class:
        _per_class(ax, per_class, labels, int(validation.get("samples") or 0))
    elif validation.get("error_histograms"):
        _histograms(ax, validation["error_histograms"])
    else:
        raise ConversionError("the report has neither per-class accuracies nor error histograms to plot "
                              "(step: plot)", hint="pass --no-plot")
    fig.suptitle(title(report), fontsize=10)
    fig.tight_layout()
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}-", suffix=".png.partial", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                fig.savefig(f, format="png")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise ConversionError(f"cannot write the report plot {dst}: {e.strerror or e} (step: plot)",
                              hint="check the output folder, or pass --no-plot") from e
    return dst
