"""Activation: new bundles and remote commands reach the serving loop without ever stopping it.

Bundles arrive in the inbox folders (ssh pushes, USB sticks) or as MQTT chunks; signed commands arrive on
the ``cmd`` topic. A background thread (the activator) verifies a bundle, unpacks it into a new slot of
the model store and smoke-tests it on its own backend while the current model keeps serving. A model that
passed is handed to the serving loop, which switches to it between two slices of inference, runs the
health window (``health_n`` inferences that must not fail; they double as the new model's warm-up and
are not in the telemetry) and commits, or goes back to the model it kept loaded. Every outcome is an
event (docs/deploy.md) and, for a file from the first inbox, ``<file>.result.json`` beside it (what an
ssh push waits for).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import select
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_agent.backends import Backend
from edge_agent.bundle import UnpackedBundle
from edge_agent.errors import ActivationError, BundleError, EdgekitError
from edge_agent.sources import Source, open_source
from edge_agent.stats import latency_summary_ms
from edge_agent.store import ModelStore, Slot

log = logging.getLogger(__name__)

BUNDLE_SUFFIX = ".edgebundle"
RESULT_SUFFIX = ".result.json"
RESULT_MAX_AGE_S = 7 * 24 * 3600.0

Emit = Callable[..., None]  # emit(kind, **fields): publish an event


@dataclass
class Model:
    """A model ready to serve: its slot, the re-verified unpacked bundle, its backend and input source."""

    slot: Slot
    unpacked: UnpackedBundle
    backend: Backend
    smoke: dict[str, Any]
    source: Source | None = None

    @property
    def manifest(self) -> Any:
        return self.unpacked.manifest

    @property
    def ref(self) -> dict[str, Any]:
        m = self.unpacked.manifest
        return {"name": m.name, "version": m.version, "sha256": m.files[m.model].sha256}

    def open_source(self, spec: str, stop: threading.Event) -> None:
        m = self.unpacked.manifest
        self.source = open_source(spec, self.backend.inputs, m.preprocessing, stop=stop)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None
        self.backend.close()


@dataclass
class Job:
    """Work for the activator: a bundle file, or an existing slot (rollback, activate, reload)."""

    kind: str  # "bundle" | "slot"
    source: str  # inbox | dir | mqtt | command | start
    path: Path | None = None
    sha256: str | None = None
    result_file: Path | None = None
    remove_after: bool = False
    slot: Slot | None = None
    command: dict[str, Any] | None = None  # {"nonce", "action"} of the command that asked for it
    started: float = field(default_factory=time.monotonic)


@dataclass
class Candidate:
    """A smoke-tested model waiting for the serving loop to switch to it."""

    job: Job
    model: Model


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_result(path: Path, result: dict[str, Any]) -> None:
    """``<bundle>.result.json``, atomically (what an ssh push waits for)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(result, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        log.error("cannot write the deploy result %s: %s (the pushing host will time out waiting)", path, e)
        tmp.unlink(missing_ok=True)


class Activator:
    """The activation pipeline up to the switch, in its own thread (see module docstring)."""

    def __init__(self, store: ModelStore, *, emit: Emit, inboxes: list[Path] | None = None,
                 threads: int | None = None, poll_s: float = 0.02, rescan_s: float = 1.0) -> None:
        self.store = store
        self.emit = emit
        self.inboxes = [Path(p) for p in inboxes or []]
        self.threads = threads
        self.poll_s = poll_s  # how often the inboxes are looked at without inotify
        self.rescan_s = rescan_s  # with inotify: a full look this often anyway (a folder that appeared)
        self._jobs: queue.Queue[Job] = queue.Queue()
        self._ready: queue.Queue[Candidate] = queue.Queue(maxsize=1)
        self._verdict = threading.Event()  # set by the serving loop when the candidate was dealt with
        self._stop = threading.Event()
        self._seen: dict[Path, tuple[int, int]] = {}  # read-only inbox files already looked at
        self._busy: set[str] = set()  # bundle sha256s queued or being activated
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._watch: Any = None  # inotify.FolderWatch on the inboxes, or None: poll them
        self._wake_r, self._wake_w = os.pipe()  # submit() wakes the thread waiting on the inboxes
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.idle = threading.Event()  # no job queued or running (for tests and tools)
        self.idle.set()

    # ---------------------------------------------------------------------------------- control

    def start(self) -> Activator:
        from edge_agent.inotify import FolderWatch

        if self.inboxes:
            try:  # the agent's own inbox (where ssh pushes land); the others (USB sticks) come and go
                self.inboxes[0].mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.warning("cannot create the inbox %s: %s", self.inboxes[0], e.strerror)
            self._watch = FolderWatch.create()
        self._thread = threading.Thread(target=self._loop, name="edge-agent-activator", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._verdict.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._watch is not None:
            self._watch.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        try:
            cand = self._ready.get_nowait()
        except queue.Empty:
            return
        cand.model.close()

    def submit(self, job: Job) -> None:
        self.idle.clear()
        self._jobs.put(job)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):  # already awake (pipe full) or closed
            pass

    @property
    def ready(self) -> bool:
        """A smoke-tested model waits for the serving loop."""
        return not self._ready.empty()

    def take(self) -> Candidate | None:
        """The serving loop's side: a model ready to switch to, or None (cheap; called between slices)."""
        if self._ready.empty():
            return None
        try:
            return self._ready.get_nowait()
        except queue.Empty:
            return None

    def done(self) -> None:
        """The serving loop dealt with the candidate it took (switched and committed, or rolled back)."""
        self._verdict.set()

    # ---------------------------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                self.idle.set()
                self._wait_for_news()
                if self._jobs.empty():
                    self._scan_inboxes()
                continue
            try:
                self._run(job)
            except Exception:  # the activator must not die: log, answer, keep serving the current model
                log.exception("activating %s failed unexpectedly; the current model keeps serving", job.path)
                self.finish(job, "rolled_back", reason="internal_error", stage="smoke",
                            message="unexpected error in the activator (see the agent's log)")

    def _wait_for_news(self) -> None:
        """Sleep until a job is submitted, a file lands in a watched inbox, or it is time to look anyway."""
        watch = self._watch
        if watch is not None:
            watch.forget_missing()
            for folder in self.inboxes:
                watch.add(folder)
        fds = [self._wake_r] if watch is None else [self._wake_r, watch.fileno()]
        # the agent's own inbox watched: look at the others (a USB stick that may appear) once a second
        timeout = self.rescan_s if watch is not None and self.inboxes and self.inboxes[0] in watch.folders \
            else self.poll_s
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except (OSError, ValueError):  # closed while stopping
            return
        if self._wake_r in ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        if watch is not None and watch.fileno() in ready:
            watch.drain()

    def _scan_inboxes(self) -> None:
        for i, inbox in enumerate(self.inboxes):
            try:
                entries = sorted(os.scandir(inbox), key=lambda e: e.name)
            except OSError:  # a USB stick that is not there (yet): normal
                continue
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(BUNDLE_SUFFIX):
                    continue
                try:
                    st = entry.stat()
                except OSError:
                    continue
                if not entry.is_file():
                    continue
                path = Path(entry.path)
                if i == 0:
                    if path in self._seen:  # queued already
                        continue
                    self._seen[path] = (st.st_size, st.st_mtime_ns)
                    self.submit(Job("bundle", "inbox", path=path,
                                    result_file=path.with_name(path.name + RESULT_SUFFIX), remove_after=True))
                    continue
                if self._seen.get(path) == (st.st_size, st.st_mtime_ns):
                    continue
                self._seen[path] = (st.st_size, st.st_mtime_ns)
                try:
                    sha = sha256_file(path)
                except OSError as e:
                    log.warning("cannot read %s from the inbox %s: %s", path.name, inbox, e.strerror)
                    continue
                if self.store.result(sha) is not None or self._is_active(sha):
                    continue  # imported (or refused) before: a USB stick stays plugged in
                self.submit(Job("bundle", "dir", path=path, sha256=sha))
        if self.inboxes:
            self._prune_results(self.inboxes[0])

    def _is_active(self, sha: str) -> bool:
        active = self.store.active
        return active is not None and active.bundle_sha256 == sha

    def _prune_results(self, inbox: Path) -> None:
        now = time.time()
        try:
            for entry in os.scandir(inbox):
                if entry.name.endswith(RESULT_SUFFIX) and now - entry.stat().st_mtime > RESULT_MAX_AGE_S:
                    os.unlink(entry.path)
        except OSError:
            pass

    def _run(self, job: Job) -> None:
        if job.kind == "bundle":
            assert job.path is not None
            try:
                job.sha256 = job.sha256 or sha256_file(job.path)
            except OSError as e:
                self.finish(job, "rejected", reason="io_error", message=f"cannot read {job.path}: {e.strerror}")
                return
            self.emit("deploy_received", bundle_sha256=job.sha256, source=job.source, file=job.path.name)
            log.info("new bundle %s (%s, sha256 %s…)", job.path.name, job.source, job.sha256[:12])
            if self._is_active(job.sha256):
                active = self.store.active
                assert active is not None
                self.finish(job, "activated", already_active=True, model=_ref(active), previous=None)
                return
            if self._interrupted_before(job):
                return
            try:
                job.slot = self.store.stage(job.path, source=job.source, sha256=job.sha256)
            except BundleError as e:
                self.finish(job, "rejected", reason=e.reason, message=e.message, hint=e.hint)
                return
            except EdgekitError as e:
                self.finish(job, "rejected", reason="io_error", message=e.message, hint=e.hint)
                return
        assert job.slot is not None
        model = self.load(job.slot)
        if isinstance(model, EdgekitError):
            reason = getattr(model, "reason", "load_failed")
            self.finish(job, "rolled_back", reason=reason, stage="smoke", message=model.message, hint=model.hint)
            return
        self._verdict.clear()
        self._ready.put(Candidate(job, model))
        while not self._verdict.wait(0.2):  # the serving loop switches, runs the health window, commits
            if self._stop.is_set():
                return

    def _interrupted_before(self, job: Job) -> bool:
        """A bundle whose activation a crash or power cut interrupted is not retried on its own: that
        activation may be what brought the agent down. A push of the same bundle after that is retried."""
        assert job.path is not None and job.sha256 is not None
        last = self.store.result(job.sha256)
        if last is None or last.get("reason") != "interrupted":
            return False
        try:
            arrived = job.path.stat().st_mtime
        except OSError:
            return False
        if arrived > float(last.get("ts") or 0):
            return False
        result = last["result"] if last["result"] in ("rejected", "rolled_back") else "rolled_back"
        self.finish(job, result, reason="interrupted", stage="restart",
                    message=f"{last.get('message') or 'the agent stopped during this activation'}; not retried "
                            "automatically (push the bundle again to retry)")
        return True

    def load(self, slot: Slot) -> Model | EdgekitError:
        """Re-verify the slot and smoke-test it on its own backend; the error instead of raising."""
        from edge_agent.smoke import smoke_test

        try:
            unpacked = self.store.load(slot)
            check_delegates(unpacked.manifest, [self.store.state_dir, *self.inboxes])
            backend, report = smoke_test(unpacked, threads=self.threads)
        except (ActivationError, BundleError) as e:
            log.error("model %s failed its smoke test: %s", slot.id, e)
            return e
        except EdgekitError as e:
            log.error("model %s cannot be loaded: %s", slot.id, e)
            return ActivationError(e.message, e.hint, reason="load_failed")
        return Model(slot, unpacked, backend, report)

    # ---------------------------------------------------------------------------------- outcomes

    def finish(self, job: Job, result: str, *, event: str | None = None, **fields: Any) -> dict[str, Any]:
        """Record, announce and answer the outcome of a job: an event, the result file, the command reply.

        ``event`` names the event when it is not the result's own (a commanded rollback that succeeded)."""
        took = round(time.monotonic() - job.started, 3)
        kind = event or {"activated": "activated", "rolled_back": "rolled_back",
                         "rejected": "deploy_rejected"}[result]
        record = {"bundle_sha256": job.sha256 or (job.slot.bundle_sha256 if job.slot else None), **fields,
                 "took_s": took}
        if job.command is not None:
            record["command"] = job.command
        if job.sha256 is not None and result != "activated":
            self.store.record_result(job.sha256, result, str(fields.get("reason")), str(fields.get("message")))
        level = logging.INFO if result == "activated" else logging.ERROR
        log.log(level, "%s %s: %s", kind, job.path.name if job.path else (job.slot.id if job.slot else "?"),
                fields.get("message") or fields.get("model"))
        self.emit(kind, **record)
        if job.command is not None:
            ok = result == "activated"
            self.emit("command", nonce=job.command["nonce"], action=job.command["action"],
                      result="done" if ok else "failed", reason=None if ok else fields.get("reason"),
                      detail=record)
        if job.result_file is not None:
            write_result(job.result_file, {"result": result, "kind": kind, **record})
        if job.remove_after and job.path is not None:
            try:
                job.path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot remove %s after activation: %s", job.path, e.strerror)
            self._seen.pop(job.path, None)
        return record


def check_delegates(manifest: Any, writable: list[Path]) -> None:
    """A bundle may name an ``external:<path>`` delegate (a shared library the agent loads, which runs its
    code), but never one that lies where bundles are written (the state folder, the inboxes): bundles carry
    models and data, and one bundle must not be able to load a library another one brought."""
    for d in (manifest.runtime or {}).get("delegates") or []:
        if not (isinstance(d, str) and d.startswith("external:")):
            continue
        lib = Path(d[len("external:"):])
        if not lib.is_absolute():
            raise BundleError(f"the bundle names the external delegate {lib}, which is not an absolute path",
                              hint="name an installed library by its absolute path (e.g. /usr/lib/…)",
                              reason="unsafe_delegate")
        real = Path(os.path.realpath(lib))
        for folder in writable:
            base = Path(os.path.realpath(folder))
            if real == base or base in real.parents:
                raise BundleError(f"the bundle names the external delegate {lib}, which lies in {folder}, where "
                                  "bundles are written: refused (a bundle must not load a library a bundle "
                                  "brought)", hint="install the delegate library outside the agent's state "
                                  "folder and inboxes, e.g. under /usr/lib", reason="unsafe_delegate")


def _ref(slot: Slot) -> dict[str, Any]:
    m = slot.manifest
    return {"name": m.name, "version": m.version, "sha256": m.files[m.model].sha256}


def health_window(model: Model, n: int) -> str | None:
    """Run ``n`` inferences on the new model; None when all passed, else what failed."""
    from edge_agent.service import timed_loop

    assert model.source is not None
    lat = array("q")
    try:
        timed_loop(model.backend.run, model.source.next, lat, 1 << 62, n)
    except EdgekitError as e:
        return f"inference {len(lat) + 1} of the health window failed: {e.message}"
    except Exception as e:  # a runtime error from the backend: the reason to roll back, never a crash
        return f"inference {len(lat) + 1} of the health window failed: {type(e).__name__}: {e}"
    summary = latency_summary_ms(lat)
    log.info("health window passed: %d inferences, p50 %.3f ms", n, summary["p50"] or 0.0)
    return None


