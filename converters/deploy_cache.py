"""A cache of converted bundles for `edgekit deploy`: the same inputs are not converted twice.

``cache_key`` is a pure function of everything that changes the bundle: the SHA-256 of a canonical JSON
document (sorted keys, no spaces) holding

* ``model``: the model file's SHA-256 and suffix (it picks the converter), or for a folder (SavedModel)
  every file's relative path and SHA-256 and every sub-folder's relative path, sorted;
* ``calib``: the calibration source the same way (a file, or a folder with its class sub-folders), or null;
* ``profile``: the profile's full content as loaded (``Profile.to_dict()``; its file's path is not part);
* ``options``: the conversion options that change the result (``name``, ``version``, ``mode``,
  ``preprocessing``, ``seed``, ``overrides``, the signer's key fingerprint, ...). Values are plain JSON
  values, tuples (as lists), sets (sorted), dataclasses (their fields) and ``Path`` objects, which stand
  for their *content* (a labels file, a validation source); anything else is an ``InputError``;
* ``tools``: the versions of the packages that shape the result (``TOOLS``; ``"absent"`` when one is not
  installed): edgekit, tensorflow, onnxruntime, onnx, ai-edge-quantizer, and also ai-edge-litert (it
  computes the golden outputs) and numpy (it draws the calibration split).

The place and name of a model or calibration file, the order files were written in and their times (mtime)
do not matter, only suffixes, paths inside a folder and contents. (The bundle name defaults to the model
file's stem: pass the resolved ``name`` in ``options``.)

``DeployCache`` keeps one folder per key under ``~/.cache/edgekit/deploy``: the bundle and ``record.json``
(``schema``, ``key``, ``bundle`` file name, ``sha256``, ``size``, ``created``). An entry is written in a
hidden temp folder, fsynced, then renamed into place; ``get`` returns a bundle only when its SHA-256 still
matches the record (a damaged entry is removed with a warning), and marks the entry used for ``prune``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edge_agent.errors import CalibrationError, EdgekitError, InputError, ModelError
from edge_agent.fsutil import fsync_dir as _fsync_dir
from edge_agent.profiles import Profile

log = logging.getLogger(__name__)

KEY_SCHEMA = 1
RECORD_SCHEMA = 1
RECORD = "record.json"
DEFAULT_ROOT = Path.home() / ".cache" / "edgekit" / "deploy"
DEFAULT_KEEP = 20
STALE_TEMP_S = 3600.0  # a temp folder this old belongs to a put that died
TOOLS: dict[str, tuple[str, ...]] = {  # name in the key -> distributions that provide it, first found wins
    "edgekit": ("edgekit",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tensorflow-intel"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "ai-edge-quantizer": ("ai-edge-quantizer",),
    "ai-edge-litert": ("ai-edge-litert",),
    "numpy": ("numpy",),
}
_KEY = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------------------------------
# the key


def tool_versions() -> dict[str, str]:
    """The installed version of each of ``TOOLS`` (``"<distribution> <version>"`` when the distribution
    has another name, e.g. tensorflow-cpu), or ``"absent"``."""
    versions: dict[str, str] = {}
    for name, dists in TOOLS.items():
        versions[name] = "absent"
        for dist in dists:
            try:
                v = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
            versions[name] = v if dist == name else f"{dist} {v}"
            break
    return versions


def _file_sha256(path: Path, what: str, error: type[InputError]) -> str:
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} {path} is not a regular file", hint="give regular files and folders only")
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}", hint="check the path and its permissions") from e
    return h.hexdigest()


def content_digest(path: Path, what: str = "file", error: type[InputError] = InputError) -> dict[str, Any]:
    """What a file or folder holds, independent of where it is and of times: ``{"file": sha256, "suffix"}`` or
    ``{"folder": [[relative path, sha256 | "folder"], ...]}`` (sorted; symlinks followed)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist", hint="check the path")
    if not path.is_dir():  # the suffix picks the reader (.keras/.onnx/.tflite, .npy/.npz/.csv)
        return {"file": _file_sha256(path, what, error), "suffix": path.suffix.lower()}
    entries: list[list[str]] = []
    seen: set[tuple[int, int]] = set()
    def fail(e: OSError) -> None:
        raise error(f"cannot read {what} folder {e.filename}: {e.strerror}",
                    hint="check the path and its permissions") from e

    for top, dirs, files in os.walk(path, followlinks=True, onerror=fail):
        st = os.stat(top)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        rel_top = Path(top).relative_to(path)
        for d in dirs:
            entries.append([(rel_top / d).as_posix(), "folder"])
        for name in files:
            entries.append([(rel_top / name).as_posix(), _file_sha256(Path(top) / name, what, error)])
    entries.sort()
    return {"folder": entries}


def _canonical(value: Any, where: str) -> Any:
    """``value`` as plain JSON values (see the module doc); InputError for anything else."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InputError(f"option {where} is {value}, which has no canonical form",
                             hint="pass a finite number")
        return value
    if isinstance(value, Path):
        return {"content": content_digest(value, f"option {where}")}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__,
                "fields": {f.name: _canonical(getattr(value, f.name), f"{where}.{f.name}")
                           for f in dataclasses.fields(value)}}
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InputError(f"option {where} has a key {k!r} that is not a string", hint="use string keys")
            out[k] = _canonical(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        items = [_canonical(v, f"{where}{{}}") for v in value]
        return sorted(items, key=_dumps)
    raise InputError(f"option {where} is a {type(value).__name__}, which has no canonical form for the cache key",
                     hint="pass plain JSON values, tuples, sets, dataclasses or Path objects")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def cache_key(model: Path, calib: str | None, profile: Profile, options: dict[str, Any], *,
              versions: Mapping[str, str] | None = None) -> str:
    """The cache key (64 hex digits) of converting ``model`` for ``profile`` (see the module doc).

    ``versions`` replaces ``tool_versions()`` (for tests and for keys computed elsewhere).
    """
    document = {
        "schema": KEY_SCHEMA,
        "model": content_digest(Path(model), "model", ModelError),
        "calib": None if calib is None else content_digest(Path(calib), "calibration source", CalibrationError),
        "profile": _canonical(profile.to_dict(), "profile"),
        "options": _canonical(dict(options), "options"),
        "tools": _canonical(dict(tool_versions() if versions is None else versions), "tools"),
    }
    return hashlib.sha256(_dumps(document).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# the cache



class DeployCache:
    """Converted bundles by cache key (see the module doc)."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else DEFAULT_ROOT

    def _entry(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InputError(f"cache key {key!r} is not 64 lowercase hex digits", hint="use cache_key(...)")
        return self.root / key

    def _drop(self, entry: Path, why: str) -> None:
        log.warning("deploy cache entry %s %s; removed, the bundle will be converted again", entry, why)
        shutil.rmtree(entry, ignore_errors=True)

    def get(self, key: str) -> Path | None:
        """The cached bundle of ``key`` when it exists and its SHA-256 matches its record, else None."""
        entry = self._entry(key)
        record_path = entry / RECORD
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, ValueError) as e:
            self._drop(entry, f"has an unreadable record ({e})")
            return None
        name = record.get("bundle") if isinstance(record, dict) else None
        if (not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or record.get("key") != key
                or not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..", RECORD)):
            self._drop(entry, "has a record that does not match it")
            return None
        bundle = entry / name
        try:
            digest = _file_sha256(bundle, "cached bundle", InputError)
        except InputError as e:
            self._drop(entry, f"is damaged ({e.message})")
            return None
        if digest != record.get("sha256"):
            self._drop(entry, f"holds a bundle whose sha256 {digest[:12]}… differs from its record")
            return None
        try:
            os.utime(record_path)  # last used, for prune
        except OSError as e:
            log.warning("cannot mark deploy cache entry %s as used: %s", entry, e.strerror)
        return bundle

    def put(self, key: str, bundle: Path) -> Path:
        """Copy ``bundle`` into the cache under ``key`` (atomically, replacing an older entry); the cached path."""
        entry = self._entry(key)
        bundle = Path(bundle)
        if not bundle.is_file():
            raise InputError(f"bundle {bundle} is not a file", hint="pass the .edgebundle that convert wrote")
        tmp = self.root / f".tmp-{key[:12]}-{uuid.uuid4().hex[:8]}"
        old: Path | None = None
        try:
            tmp.mkdir(parents=True)
            h = hashlib.sha256()
            size = 0
            with open(bundle, "rb") as src, open(tmp / bundle.name, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            record = {"schema": RECORD_SCHEMA, "key": key, "bundle": bundle.name, "sha256": h.hexdigest(),
                      "size": size, "created": time.time()}
            with open(tmp / RECORD, "w", encoding="utf-8") as f:
                f.write(json.dumps(record, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if entry.exists():
                old = self.root / f".old-{key[:12]}-{uuid.uuid4().hex[:8]}"
                os.rename(entry, old)
            os.rename(tmp, entry)
            _fsync_dir(self.root)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists() and not entry.exists():
                os.rename(old, entry)  # put the previous entry back
            raise EdgekitError(f"cannot store bundle {bundle} in the deploy cache {self.root}: {e.strerror}",
                               hint="check free space and permissions, or pass another cache folder") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return entry / bundle.name

    def keys(self) -> list[str]:
        """The keys of the entries, most recently used first."""
        if not self.root.is_dir():
            return []
        found: list[tuple[int, str]] = []
        for p in self.root.iterdir():
            if _KEY.fullmatch(p.name) and p.is_dir():
                try:
                    used = (p / RECORD).stat().st_mtime_ns
                except OSError:
                    used = 0  # no record: a damaged entry, pruned first
                found.append((used, p.name))
        return [k for _, k in sorted(found, reverse=True)]

    def prune(self, keep: int = DEFAULT_KEEP) -> list[str]:
        """Remove all but the ``keep`` most recently used entries (and temp folders of puts that died);
        the removed keys."""
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise InputError(f"keep {keep!r} must be a whole number >= 0", hint="e.g. 20")
        removed = self.keys()[keep:]
        for key in removed:
            shutil.rmtree(self.root / key, ignore_errors=True)
        if self.root.is_dir():
            now = time.time()
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".old-")) and p.is_dir():
                    try:
                        stale = now - p.stat().st_mtime > STALE_TEMP_S
                    except OSError:
                        continue
                    if stale:
                        shutil.rmtree(p, ignore_errors=True)
        return removed
