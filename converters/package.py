"""Write a signed ``*.edgebundle`` (the host side of edge_agent.bundle).

The bundle is a plain ustar tar: ``manifest.json``, ``manifest.sig``, then the members sorted by name,
each mode 0644, owner 0/0 with empty user/group names and mtime = the manifest's ``created`` time.
The manifest is validated with the device's own ``parse_manifest`` before anything is written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import zipfile
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.bundle import MANIFEST_NAME, SIGNATURE_NAME
from edge_agent.errors import BundleError
from edge_agent.manifest import MANIFEST_SCHEMA, check_member_name, parse_manifest
from edge_agent.signing import load_private_key, sign

FILLED_FIELDS = ("schema", "created", "files")
_CHUNK = 1 << 20


class _HashingReader:
    """Reads a member file for tarfile while hashing what was actually written into the bundle."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self.digest.update(data)
        return data


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _file_entries(out_path: Path, members: dict[str, Path | bytes]) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for name, src in members.items():
        try:
            check_member_name(name)
        except BundleError as e:
            raise BundleError(f"cannot build {out_path}: {e.message}", hint="use a plain relative member name",
                              reason=e.reason) from e
        if isinstance(src, bytes):
            files[name] = {"sha256": hashlib.sha256(src).hexdigest(), "size": len(src)}
            continue
        try:
            sha, size = _hash_file(Path(src))
        except OSError as e:
            raise BundleError(f"cannot build {out_path}: cannot read member {name!r} from {src}: {e.strerror}",
                              hint="check the path of the file to package", reason="not_found") from e
        files[name] = {"sha256": sha, "size": size}
    return files


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _add_member(tf: tarfile.TarFile, out_path: Path, name: str, src: Path | bytes, expected: dict[str, Any],
                mtime: int) -> None:
    info = _tarinfo(name, expected["size"], mtime)
    if isinstance(src, bytes):
        tf.addfile(info, io.BytesIO(src))
        return
    with Path(src).open("rb") as f:
        reader = _HashingReader(f)
        tf.addfile(info, reader)  # type: ignore[arg-type]  # tarfile only calls read()
    if reader.digest.hexdigest() != expected["sha256"]:
        raise BundleError(f"cannot build {out_path}: member {name!r} ({src}) changed while it was packaged",
                          hint="run the packaging again once the file is no longer being written",
                          reason="tampered")


def build_bundle(out_path: Path, manifest: dict[str, Any], members: dict[str, Path | bytes],
                 private_key: Path | Ed25519PrivateKey) -> Path:
    """Write a signed bundle at ``out_path`` (atomically) and return ``out_path``.

    ``manifest`` holds every field except ``schema``, ``created`` and ``files``, which are filled here
    (``files`` = sha256 and size of every entry of ``members``).
    """
    out_path = Path(out_path)
    given = [k for k in FILLED_FIELDS if k in manifest]
    if given:
        raise BundleError(f"cannot build {out_path}: the manifest must not set {', '.join(given)}",
                          hint="build_bundle fills schema, created and files itself", reason="malformed")
    key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(private_key)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    full = {**manifest, "schema": MANIFEST_SCHEMA, "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "files": _file_entries(out_path, members)}
    try:
        parse_manifest(full)
    except BundleError as e:
        raise BundleError(f"cannot build {out_path}: {e.message}", hint=e.hint, reason=e.reason) from e
    try:
        manifest_bytes = (json.dumps(full, sort_keys=True, indent=2, allow_nan=False) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot build {out_path}: the manifest is not plain JSON: {e}",
                          hint="use str/int/float/bool/None, lists and dicts; no NaN or infinity",
                          reason="malformed") from e
    signature = sign(key, manifest_bytes)
    mtime = int(now.timestamp())

    folder = out_path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise BundleError(f"cannot build {out_path}: cannot create a file in {folder}: {e.strerror}",
                          hint="check that the folder exists and is writable", reason="io_error") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                tf.addfile(_tarinfo(MANIFEST_NAME, len(manifest_bytes), mtime), io.BytesIO(manifest_bytes))
                tf.addfile(_tarinfo(SIGNATURE_NAME, len(signature), mtime), io.BytesIO(signature))
                for name in sorted(members):
                    _add_member(tf, out_path, name, members[name], full["files"][name], mtime)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, ValueError) as e:  # ValueError: tarfile cannot store a name this long in ustar
        tmp.unlink(missing_ok=True)
        raise BundleError(f"cannot write bundle {out_path}: {e}",
                          hint="check free space and permissions; member names must fit a ustar header",
                          reason="io_error") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out_path


def golden_npz(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (as ``np.savez`` writes, but with fixed timestamps and no pickles) of named arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                try:
                    np.lib.format.write_array(f, np.asarray(array), allow_pickle=False)
                except ValueError as e:  # object arrays would need pickle, which the device refuses
                    raise BundleError(f"golden array {name!r} cannot be stored: {e}",
                                      hint="pass numeric numpy arrays", reason="malformed") from e
    return buf.getvalue()
