"""`edgekit convert --profile a,b,c`: one conversion per profile, each in its own process, in parallel.

Each profile is converted by ``converters.convert.convert`` in a worker process of a
``ProcessPoolExecutor`` started with the ``spawn`` method (TensorFlow, onnxruntime and their thread pools do
not survive ``fork``), at most ``os.cpu_count()`` workers (``jobs``). Every profile writes its own bundle
(and PNG) into the same folder; bundle names carry the profile, so they never collide.

Progress: a worker reports ``(profile, message, fraction)`` through a ``multiprocessing.Manager`` queue; the
parent drains it while it waits and hands each event to ``on_event`` (the CLI renders one progress row per
profile). A worker's stdout is sent to its stderr, so the parent's ``--json`` output stays clean, and its
TensorFlow C++ log level is WARNING-free (``TF_CPP_MIN_LOG_LEVEL=2`` unless already set).

A failure in one profile never stops the others: each profile ends as one result row (``ProfileResult``).
``status`` is ``ok``, ``gate failed`` (a ``GateError``: no bundle) or ``failed`` (any other error, with the
error's exit code: 2 for bad input, 1 for a failure of the work; a worker process that died is a failure).
``exit_code`` of the whole run: 0 when every profile is ok, 2 when any failed on bad input, else 1.

Host latency: with several conversions running at once, each measures latency with
``threads = max(1, cpu_count // workers)`` (at most the profile's threads) unless threads are given; the
figures still come from both models interleaved on the same busy machine, so their ratio stays fair, but
absolute milliseconds are noisier than in a single conversion.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import queue as queue_mod
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.errors import EdgekitError, GateError, InputError
from edge_agent.profiles import Profile

EventFn = Callable[[str, str, float | None], None]
"""on_event(profile name, message, fraction): a step started (fraction None), a tool's own progress
(fraction 0..1), or the end: message "done" / "failed" / "gate failed" with fraction 1.0."""

_POLL_S = 0.1


@dataclass
class ProfileResult:
    """One profile's outcome: a summary row of the run."""

    profile: str
    status: str  # "ok" | "gate failed" | "failed"
    exit_code: int  # 0 ok, 1 failure of the work, 2 bad input
    seconds: float
    bundle: str | None = None
    plot: str | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None  # EdgekitError.to_dict(), or {"error", "message"} for a crash
    threads: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exit_code(results: Sequence[ProfileResult]) -> int:
    """0 when every profile is ok, 2 when any failed on bad input, else 1."""
    codes = {r.exit_code for r in results}
    if codes <= {0}:
        return 0
    return 2 if 2 in codes else 1


def _init_worker() -> None:
    """A worker's stdout (TensorFlow and Keras print there) goes to its stderr, and TensorFlow's C++ INFO and
    WARNING lines are silenced (errors still show) so that they do not break up the parent's progress rows."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _convert_one(model: Path, profile: Profile, calib: str, out_dir: Path, key: Path, kwargs: dict[str, Any],
                 events: Any) -> ProfileResult:
    """Runs in a worker: one conversion, every project error turned into a result row."""
    from converters.convert import convert

    def progress(message: str, fraction: float | None = None) -> None:
        events.put((profile.name, message, fraction))

    t0 = time.perf_counter()
    try:
        result = convert(model, profile, calib, out_dir, key, progress=progress, **kwargs)
    except GateError as e:
        events.put((profile.name, "gate failed", 1.0))
        return ProfileResult(profile.name, "gate failed", e.exit_code, round(time.perf_counter() - t0, 2),
                             error=e.to_dict(), threads=kwargs.get("threads"))
    except EdgekitError as e:
        events.put((profile.name, "failed", 1.0))
        return ProfileResult(profile.name, "failed", e.exit_code, round(time.perf_counter() - t0, 2),
                             error=e.to_dict(), threads=kwargs.get("threads"))
    events.put((profile.name, "done", 1.0))
    return ProfileResult(profile.name, "ok", 0, round(time.perf_counter() - t0, 2), bundle=str(result.bundle),
                         plot=str(result.plot) if result.plot else None,
                         validation=dict(result.manifest.validation), notes=list(result.report.get("notes", [])),
                         threads=kwargs.get("threads"))


def _drain(events: Any, on_event: EventFn | None) -> None:
    while True:
        try:
            name, message, fraction = events.get_nowait()
        except queue_mod.Empty:
            return
        if on_event is not None:
            on_event(name, message, fraction)


def workers_for(count: int, jobs: int | None = None) -> int:
    """How many worker processes: ``jobs`` (default: one per profile), at most os.cpu_count()."""
    cpus = os.cpu_count() or 1
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs must be at least 1, not {jobs}")
    return max(1, min(count, jobs or count, cpus))


def convert_many(model: Path, profiles: Sequence[Profile], calib: str, out_dir: Path, key: Path, *,
                 jobs: int | None = None, on_event: EventFn | None = None,
                 **kwargs: Any) -> list[ProfileResult]:
    """Convert ``model`` for every profile in parallel processes; one ``ProfileResult`` per profile, in order.

    ``kwargs`` are ``convert()``'s keyword arguments (picklable; not ``progress``). Without ``threads``
    each conversion gets its share of the CPUs (see the module docstring).
    """
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise InputError(f"--profile lists a profile twice: {', '.join(names)}", hint="name each profile once")
    if "progress" in kwargs:
        raise InputError("convert_many reports progress through on_event, not progress")
    workers = workers_for(len(profiles), jobs)
    share = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    results: dict[str, ProfileResult] = {}
    started = {p.name: time.perf_counter() for p in profiles}
    with ctx.Manager() as manager:
        events = manager.Queue()
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker) as pool:
            futures: dict[cf.Future[ProfileResult], str] = {}
            for p in profiles:
                args = dict(kwargs)
                if args.get("threads") is None:
                    args["threads"] = min(p.runtime.threads, share)
                futures[pool.submit(_convert_one, Path(model), p, calib, Path(out_dir), Path(key), args,
                                    events)] = p.name
            pending = set(futures)
            while pending:
                done, pending = cf.wait(pending, timeout=_POLL_S, return_when=cf.FIRST_COMPLETED)
                _drain(events, on_event)
                for f in done:
                    name = futures[f]
                    try:
                        results[name] = f.result()
                    except Exception as e:  # the worker died (BrokenProcessPool) or a bug escaped convert()
                        results[name] = ProfileResult(
                            name, "failed", 1, round(time.perf_counter() - started[name], 2),
                            error={"error": type(e).__name__, "message": str(e) or type(e).__name__,
                                   "hint": "the conversion process for this profile crashed; run it alone "
                                           f"(--profile {name}) to see the full error"})
                        if on_event is not None:
                            on_event(name, "failed", 1.0)
            _drain(events, on_event)
    return [results[n] for n in names]
