"""The smoke test a new model passes on the device before the agent switches to it.

Load it on the profile's delegate / providers, run every golden input and compare with the golden outputs
within ``golden.atol``, and, when the bundle states ``golden.latency_budget_ms``, compare the median latency
(after warm-up) with it. A failure is an ``ActivationError`` whose ``reason`` is the ``rolled_back``
event's code: ``load_failed``, ``golden_mismatch`` or ``latency_budget``. The old model keeps serving
meanwhile; the backend created here is the one the agent then serves with.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_agent.backends import Backend, create_backend
from edge_agent.bundle import UnpackedBundle, load_golden
from edge_agent.errors import ActivationError, EdgekitError, InputError
from edge_agent.manifest import TensorSpec

WARMUP = 2


def _label(unpacked: UnpackedBundle) -> str:
    m = unpacked.manifest
    return f"model {m.name} {m.version}"


def _zeros(spec: TensorSpec) -> np.ndarray:
    return np.zeros([1 if d < 0 else d for d in spec.shape], dtype=spec.dtype)


def _max_diff(got: np.ndarray, want: np.ndarray) -> float:
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if g.shape != w.shape:
        return math.inf
    d = np.abs(g - w)
    d = np.where(np.isnan(g) & np.isnan(w), 0.0, d)  # NaN where the host had NaN too: equal
    if d.size == 0:
        return 0.0
    worst = float(np.max(d))
    return math.inf if math.isnan(worst) else worst


def _run(backend: Backend, feeds: Sequence[np.ndarray], what: str, unpacked: UnpackedBundle) -> list[np.ndarray]:
    try:
        return backend.run(feeds)
    except EdgekitError as e:
        raise ActivationError(f"smoke test: {_label(unpacked)} loads but fails on {what}: {e.message}",
                              hint=e.hint or "rebuild the bundle for this device's profile",
                              reason="load_failed") from e


def _golden(backend: Backend, unpacked: UnpackedBundle) -> tuple[dict[str, Any] | None, list[np.ndarray]]:
    """Every golden sample through the backend; the report and the feeds to time with."""
    m = unpacked.manifest
    try:
        golden = load_golden(unpacked)
    except EdgekitError as e:
        raise ActivationError(f"smoke test: the golden data of {_label(unpacked)} cannot be read: {e.message}",
                              hint="rebuild the bundle with edgekit", reason="golden_mismatch") from e
    if golden is None:
        feeds = [_zeros(t) for t in m.inputs]
        _run(backend, feeds, "a zero input", unpacked)
        return None, feeds
    atol = (m.golden or {}).get("atol")
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ActivationError(f"smoke test: {_label(unpacked)} states no usable golden.atol ({atol!r})",
                              hint="rebuild the bundle with edgekit (golden.atol is a number >= 0)",
                              reason="golden_mismatch")
    inputs, outputs = golden
    counts = {len(a) for a in (*inputs, *outputs)}
    if len(counts) != 1 or 0 in counts:
        raise ActivationError(f"smoke test: the golden arrays of {_label(unpacked)} hold different numbers of "
                              f"samples ({sorted(counts)})", hint="rebuild the bundle with edgekit",
                              reason="golden_mismatch")
    n = counts.pop()
    worst, where = 0.0, ""
    for i in range(n):
        got = _run(backend, [np.ascontiguousarray(a[i]) for a in inputs], f"golden input {i}", unpacked)
        for spec, g, w in zip(m.outputs, got, outputs, strict=True):
            diff = _max_diff(g, w[i])
            if diff > worst or not where:
                worst, where = diff, f"output {spec.name!r}, sample {i}"
    if worst > atol:
        shape_note = " (shape differs from the golden output)" if math.isinf(worst) else ""
        raise ActivationError(
            f"smoke test: {_label(unpacked)} differs from its golden outputs by {worst:g}{shape_note} "
            f"(tolerance {atol:g}) at {where}",
            hint="this runtime or delegate computes differently from the host that validated the bundle: check "
                 "the device's runtime version and delegate, or convert for this profile again",
            reason="golden_mismatch")
    return {"samples": n, "max_abs_diff": worst, "atol": atol}, [np.ascontiguousarray(a[0]) for a in inputs]


def _latency(backend: Backend, feeds: list[np.ndarray], runs: int, budget: float | None,
             unpacked: UnpackedBundle) -> dict[str, Any]:
    for _ in range(WARMUP):
        _run(backend, feeds, "a warm-up inference", unpacked)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        _run(backend, feeds, "a timed inference", unpacked)
        times.append((time.perf_counter_ns() - t0) / 1e6)
    median = statistics.median(times)
    if budget is not None and median > budget:
        raise ActivationError(
            f"smoke test: {_label(unpacked)} takes {median:.3f} ms per inference (median of {runs}, after "
            f"{WARMUP} warm-up), over its budget of {budget:g} ms (golden.latency_budget_ms)",
            hint="check that the profile's delegate / providers are in use (a degraded session runs on the CPU) "
                 "and that the board is not throttling, or raise the budget on the host",
            reason="latency_budget")
    return {"median": median, "budget": budget}


def smoke_test(unpacked: UnpackedBundle, *, threads: int | None = None,
               runs: int = 5) -> tuple[Backend, dict[str, Any]]:
    """Load the model, check the golden outputs and the latency budget; return the open backend and a report.

    Report: ``{"load_ms", "golden": {"samples", "max_abs_diff", "atol"} | None, "latency_ms": {"median",
    "budget"}, "engine", "providers", "degraded"}``. A bundle without golden data runs one zero input (a
    load check) and reports ``"golden": None``. On failure the backend is closed and an ``ActivationError``
    raised.
    """
    if runs < 1:
        raise InputError(f"smoke test: runs must be at least 1, got {runs}")
    m = unpacked.manifest
    t0 = time.perf_counter_ns()
    try:
        backend = create_backend(m, unpacked.model_path, threads=threads)
    except EdgekitError as e:
        raise ActivationError(f"smoke test: {_label(unpacked)} does not load: {e.message}",
                              hint=e.hint or "rebuild the bundle for this device's profile",
                              reason="load_failed") from e
    load_ms = (time.perf_counter_ns() - t0) / 1e6
    try:
        golden, feeds = _golden(backend, unpacked)
        budget = (m.golden or {}).get("latency_budget_ms")
        latency = _latency(backend, feeds, runs, None if budget is None else float(budget), unpacked)
        info = backend.info()
    except BaseException:
        backend.close()
        raise
    return backend, {"load_ms": load_ms, "golden": golden, "latency_ms": latency, "engine": info.get("engine"),
                     "providers": info.get("providers"), "degraded": bool(info.get("degraded"))}
