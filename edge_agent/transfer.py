"""The MQTT chunk protocol for bundle delivery, shared by the host (sender) and the agent (receiver).

One MQTT message is one chunk: a UTF-8 JSON header, one ``\\n``, then the chunk's raw bytes::

    {"schema": 1, "transfer": "<sha256 of the whole bundle>", "name": "model-1.0.0-rpi4.edgebundle",
     "size": 4194816, "chunk_size": 262144, "index": 3, "count": 17, "sha256": "<sha256 of this chunk>"}

``split_bundle`` turns a file into such messages (streaming); ``decode_chunk`` validates one; ``Receiver``
reassembles chunks that arrive in any order and more than once, and survives restarts: each transfer
lives in ``<incoming>/<transfer>.part`` (chunks written at their offset) plus ``<transfer>.have`` (the
first header and a bitmap of the chunks on disk, replaced atomically after each chunk is fsynced). When
every chunk is there the whole file's sha256 is checked and the file is renamed to
``<incoming>/<transfer>.edgebundle``. Refusals raise ``TransferError`` with a ``reason`` code (see
``edge_agent.errors.TransferError`` and docs/deploy.md). This module imports nothing from converters/.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_agent.errors import InputError, TransferError
from edge_agent.fsutil import fsync_dir as _fsync_dir

log = logging.getLogger(__name__)

SCHEMA = 1
DEFAULT_CHUNK_SIZE = 256 * 1024
MAX_CHUNK_SIZE = 1 << 20  # 1 MiB
DEFAULT_MAX_SIZE = 1 << 30  # 1 GiB
DEFAULT_MAX_AGE_S = 7 * 86400
_HEADER_MAX = 4096  # a header line longer than this is malformed (the real one is ~300 bytes)
_KEYS = ("schema", "transfer", "name", "size", "chunk_size", "index", "count", "sha256")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_READ_BLOCK = 1 << 20


@dataclass(frozen=True)
class ChunkHeader:
    """The validated header of one chunk."""

    transfer: str  # sha256 of the whole bundle (lowercase hex), also the transfer's id
    name: str  # the bundle's file name on the sender (informational; files are stored by transfer id)
    size: int  # bytes of the whole bundle
    chunk_size: int  # bytes of every chunk but the last
    index: int  # 0-based
    count: int  # number of chunks, ceil(size / chunk_size)
    sha256: str  # sha256 of this chunk's bytes
    schema: int = SCHEMA

    @property
    def offset(self) -> int:
        return self.index * self.chunk_size

    @property
    def length(self) -> int:
        """Bytes this chunk must carry."""
        return chunk_length(self.size, self.chunk_size, self.index)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: d[k] for k in _KEYS}

    def transfer_fields(self) -> dict[str, Any]:
        """The fields every chunk of one transfer shares."""
        return {"transfer": self.transfer, "name": self.name, "size": self.size,
                "chunk_size": self.chunk_size, "count": self.count}


def chunk_count(size: int, chunk_size: int) -> int:
    """Number of chunks of a ``size``-byte file cut in ``chunk_size`` pieces."""
    return math.ceil(size / chunk_size)


def chunk_length(size: int, chunk_size: int, index: int) -> int:
    """Bytes of chunk ``index`` (the last one may be shorter)."""
    return min(chunk_size, size - index * chunk_size)


def file_sha256(path: Path | str) -> str:
    """sha256 (hex) of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _short(transfer: Any) -> str:
    return transfer[:12] if isinstance(transfer, str) else "?"


def encode_chunk(header: Mapping[str, Any], data: bytes) -> bytes:
    """One message: the header as compact JSON, ``\\n``, then ``data``. Pure; ``decode_chunk`` validates."""
    try:
        head = json.dumps(dict(header), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise TransferError(f"chunk header is not JSON-serialisable: {e}", reason="schema") from e
    return head.encode("utf-8") + b"\n" + bytes(data)


def _check_name(name: Any) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
            and not any(c in name for c in "/\\\x00\n"))


def decode_chunk(payload: bytes, *, max_size: int = DEFAULT_MAX_SIZE) -> tuple[ChunkHeader, bytes]:
    """Parse and check one message; the header and the chunk's bytes, or ``TransferError``.

    Reasons: ``malformed`` (no header line, not a JSON object), ``schema`` (unknown schema, missing or
    unknown keys, wrong types, bad hex, unsafe name), ``too_large`` (chunk_size over 1 MiB, size over
    ``max_size``), ``bad_count`` (count is not ceil(size / chunk_size)), ``bad_index`` (index outside
    0..count-1), ``bad_length`` (data length wrong for the index), ``bad_chunk`` (chunk sha256 mismatch).
    """
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TransferError(f"a chunk must be bytes, not {type(payload).__name__}", reason="malformed")
    payload = bytes(payload)
    nl = payload.find(b"\n", 0, _HEADER_MAX + 1)
    if nl < 0:
        raise TransferError(f"chunk message has no JSON header line within its first {_HEADER_MAX} bytes",
                            hint="a chunk is a JSON header, one newline, then the raw bytes (docs/deploy.md)",
                            reason="malformed")
    try:
        h = json.loads(payload[:nl].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise TransferError(f"chunk header is not UTF-8 JSON: {e}", reason="malformed") from e
    if not isinstance(h, dict):
        raise TransferError(f"chunk header is a JSON {type(h).__name__}, not an object", reason="malformed")
    schema = h.get("schema")
    if type(schema) is not int or schema != SCHEMA:
        raise TransferError(f"chunk header schema {schema!r} is not supported (this agent reads schema {SCHEMA})",
                            hint="update the agent or push with a matching edgekit version", reason="schema")
    missing = [k for k in _KEYS if k not in h]
    unknown = sorted(set(h) - set(_KEYS))
    if missing or unknown:
        raise TransferError(f"chunk header of transfer {_short(h.get('transfer'))}: missing keys {missing}, "
                            f"unknown keys {unknown}", reason="schema")
    for key in ("size", "chunk_size", "index", "count"):
        if type(h[key]) is not int:
            raise TransferError(f"chunk header field {key!r} must be an integer, not {h[key]!r}", reason="schema")
    for key in ("transfer", "sha256"):
        if not isinstance(h[key], str) or not _HEX64.fullmatch(h[key]):
            raise TransferError(f"chunk header field {key!r} must be 64 lowercase hex digits (a sha256), "
                                f"not {h[key]!r}", reason="schema")
    if not _check_name(h["name"]):
        raise TransferError(f"chunk header name {h['name']!r} is not a plain file name", reason="schema")
    where = f"chunk {h['index']} of transfer {h['transfer'][:12]} ({h['name']})"
    size, chunk_size, index, count = h["size"], h["chunk_size"], h["index"], h["count"]
    if size < 1 or chunk_size < 1:
        raise TransferError(f"{where}: size {size} and chunk_size {chunk_size} must be positive", reason="schema")
    if chunk_size > MAX_CHUNK_SIZE:
        raise TransferError(f"{where}: chunk_size {chunk_size} is over the limit of {MAX_CHUNK_SIZE} bytes",
                            hint=f"push with a chunk size of at most {MAX_CHUNK_SIZE} bytes", reason="too_large")
    if size > max_size:
        raise TransferError(f"{where}: the bundle's {size} bytes are over this device's limit of {max_size}",
                            hint="raise the agent's transfer size limit or make the bundle smaller",
                            reason="too_large")
    if count != chunk_count(size, chunk_size):
        raise TransferError(f"{where}: count {count} is not ceil({size} / {chunk_size}) = "
                            f"{chunk_count(size, chunk_size)}", reason="bad_count")
    if not 0 <= index < count:
        raise TransferError(f"{where}: index {index} is outside 0..{count - 1}", reason="bad_index")
    data = payload[nl + 1:]
    expected = chunk_length(size, chunk_size, index)
    if len(data) != expected:
        raise TransferError(f"{where}: carries {len(data)} bytes, expected {expected}", reason="bad_length")
    if hashlib.sha256(data).hexdigest() != h["sha256"]:
        raise TransferError(f"{where}: its bytes do not match the chunk's sha256 (corrupted in transit)",
                            hint="push the bundle again; the chunks already received are kept",
                            reason="bad_chunk")
    return ChunkHeader(transfer=h["transfer"], name=h["name"], size=size, chunk_size=chunk_size, index=index,
                       count=count, sha256=h["sha256"]), data


def split_bundle(path: Path | str, chunk_size: int = DEFAULT_CHUNK_SIZE, *, sha256: str | None = None,
                 name: str | None = None) -> Iterator[bytes]:
    """Yield the encoded chunk messages of a file, reading one chunk at a time.

    The whole-file sha256 (the transfer id) takes one reading pass first unless ``sha256`` is given.
    ``name`` defaults to the file's name. A file that changes size while being read raises
    ``TransferError`` (reason ``changed``).
    """
    path = Path(path)
    if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise InputError(f"chunk size {chunk_size!r} must be an integer between 1 and {MAX_CHUNK_SIZE} bytes")
    name = path.name if name is None else name
    if not _check_name(name):
        raise InputError(f"bundle name {name!r} cannot be sent: it must be a plain file name not starting "
                         "with '.'", hint="rename the bundle file")
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise InputError(f"bundle {path} is not a file")
        transfer = file_sha256(path) if sha256 is None else sha256
    except FileNotFoundError as e:
        raise InputError(f"bundle {path} does not exist", hint="check the path") from e
    except OSError as e:
        raise InputError(f"cannot read bundle {path}: {e}") from e
    if size == 0:
        raise InputError(f"bundle {path} is empty", hint="build the bundle again (edgekit convert)")
    count = chunk_count(size, chunk_size)
    with open(path, "rb") as f:
        for index in range(count):
            data = f.read(chunk_length(size, chunk_size, index))
            if len(data) != chunk_length(size, chunk_size, index):
                raise TransferError(f"bundle {path} got shorter while it was being sent", reason="changed",
                                    hint="do not rewrite a bundle while pushing it")
            header = {"schema": SCHEMA, "transfer": transfer, "name": name, "size": size,
                      "chunk_size": chunk_size, "index": index, "count": count,
                      "sha256": hashlib.sha256(data).hexdigest()}
            yield encode_chunk(header, data)
        if f.read(1):
            raise TransferError(f"bundle {path} got longer while it was being sent", reason="changed",
                                hint="do not rewrite a bundle while pushing it")


# ------------------------------------------------------------------------------------------------ receiver


class _State:
    """One transfer in progress: its first header's shared fields and the bitmap of chunks on disk."""

    def __init__(self, fields: dict[str, Any], bitmap: bytearray | None = None, started: float | None = None):
        self.fields = fields
        self.count: int = fields["count"]
        self.bitmap = bitmap if bitmap is not None else bytearray((self.count + 7) // 8)
        self.have = sum(bin(b).count("1") for b in self.bitmap)
        self.started = time.time() if started is None else started

    def has(self, i: int) -> bool:
        return bool(self.bitmap[i >> 3] & (1 << (i & 7)))

    def set(self, i: int) -> None:
        if not self.has(i):
            self.bitmap[i >> 3] |= 1 << (i & 7)
            self.have += 1

    def clear(self, i: int) -> None:
        if self.has(i):
            self.bitmap[i >> 3] &= ~(1 << (i & 7)) & 0xFF
            self.have -= 1

    def to_json(self) -> bytes:
        return json.dumps({"schema": SCHEMA, **self.fields, "started": self.started,
                           "have": self.bitmap.hex()}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, transfer: str) -> _State:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("schema") != SCHEMA or d.get("transfer") != transfer:
            raise ValueError("not a transfer record of this transfer")
        fields = {k: d[k] for k in ("transfer", "name", "size", "chunk_size", "count")}
        if any(type(fields[k]) is not int for k in ("size", "chunk_size", "count")):
            raise ValueError("size, chunk_size and count must be integers")
        if fields["count"] != chunk_count(fields["size"], fields["chunk_size"]):
            raise ValueError("count does not match size and chunk_size")
        if not _check_name(fields["name"]):
            raise ValueError("the name is not a plain file name")
        bitmap = bytearray.fromhex(d["have"])
        if len(bitmap) != (fields["count"] + 7) // 8 or int.from_bytes(bitmap, "little") >> fields["count"]:
            raise ValueError("the chunk bitmap does not match the chunk count")
        return cls(fields, bitmap, float(d["started"]))



class Receiver:
    """Reassembles chunked transfers in ``incoming_dir`` (thread-safe; one lock).

    ``max_bytes`` is the largest bundle one transfer may announce; ``max_age_s`` is how long an incomplete
    transfer is kept after its last chunk arrived (``expire``). One Receiver per folder and process.
    """

    def __init__(self, incoming_dir: Path | str, *, max_bytes: int = DEFAULT_MAX_SIZE,
                 max_age_s: float = DEFAULT_MAX_AGE_S) -> None:
        self.dir = Path(incoming_dir)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._states: dict[str, _State] = {}
        self._done: dict[str, int] = {}  # transfer -> count, completed by this instance
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TransferError(f"cannot create the transfer folder {self.dir}: {e}",
                                hint="check the agent's --state folder and its permissions",
                                reason="io_error") from e

    # paths
    def _part(self, transfer: str) -> Path:
        return self.dir / f"{transfer}.part"

    def _have(self, transfer: str) -> Path:
        return self.dir / f"{transfer}.have"

    def final_path(self, transfer: str) -> Path:
        """Where a completed transfer's bundle lands."""
        return self.dir / f"{transfer}.edgebundle"

    def _io_error(self, e: OSError, what: str, fields: Mapping[str, Any]) -> TransferError:
        where = f"transfer {fields['transfer'][:12]} ({fields['name']}) in {self.dir}"
        if e.errno == errno.ENOSPC:
            return TransferError(f"no space left on the device to {what} of {where}: {e}",
                                 hint=f"free space on the file system of {self.dir}; the chunks received so far "
                                 "are kept and a re-push completes the transfer", reason="io_error")
        return TransferError(f"cannot {what} of {where}: {e}",
                             hint=f"check that {self.dir} is writable and its file system healthy",
                             reason="io_error")

    # ------------------------------------------------------------------------------------------ public

    def add(self, payload: bytes) -> Path | None:
        """Store one chunk message; the completed bundle's path when it was the last missing chunk, else None.

        Duplicates and chunks of a transfer completed before (its ``.edgebundle`` exists) return None
        without writing. Raises ``TransferError`` for a bad chunk (see ``decode_chunk``), a header that
        disagrees with the transfer's first one (``mismatch``), a whole file whose sha256 differs from the
        transfer id (``tampered``; the part files are removed), or a write failure (``io_error``).
        """
        header, data = decode_chunk(payload, max_size=self.max_bytes)
        t = header.transfer
        with self._lock:
            if self.final_path(t).exists():
                self._states.pop(t, None)
                return None
            state = self._load(t)
            if state is None:
                state = self._begin(header)
            elif state.fields != header.transfer_fields():
                raise TransferError(
                    f"chunk {header.index} of transfer {t[:12]} disagrees with the transfer's first header "
                    f"(got {header.transfer_fields()}, first was {state.fields})",
                    hint="push the bundle again with the same chunk size", reason="mismatch")
            if state.has(header.index):
                # a duplicate; completes a transfer whose final rename failed before (disk full, crash)
                return self._finish(state) if state.have == state.count else None
            try:
                fd = os.open(self._part(t), os.O_WRONLY)
                try:
                    os.pwrite(fd, data, header.offset)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                state.set(header.index)
                self._save(state)
            except OSError as e:
                state.clear(header.index)
                raise self._io_error(e, f"store chunk {header.index}", state.fields) from e
            if state.have < state.count:
                return None
            return self._finish(state)

    def progress(self, transfer: str) -> tuple[int, int]:
        """(chunks on disk, chunks in all) of a transfer; (0, 0) when it is unknown."""
        _check_id(transfer)
        with self._lock:
            if transfer in self._done:
                return self._done[transfer], self._done[transfer]
            state = self._load(transfer)
            return (0, 0) if state is None else (state.have, state.count)

    def pending(self) -> list[str]:
        """Ids of the incomplete transfers in the folder (sorted)."""
        with self._lock:
            return sorted(t for t in self._on_disk() if not self.final_path(t).exists())

    def expire(self, now: float | None = None) -> list[str]:
        """Remove incomplete transfers whose last chunk arrived more than ``max_age_s`` ago, and leftovers of
        completed ones; the ids of the incomplete transfers removed."""
        now = time.time() if now is None else now
        removed = []
        with self._lock:
            for tmp in self.dir.glob(".*.have.tmp"):
                if now - _mtime(tmp) > self.max_age_s:
                    tmp.unlink(missing_ok=True)
            for t in sorted(self._on_disk()):
                if self.final_path(t).exists():
                    self._remove(t)
                    continue
                last = max(_mtime(self._part(t)), _mtime(self._have(t)))
                if now - last > self.max_age_s:
                    log.info("expiring incomplete transfer %s (last chunk %.0f s ago)", t[:12], now - last)
                    self._remove(t)
                    removed.append(t)
        return removed

    # ------------------------------------------------------------------------------------------ internals

    def _on_disk(self) -> set[str]:
        ids = set()
        for p in self.dir.iterdir():
            stem, dot, ext = p.name.partition(".")
            if dot and ext in ("part", "have") and _HEX64.fullmatch(stem):
                ids.add(stem)
        return ids

    def _load(self, t: str) -> _State | None:
        """The transfer's state from memory or its ``.have`` record; None when it has not started."""
        if t in self._states:
            return self._states[t]
        have = self._have(t)
        if not have.exists():
            return None
        try:
            state = _State.from_json(have.read_bytes(), t)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            log.warning("transfer %s: its record %s is unreadable (%s); starting the transfer over", t[:12],
                        have, e)
            self._remove(t)
            return None
        if not self._part(t).exists():
            log.warning("transfer %s: %s is missing; starting the transfer over", t[:12], self._part(t))
            self._remove(t)
            return None
        self._states[t] = state
        return state

    def _begin(self, header: ChunkHeader) -> _State:
        state = _State(header.transfer_fields())
        try:  # a .part without a record holds nothing we know of: start it empty
            fd = os.open(self._part(header.transfer), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.close(fd)
            _fsync_dir(self.dir)
        except OSError as e:
            self._part(header.transfer).unlink(missing_ok=True)
            raise self._io_error(e, "start", state.fields) from e
        self._states[header.transfer] = state
        return state

    def _save(self, state: _State) -> None:
        """Replace ``<transfer>.have`` atomically (temp + fsync + rename)."""
        t = state.fields["transfer"]
        tmp = self.dir / f".{t}.have.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, state.to_json())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self._have(t))
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _finish(self, state: _State) -> Path:
        t = state.fields["transfer"]
        part = self._part(t)
        try:
            actual = file_sha256(part)
            size = part.stat().st_size
        except OSError as e:
            raise self._io_error(e, "read back", state.fields) from e
        if actual != t or size != state.fields["size"]:
            self._remove(t)
            raise TransferError(f"transfer {t[:12]} ({state.fields['name']}): the reassembled {size} bytes have "
                                f"sha256 {actual[:12]}, not the transfer's {t[:12]}; its parts were removed",
                                hint="push the bundle again", reason="tampered")
        final = self.final_path(t)
        try:
            os.replace(part, final)
            _fsync_dir(self.dir)
        except OSError as e:
            raise self._io_error(e, "complete", state.fields) from e
        self._have(t).unlink(missing_ok=True)
        self._states.pop(t, None)
        self._done[t] = state.count
        log.info("transfer %s (%s, %d bytes) complete: %s", t[:12], state.fields["name"], size, final)
        return final

    def _remove(self, t: str) -> None:
        self._states.pop(t, None)
        for p in (self._part(t), self._have(t), self.dir / f".{t}.have.tmp"):
            p.unlink(missing_ok=True)


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _check_id(transfer: str) -> None:
    if not isinstance(transfer, str) or not _HEX64.fullmatch(transfer):
        raise TransferError(f"transfer id {transfer!r} is not a sha256 (64 lowercase hex digits)", reason="schema")
