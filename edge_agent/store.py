"""The device's model store: verified, unpacked bundles in slots, and an atomic pointer to the active one.

Layout under ``<state>/models`` (docs/deploy.md, "Model store")::

    <slot>/          one verified, unpacked bundle, plus .slot.json (bundle sha256, install time, source)
    .staging-*/      a bundle being unpacked (removed by recover())
    current.json     {"schema": 1, "active", "previous", "state": "committed"|"trial", "since"}
    journal.json     the activation in progress; absent when idle
    results.json     bundle sha256 -> last result (activated / rolled_back / rejected)

Every file is written to a temp file in the same folder, fsynced and renamed, then the folder is fsynced.
A slot folder is complete (unpacked, fsynced) before it gets its name, so the pointer only ever names whole
slots, and ``recover()`` at start turns whatever a crash or a power cut left into a consistent store.

The store does the durable steps; the agent runs the smoke test and the health window and tells the store
what happened (``note_step``, ``switch``, ``commit``, ``rollback``). ``hook(step)`` is called right after
each durable step (``STEPS``, then ``rolled_back`` and the agent's own ``note_step`` names) so tests can
kill the process there. Mutations take an exclusive ``flock`` on ``models/.lock`` (the agent and the
``edge-agent models`` command may run at the same time).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.bundle import MANIFEST_NAME, SIGNATURE_NAME, UnpackedBundle, unpack_bundle
from edge_agent.errors import BundleError, EdgekitError, InputError, KeyFileError, ModelStoreError
from edge_agent.fsutil import fsync_dir as _fsync_dir
from edge_agent.manifest import Manifest, parse_manifest
from edge_agent.signing import fingerprint, load_public_key, verify

log = logging.getLogger(__name__)

STORE_SCHEMA = 1
MODELS_DIR = "models"
POINTER = "current.json"
JOURNAL = "journal.json"
RESULTS = "results.json"
SLOT_META = ".slot.json"  # member names never start with "." so this never clashes with a bundle member
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
DEFAULT_KEEP = 3
MAX_RESULTS = 500
STEPS = ("journal", "verified", "unpacked", "slot", "switched", "committed")
RESULTS_KINDS = ("activated", "rolled_back", "rejected")
_BEFORE_SMOKE = frozenset(STEPS[:4])
_SLOT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
KeyLike = str | os.PathLike[str] | Ed25519PublicKey
_IO_HINT = "check free space and permissions of the agent's state folder (run as the agent's user)"


@dataclass(frozen=True)
class Slot:
    """One installed bundle: ``<state>/models/<id>``."""

    id: str
    path: Path
    manifest: Manifest
    bundle_sha256: str
    installed: float  # unix seconds

    @property
    def model_ref(self) -> dict[str, Any]:
        """``{name, version, sha256}`` as events and telemetry name a model (sha256 of the model file)."""
        m = self.manifest
        return {"name": m.name, "version": m.version, "sha256": m.files[m.model].sha256}

    def to_dict(self) -> dict[str, Any]:
        m = self.manifest
        return {"slot": self.id, "name": m.name, "version": m.version, "profile": m.profile,
                "bundle_sha256": self.bundle_sha256, "installed": self.installed, "path": str(self.path)}


@dataclass(frozen=True)
class Pointer:
    """The content of ``current.json``."""

    active: str | None
    previous: str | None
    state: str  # "committed" | "trial"
    since: float

    def to_dict(self) -> dict[str, Any]:
        return {"schema": STORE_SCHEMA, "active": self.active, "previous": self.previous, "state": self.state,
                "since": self.since}


def slot_id(manifest: Manifest, bundle_sha256: str) -> str:
    """``<name>-<version>-<first 12 hex of the bundle's sha256>``, made safe as a folder name."""
    name = _UNSAFE.sub("_", manifest.name)[:64] or "model"
    if not (name[0].isalnum() or name[0] == "_"):
        name = "_" + name[1:]
    version = _UNSAFE.sub("_", manifest.version)[:64]
    return f"{name}-{version}-{bundle_sha256[:12]}"



def _write_json(path: Path, data: Any) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    tmp: Path | None = None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise ModelStoreError(f"cannot write {path}: {e.strerror or e}", hint=_IO_HINT) from e
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
        _fsync_dir(path.parent)
    except OSError as e:
        raise ModelStoreError(f"cannot remove {path}: {e.strerror or e}", hint=_IO_HINT) from e


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                h.update(block)
    except FileNotFoundError as e:
        raise BundleError(f"bundle {path}: no such file", reason="not_found",
                          hint="check the path; a bundle is the *.edgebundle file written by edgekit") from e
    except OSError as e:
        raise BundleError(f"bundle {path}: cannot read: {e.strerror or e}", reason="io_error",
                          hint="check the file's permissions") from e
    return h.hexdigest()


def _tampered(slot: Slot, what: str) -> BundleError:
    return BundleError(f"model slot {slot.path}: {what}", reason="tampered",
                       hint="the installed copy changed after it was verified (disk fault or tampering); deploy "
                            "the bundle again, or go back with `edge-agent models rollback` / `activate`")


class ModelStore:
    """Slots, the pointer, the journal and the results under ``<state_dir>/models`` (see module docstring).

    ``public_key`` (the pinned host key: a path or a loaded key) is needed to stage, load and activate; it
    may be None for read-only use (listing). ``keep`` is how many of the newest slots ``commit`` keeps
    besides the active and previous ones.
    """

    def __init__(self, state_dir: str | os.PathLike[str], public_key: KeyLike | None, *, keep: int = DEFAULT_KEEP,
                 hook: Callable[[str], None] | None = None) -> None:
        if keep < 1:
            raise InputError(f"the model store must keep at least 1 version, got {keep}")
        self.state_dir = Path(state_dir)
        self.root = self.state_dir / MODELS_DIR
        self.keep = keep
        self._hook_fn = hook
        if public_key is None or isinstance(public_key, Ed25519PublicKey):
            self._key = public_key
        else:
            self._key = load_public_key(public_key)
        self._mutex = threading.RLock()
        self._depth = 0
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------------------ reading

    def pointer(self) -> Pointer:
        """``current.json`` (a store without one: nothing active). Corrupt → ``ModelStoreError``."""
        path = self.root / POINTER
        raw = self._read_json(path)
        if raw is None:
            return Pointer(None, None, "committed", 0.0)
        try:
            return _parse_pointer(raw)
        except ValueError as e:
            raise self._corrupt(path, str(e)) from e

    @property
    def active(self) -> Slot | None:
        p = self.pointer()
        return None if p.active is None else self._slot(p.active)

    @property
    def previous(self) -> Slot | None:
        p = self.pointer()
        return None if p.previous is None else self._slot(p.previous)

    def slots(self) -> list[Slot]:
        """Every readable slot, newest first (a folder that cannot be read is logged and skipped)."""
        try:
            entries = sorted(e.name for e in os.scandir(self.root)
                             if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []
        except OSError as e:
            raise ModelStoreError(f"cannot list {self.root}: {e.strerror or e}", hint=_IO_HINT) from e
        out = []
        for name in entries:
            try:
                out.append(self._slot(name))
            except ModelStoreError as e:
                log.warning("%s", e)
        out.sort(key=lambda s: (s.installed, s.id), reverse=True)
        return out

    def find(self, version_or_slot_id: str) -> Slot | None:
        """The slot with this id, else the newest slot of this version, else None."""
        slots = self.slots()
        for s in slots:
            if s.id == version_or_slot_id:
                return s
        return next((s for s in slots if s.manifest.version == version_or_slot_id), None)

    def result(self, sha256: str) -> dict[str, Any] | None:
        """The last result recorded for a bundle: ``{result, reason, message, ts}`` or None."""
        return self._results().get(sha256)

    def journal(self) -> dict[str, Any] | None:
        """The activation in progress (``journal.json``), or None when idle."""
        raw = self._read_json(self.root / JOURNAL)
        if raw is None:
            return None
        if not (isinstance(raw, dict) and isinstance(raw.get("bundle_sha256"), str)
                and isinstance(raw.get("step"), str) and isinstance(raw.get("slot"), (str, type(None)))):
            raise ModelStoreError(f"activation journal {self.root / JOURNAL} is corrupt (not a journal object)",
                                  hint="restart edge-agent: it discards the journal and rolls back what it "
                                       "cannot prove")
        return raw

    def load(self, slot: Slot) -> UnpackedBundle:
        """Re-verify a slot (manifest signature with the pinned key, every member's size and sha256).

        Any mismatch is a ``BundleError`` with reason ``tampered``.
        """
        key = self._pinned()
        root = slot.path
        manifest_bytes = self._read_member(slot, MANIFEST_NAME)
        signature = self._read_member(slot, SIGNATURE_NAME)
        if not verify(key, manifest_bytes, signature):
            raise _tampered(slot, f"the manifest signature does not verify with the pinned key {fingerprint(key)} "
                                  "(the slot was modified, or the device now pins another key)")
        try:
            manifest = parse_manifest(json.loads(manifest_bytes.decode("utf-8")))
        except (ValueError, RecursionError, BundleError) as e:
            raise _tampered(slot, f"manifest.json does not parse: {e}") from e
        if slot_id(manifest, slot.bundle_sha256) != slot.id:
            raise _tampered(slot, f"its manifest ({manifest.name} {manifest.version}) does not match the slot")
        real_root = os.path.realpath(root)
        for name, entry in manifest.files.items():
            parts = name.split("/")
            folder = root.joinpath(*parts[:-1])
            if len(parts) > 1 and os.path.realpath(folder) != os.path.join(real_root, *parts[:-1]):
                raise _tampered(slot, f"member {name!r} lies behind a symbolic link")
            size, digest = self._hash_member(slot, name)
            if size != entry.size:
                raise _tampered(slot, f"member {name!r} is {size} bytes, the signed manifest says {entry.size}")
            if digest != entry.sha256:
                raise _tampered(slot, f"member {name!r}: its sha256 differs from the signed manifest")
        return UnpackedBundle(root, manifest, fingerprint(key))

    # ------------------------------------------------------------------------------ activation steps

    def stage(self, bundle_path: str | os.PathLike[str], *, source: str, sha256: str | None = None) -> Slot:
        """Verify a bundle and unpack it into a new slot (or reuse the same slot when it still verifies).

        Starts the activation (journal). A bundle that fails verification is recorded as ``rejected``
        with its ``BundleError`` reason, the journal is removed and the error raised. ``sha256``: the
        bundle file's, when the caller has just computed it (it names the slot; members are verified anyway).
        """
        bundle = Path(bundle_path)
        key = self._pinned()
        sha = sha256 or _sha256_file(bundle)
        with self._locked():
            current = self.journal()
            if current is not None:
                raise ModelStoreError(
                    f"an activation is already in progress (bundle {current['bundle_sha256'][:12]}, step "
                    f"{current['step']!r}, journal {self.root / JOURNAL})",
                    hint="wait for it to end; if the agent is not running, start it: it finishes or rolls back "
                         "the interrupted activation first")
            self._write_journal({"schema": STORE_SCHEMA, "bundle_sha256": sha, "file": bundle.name,
                                 "source": source, "slot": None, "step": "journal", "started": time.time()})
        self._hook("journal")
        try:
            return self._stage(bundle, sha, source, key)
        except EdgekitError as e:
            reason = getattr(e, "reason", "io_error")
            with self._locked():
                self.record_result(sha, "rejected", reason, e.message)
                _remove(self.root / JOURNAL)
            raise

    def note_step(self, step: str) -> None:
        """Record the agent's step of the activation in progress (e.g. ``smoke``, ``health``) in the journal."""
        if not step or step in ("rolling_back",):
            raise InputError(f"note_step: {step!r} is not a step the agent can record")
        with self._locked():
            journal = self.journal()
            if journal is None:
                raise ModelStoreError(f"no activation in progress in {self.root} to record step {step!r} in",
                                      hint="stage() a bundle (or switch() to a slot) first")
            journal["step"] = step
            self._write_journal(journal)
        self._hook(step)

    def switch(self, slot: Slot) -> None:
        """Point at ``slot`` on trial: active = slot, previous = the old active."""
        with self._locked():
            ptr = self.pointer()
            if ptr.state == "trial":
                raise ModelStoreError(f"slot {ptr.active} is already on trial in {self.root}",
                                      hint="commit() or rollback() it before switching again")
            if not (self.root / slot.id).is_dir():
                raise ModelStoreError(f"slot {slot.id} is not in {self.root}", hint="stage() the bundle again")
            journal = self.journal()
            if journal is None or journal.get("slot") != slot.id:  # a switch to an existing slot (a command)
                journal = {"schema": STORE_SCHEMA, "bundle_sha256": slot.bundle_sha256, "file": None,
                           "source": "slot", "slot": slot.id, "started": time.time()}
            journal.update(step="switched", before={"active": ptr.active, "previous": ptr.previous})
            self._write_journal(journal)
            previous = ptr.active if ptr.active != slot.id else ptr.previous
            self._write_pointer(Pointer(slot.id, previous, "trial", time.time()))
        self._hook("switched")

    def commit(self) -> Slot:
        """The slot on trial proved itself: pointer committed, result ``activated``, journal removed, prune."""
        with self._locked():
            ptr = self.pointer()
            if ptr.state != "trial" or ptr.active is None:
                raise ModelStoreError(f"nothing to commit in {self.root}: no slot is on trial",
                                      hint="switch() to the new slot first")
            self._write_pointer(Pointer(ptr.active, ptr.previous, "committed", time.time()))
        self._hook("committed")
        with self._locked():
            journal = self._journal_or_none()
            slot = self._slot(ptr.active)
            sha = journal["bundle_sha256"] if journal and journal.get("slot") == slot.id else slot.bundle_sha256
            self.record_result(sha, "activated")
            _remove(self.root / JOURNAL)
            self.prune()
        return slot

    def rollback(self, reason: str, stage: str, message: str) -> Slot | None:
        """End the activation in progress, or leave the active model; returns the slot now active.

        During an activation: a slot on trial gives way to the pointer as it was before the switch (before
        the switch the pointer is left alone); the bundle is recorded ``rolled_back``. Without one: active =
        the previous slot (None when there is none), previous = None, and the left slot's bundle is recorded
        ``rolled_back``. The pointer ends ``committed``.
        """
        with self._locked():
            journal = self._journal_or_none()
            ptr = self.pointer()
            sha: str | None = None
            new: Pointer | None = None
            if journal is not None:
                journal["step"] = "rolling_back"
                journal["rollback"] = {"reason": reason, "stage": stage, "message": message}
                self._write_journal(journal)
                sha = journal["bundle_sha256"]
                if ptr.state == "trial":
                    before = _before(journal) or {"active": ptr.previous, "previous": None}
                    new = Pointer(before["active"], before["previous"], "committed", time.time())
            else:
                if ptr.active is not None:
                    left = self._slot_or_none(ptr.active)
                    sha = left.bundle_sha256 if left is not None else None
                new = Pointer(ptr.previous, None, "committed", time.time())
            if new is not None:
                self._write_pointer(new)
        self._hook("rolled_back")
        with self._locked():
            if sha is not None:
                self.record_result(sha, "rolled_back", reason, message)
            _remove(self.root / JOURNAL)
            return self.active

    def activate(self, version_or_id: str) -> Slot:
        """Make an installed slot the active one by hand (verified first; committed directly).

        previous = the old active. Refused while an activation is in progress.
        """
        slot = self.find(version_or_id)
        if slot is None:
            known = ", ".join(f"{s.manifest.version} ({s.id})" for s in self.slots()) or "none"
            raise InputError(f"no model {version_or_id!r} in the store {self.root} (installed: {known})",
                             hint="`edge-agent models list` shows the installed versions and slot ids")
        self.load(slot)  # a slot that no longer verifies is never pointed at
        with self._locked():
            journal = self.journal()
            if journal is not None:
                raise ModelStoreError(
                    f"an activation is in progress (bundle {journal['bundle_sha256'][:12]}, "
                    f"step {journal['step']!r})",
                    hint="wait for it to end, then activate again")
            try:
                ptr = self.pointer()
            except ModelStoreError as e:
                log.warning("%s; writing a new pointer to %s", e.message, slot.id)
                ptr = Pointer(None, None, "committed", 0.0)
            if ptr.active == slot.id and ptr.state == "committed":
                return slot
            previous = ptr.active if ptr.active != slot.id else ptr.previous
            if previous is not None and self._slot_or_none(previous) is None:
                previous = None
            self._write_pointer(Pointer(slot.id, previous, "committed", time.time()))
            self.record_result(slot.bundle_sha256, "activated", "command", f"activated by hand ({slot.id})")
        return slot

    def record_result(self, sha256: str, result: str, reason: str | None = None,
                      message: str | None = None) -> None:
        """Record a bundle's last result in ``results.json``.

        A ``rejected`` / ``rolled_back`` result for the bundle of the activation in progress also ends
        that activation (the journal is removed) unless its slot is on trial (use ``rollback`` then).
        """
        if result not in RESULTS_KINDS:
            raise InputError(f"result {result!r} is not one of {', '.join(RESULTS_KINDS)}")
        with self._locked():
            results = self._results()
            results[sha256] = {"result": result, "reason": reason, "message": message, "ts": time.time()}
            if len(results) > MAX_RESULTS:
                newest = sorted(results.items(), key=lambda kv: kv[1].get("ts") or 0.0, reverse=True)
                results = dict(newest[:MAX_RESULTS])
            _write_json(self.root / RESULTS, results)
            if result != "activated":
                journal = self._journal_or_none()
                if journal is not None and journal["bundle_sha256"] == sha256 and not self._on_trial():
                    _remove(self.root / JOURNAL)

    def prune(self) -> list[str]:
        """Remove slots of bundles that failed (refused, rolled back) and slots beyond the newest ``keep``
        that did not; never the active, previous or in-progress one. A failed bundle so never pushes a
        working version out of the store."""
        removed: list[str] = []
        with self._locked():
            try:
                ptr = self.pointer()
            except ModelStoreError as e:
                log.warning("not pruning: %s", e.message)
                return removed
            journal = self._journal_or_none()
            results = self._results()
            failed = {s.id for s in self.slots()
                      if (results.get(s.bundle_sha256) or {}).get("result") in ("rejected", "rolled_back")}
            slots = [s for s in self.slots() if s.id not in failed] + [s for s in self.slots() if s.id in failed]
            keepers = {s.id for s in slots[: self.keep] if s.id not in failed} | {ptr.active, ptr.previous}
            if journal is not None:
                keepers.add(journal.get("slot"))
            for s in slots:
                if s.id in keepers:
                    continue
                self._discard(s.path)
                removed.append(s.id)
                log.info("pruned model slot %s", s.id)
        return removed

    # ------------------------------------------------------------------------------ recovery

    def recover(self) -> list[dict[str, Any]]:
        """Bring the store to a consistent state at start; returns the events the agent should publish.

        Removes staging leftovers; a corrupt pointer falls back to the newest slot that verifies (an
        ``error`` event); a slot on ``trial`` gives way to the one before it (``rolled_back``, stage
        ``restart``, reason ``interrupted``); an activation interrupted before the switch is recorded
        ``rejected`` (``deploy_rejected``, reason ``interrupted``) or ``rolled_back``.
        """
        events: list[dict[str, Any]] = []
        with self._locked():
            self._clean_leftovers()
            try:
                journal = self.journal()
            except ModelStoreError as e:
                log.warning("%s; discarding it", e.message)
                _remove(self.root / JOURNAL)
                journal = None
                events.append({"kind": "error", "what": "model_store_journal", "message": e.message})
            avoid = {journal["slot"]} if journal and journal.get("slot") else set()
            ptr = self._recover_pointer(avoid, events)
            if ptr.state == "trial":
                events.append(self._recover_trial(ptr, journal))
            elif journal is not None:
                events.append(self._recover_journal(ptr, journal))
        return events

    def _recover_pointer(self, avoid: set[str], events: list[dict[str, Any]]) -> Pointer:
        try:
            ptr = self.pointer()
        except ModelStoreError as e:
            chosen = self._fallback(avoid, last_resort=True)
            ptr = Pointer(chosen.id if chosen else None, None, "committed", time.time())
            self._write_pointer(ptr)
            msg = (f"{e.message}; " + (f"fell back to slot {chosen.id}, the newest that verifies" if chosen
                                       else "no slot verifies: no model is active"))
            log.warning("%s", msg)
            events.append({"kind": "error", "what": "model_store_corrupt", "message": msg})
            return ptr
        previous = ptr.previous if ptr.previous is None or self._slot_or_none(ptr.previous) else None
        if previous != ptr.previous:
            log.warning("the previous slot %s is missing or unreadable; forgetting it", ptr.previous)
        if ptr.active is not None and self._slot_or_none(ptr.active) is None and ptr.state == "committed":
            chosen = self._slot_or_none(previous) if previous else None
            if chosen is None:
                chosen = self._fallback(avoid | {ptr.active}, last_resort=True)
            msg = (f"the active slot {ptr.active} is missing or unreadable in {self.root}; "
                   + (f"fell back to slot {chosen.id}" if chosen else "no other slot verifies: no model active"))
            log.warning("%s", msg)
            events.append({"kind": "error", "what": "model_store_corrupt", "message": msg})
            ptr = Pointer(chosen.id if chosen else None, None, "committed", time.time())
            self._write_pointer(ptr)
        elif previous != ptr.previous:
            ptr = Pointer(ptr.active, previous, ptr.state, ptr.since)
            self._write_pointer(ptr)
        return ptr

    def _recover_trial(self, ptr: Pointer, journal: dict[str, Any] | None) -> dict[str, Any]:
        trial = ptr.active
        assert trial is not None
        ours = journal is not None and journal.get("slot") == trial
        before = _before(journal) if ours and journal is not None else None
        target = before["active"] if before else ptr.previous
        prev = before["previous"] if before else None
        to = self._slot_or_none(target) if target else None
        if target is not None and to is None:  # named but gone: the newest other slot that verifies
            to = self._fallback({trial}, last_resort=False)
        if prev is not None and (self._slot_or_none(prev) is None or (to is not None and prev == to.id)):
            prev = None
        self._write_pointer(Pointer(to.id if to else None, prev, "committed", time.time()))
        trial_slot = self._slot_or_none(trial)
        sha = journal["bundle_sha256"] if ours and journal is not None else (
            trial_slot.bundle_sha256 if trial_slot else None)
        rb = journal.get("rollback") if ours and journal is not None else None
        if isinstance(rb, dict):
            stage, reason, message = str(rb.get("stage")), str(rb.get("reason")), str(rb.get("message"))
        else:
            stage, reason = "restart", "interrupted"
            message = (f"the agent stopped (crash, restart or power cut) while slot {trial} was on trial; back to "
                       f"{to.id if to else 'no model'}; the bundle is not retried automatically")
        log.warning("%s", message)
        if sha is not None:
            self.record_result(sha, "rolled_back", reason, message)
        _remove(self.root / JOURNAL)
        return {"kind": "rolled_back", "bundle_sha256": sha, "stage": stage, "reason": reason, "message": message,
                "to": to.model_ref if to else None}

    def _recover_journal(self, ptr: Pointer, journal: dict[str, Any]) -> dict[str, Any]:
        sha, sid, step = journal["bundle_sha256"], journal.get("slot"), journal["step"]
        before = _before(journal)
        active = self._slot_or_none(ptr.active) if ptr.active else None
        rb = journal.get("rollback")
        event: dict[str, Any]
        if step == "rolling_back" and isinstance(rb, dict):
            message = str(rb.get("message"))
            self.record_result(sha, "rolled_back", str(rb.get("reason")), message)
            event = {"kind": "rolled_back", "bundle_sha256": sha, "stage": str(rb.get("stage")),
                     "reason": str(rb.get("reason")), "message": message,
                     "to": active.model_ref if active else None}
        elif sid is not None and ptr.active == sid and before is not None and before["active"] != sid:
            # the pointer was committed, the agent stopped before clearing the journal
            self.record_result(sha, "activated")
            prev = self._slot_or_none(ptr.previous) if ptr.previous else None
            event = {"kind": "activated", "bundle_sha256": sha, "model": active.model_ref if active else None,
                     "previous": prev.model_ref if prev else None, "smoke": None, "took_s": None}
        elif step in _BEFORE_SMOKE:
            message = (f"the activation of bundle {sha[:12]} was interrupted at step {step!r} (crash, restart or "
                       "power cut); the bundle is not retried automatically: push it again")
            if active is None or active.bundle_sha256 != sha:
                self.record_result(sha, "rejected", "interrupted", message)
            event = {"kind": "deploy_rejected", "bundle_sha256": sha, "reason": "interrupted", "message": message}
        else:
            message = (f"the activation of slot {sid} was interrupted at step {step!r} (crash, restart or power "
                       f"cut); {active.id if active else 'no model'} stays active; the bundle is not retried "
                       "automatically")
            if active is None or active.bundle_sha256 != sha:
                self.record_result(sha, "rolled_back", "interrupted", message)
            event = {"kind": "rolled_back", "bundle_sha256": sha, "stage": "restart", "reason": "interrupted",
                     "message": message, "to": active.model_ref if active else None}
        log.warning("%s", event.get("message") or f"activation of {sid} completed before the restart")
        _remove(self.root / JOURNAL)
        return event

    def _fallback(self, avoid: set[str], *, last_resort: bool) -> Slot | None:
        """The newest slot that verifies, outside ``avoid`` (then inside it when ``last_resort``)."""
        slots = self.slots()
        groups = [[s for s in slots if s.id not in avoid]]
        if last_resort:
            groups.append([s for s in slots if s.id in avoid])
        for group in groups:
            for s in group:
                try:
                    self.load(s)
                except BundleError as e:
                    log.warning("slot %s does not verify: %s", s.id, e.message)
                    continue
                return s
        return None

    def _clean_leftovers(self) -> None:
        removed = []
        for entry in os.scandir(self.root):
            name = entry.name
            if entry.is_dir(follow_symlinks=False) and (name.startswith(STAGING_PREFIX)
                                                        or (name.startswith(".") and ".unpack-" in name)):
                shutil.rmtree(entry.path)
                removed.append(name)
            elif name.startswith(".") and name.endswith(".tmp") and not entry.is_dir(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(name)
        if removed:
            _fsync_dir(self.root)
            log.info("removed leftovers of an interrupted activation in %s: %s", self.root, ", ".join(removed))

    # ------------------------------------------------------------------------------ internals

    def _stage(self, bundle: Path, sha: str, source: str, key: Ed25519PublicKey) -> Slot:
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        except OSError as e:
            raise ModelStoreError(f"cannot create a staging folder in {self.root}: {e.strerror or e}",
                                  hint=_IO_HINT) from e
        try:
            unpacked = unpack_bundle(bundle, staging / "slot", key)
            sid = slot_id(unpacked.manifest, sha)
            self._update_journal(slot=sid, step="verified")
            self._hook("verified")
            target = self.root / sid
            if target.exists() or target.is_symlink():
                existing = self._reusable(sid, sha)
                if existing is not None:
                    log.info("bundle %s is already installed in slot %s: reusing it", bundle.name, sid)
                    self._update_journal(step="slot")
                    return existing
            _write_json(staging / "slot" / SLOT_META, {"schema": STORE_SCHEMA, "bundle_sha256": sha,
                                                       "installed": time.time(), "source": source,
                                                       "file": bundle.name})
            self._update_journal(step="unpacked")
            self._hook("unpacked")
            with self._locked():
                try:
                    if target.exists() or target.is_symlink():  # a slot that no longer verifies: replaced
                        os.replace(target, staging / "replaced")
                    os.replace(staging / "slot", target)
                    _fsync_dir(self.root)
                except OSError as e:
                    raise ModelStoreError(f"cannot move the unpacked bundle to {target}: {e.strerror or e}",
                                          hint=_IO_HINT) from e
            self._update_journal(step="slot")
            self._hook("slot")
            return self._slot(sid)
        finally:
            try:
                shutil.rmtree(staging)
            except FileNotFoundError:
                pass
            except OSError as e:  # recover() removes it at the next start
                log.warning("cannot remove the staging folder %s: %s", staging, e.strerror)

    def _reusable(self, sid: str, sha: str) -> Slot | None:
        slot = self._slot_or_none(sid)
        if slot is None or slot.bundle_sha256 != sha:
            log.warning("slot folder %s exists but is not this bundle's: replacing it", sid)
            return None
        try:
            self.load(slot)
        except BundleError as e:
            log.warning("slot %s no longer verifies (%s): replacing it", sid, e.message)
            return None
        return slot

    def _discard(self, path: Path) -> None:
        """Rename a slot out of the way (a staging name), then delete it: never a half-deleted slot."""
        try:
            holder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}prune-", dir=self.root))
            os.replace(path, holder / "slot")
            _fsync_dir(self.root)
            shutil.rmtree(holder)
        except OSError as e:
            raise ModelStoreError(f"cannot remove the slot {path}: {e.strerror or e}", hint=_IO_HINT) from e

    def _slot(self, sid: str) -> Slot:
        path = self.root / sid
        if not _SLOT_ID.fullmatch(sid) or path.is_symlink() or not path.is_dir():
            raise ModelStoreError(f"slot {sid!r} is not in the model store {self.root}",
                                  hint="`edge-agent models list` shows the installed slots")
        try:
            manifest = parse_manifest(json.loads((path / MANIFEST_NAME).read_bytes().decode("utf-8")))
            meta = json.loads((path / SLOT_META).read_text("utf-8"))
            sha, installed = meta["bundle_sha256"], meta["installed"]
            if not isinstance(sha, str) or not _SHA256.fullmatch(sha) or isinstance(installed, bool):
                raise ValueError(f"bad bundle_sha256 or installed in {SLOT_META}")
            installed = float(installed)
        except (OSError, ValueError, RecursionError, KeyError, TypeError, BundleError) as e:
            raise ModelStoreError(f"model slot {path} cannot be read: {e}",
                                  hint="remove the folder and deploy the bundle again") from e
        return Slot(sid, path, manifest, sha, installed)

    def _slot_or_none(self, sid: str | None) -> Slot | None:
        if sid is None:
            return None
        try:
            return self._slot(sid)
        except ModelStoreError:
            return None

    def _read_member(self, slot: Slot, name: str) -> bytes:
        try:
            fd = os.open(slot.path / name, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except FileNotFoundError as e:
            raise _tampered(slot, f"{name} is missing") from e
        except OSError as e:
            raise BundleError(f"model slot {slot.path}: cannot read {name}: {e.strerror or e}", reason="io_error",
                              hint=_IO_HINT) from e

    def _hash_member(self, slot: Slot, name: str) -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        try:
            fd = os.open(slot.path.joinpath(*name.split("/")), os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                while block := f.read(_CHUNK):
                    h.update(block)
                    size += len(block)
        except FileNotFoundError as e:
            raise _tampered(slot, f"member {name!r} is missing") from e
        except OSError as e:
            if e.errno == errno.ELOOP:  # O_NOFOLLOW on a symbolic link
                raise _tampered(slot, f"member {name!r} is a symbolic link") from e
            raise BundleError(f"model slot {slot.path}: cannot read member {name!r}: {e.strerror or e}",
                              reason="io_error", hint=_IO_HINT) from e
        return size, h.hexdigest()

    def _read_json(self, path: Path) -> Any:
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ModelStoreError(f"cannot read {path}: {e.strerror or e}", hint=_IO_HINT) from e
        except UnicodeDecodeError as e:
            raise self._corrupt(path, "not UTF-8 text") from e
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as e:
            raise self._corrupt(path, f"not JSON: {e}") from e

    def _corrupt(self, path: Path, why: str) -> ModelStoreError:
        if path.name == POINTER:
            hint = ("start edge-agent: it falls back to the newest slot that verifies; or choose the model with "
                    "`edge-agent models activate VERSION`, which writes a new pointer")
        elif path.name == JOURNAL:
            hint = "restart edge-agent: it discards the journal and rolls back what it cannot prove"
        else:
            hint = f"remove {path}; it is rewritten at the next activation"
        return ModelStoreError(f"model store file {path} is corrupt ({why})", hint=hint)

    def _results(self) -> dict[str, dict[str, Any]]:
        path = self.root / RESULTS
        try:
            raw = self._read_json(path)
        except ModelStoreError as e:
            log.warning("%s; starting a new results file", e.message)
            return {}
        if not isinstance(raw, dict):
            return {}
        return {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, dict)}

    def _on_trial(self) -> bool:
        try:
            return self.pointer().state == "trial"
        except ModelStoreError:
            return True  # unknown: leave the journal to recover()

    def _journal_or_none(self) -> dict[str, Any] | None:
        try:
            return self.journal()
        except ModelStoreError as e:
            log.warning("%s", e.message)
            return None

    def _write_journal(self, journal: dict[str, Any]) -> None:
        _write_json(self.root / JOURNAL, journal)

    def _update_journal(self, **fields: Any) -> None:
        with self._locked():
            journal = self.journal()
            if journal is None:
                raise ModelStoreError(f"the activation journal {self.root / JOURNAL} vanished during staging",
                                      hint="only one edge-agent may serve a state folder")
            journal.update(fields)
            self._write_journal(journal)

    def _write_pointer(self, ptr: Pointer) -> None:
        _write_json(self.root / POINTER, ptr.to_dict())
        log.info("model pointer: active=%s previous=%s state=%s", ptr.active, ptr.previous, ptr.state)

    def _pinned(self) -> Ed25519PublicKey:
        if self._key is None:
            raise KeyFileError("the model store needs the pinned public key to verify models",
                               hint="pass --pubkey PATH (the host's edgekit-signing.pub)")
        return self._key

    def _hook(self, step: str) -> None:
        if self._hook_fn is not None:
            self._hook_fn(step)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                try:
                    self.root.mkdir(parents=True, exist_ok=True)
                    fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                except OSError as e:
                    raise ModelStoreError(f"cannot open the model store {self.root}: {e.strerror or e}",
                                          hint=_IO_HINT) from e
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)  # closing releases the flock
                    self._lock_fd = None


def _parse_pointer(raw: Any) -> Pointer:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    if raw.get("schema") != STORE_SCHEMA or isinstance(raw.get("schema"), bool):
        raise ValueError(f"schema {raw.get('schema')!r}, expected {STORE_SCHEMA}")
    for key in ("active", "previous"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not _SLOT_ID.fullmatch(value)):
            raise ValueError(f"{key} {value!r} is not a slot id")
    state = raw.get("state")
    if state not in ("committed", "trial"):
        raise ValueError(f"state {state!r} is not committed or trial")
    if state == "trial" and raw.get("active") is None:
        raise ValueError("state trial without an active slot")
    since = raw.get("since", 0.0)
    if isinstance(since, bool) or not isinstance(since, (int, float)):
        raise ValueError(f"since {since!r} is not a number")
    return Pointer(raw.get("active"), raw.get("previous"), state, float(since))


def _before(journal: dict[str, Any] | None) -> dict[str, str | None] | None:
    """The pointer before the switch, as ``switch`` recorded it in the journal."""
    before = journal.get("before") if journal else None
    if not isinstance(before, dict):
        return None
    out: dict[str, str | None] = {}
    for key in ("active", "previous"):
        value = before.get(key)
        out[key] = value if isinstance(value, str) and _SLOT_ID.fullmatch(value) else None
    return out
