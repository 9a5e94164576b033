"""Reading ``*.edgebundle`` files on the device: inspect, verify, unpack, load the golden data.

A bundle is a plain (ustar, uncompressed) tar: ``manifest.json`` first, ``manifest.sig`` second (the 64-byte
Ed25519 signature of the exact bytes of manifest.json), then exactly the members listed in
``manifest["files"]``. See docs/bundle.md.

The reader makes one pass over the file and decides about every member from its header before it reads
a byte of its data: unsafe names, links, devices, directories, oversized, duplicated, unlisted members
are refused at once. With a pinned key the signature is checked before any other member is read, so
``unpack_bundle`` never writes bytes the host did not sign for. Member data is streamed in chunks and
hashed while it is copied; tar metadata (owner, mode, mtime) is ignored. Every refusal is a
``BundleError`` whose ``reason`` is one of the codes documented in docs/bundle.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.errors import BundleError
from edge_agent.fsutil import fsync_dir as _fsync_dir
from edge_agent.manifest import RESERVED, Manifest, TensorSpec, check_member_name, parse_manifest
from edge_agent.signing import fingerprint, load_public_key, verify

DEFAULT_MAX_MEMBER_BYTES = 1 << 30  # 1 GiB
MAX_MANIFEST_BYTES = 1 << 20
SIGNATURE_BYTES = 64
MANIFEST_NAME, SIGNATURE_NAME = RESERVED
_CHUNK = 1 << 20
_END_MARKER = 2 * tarfile.BLOCKSIZE  # two zero blocks end a tar archive
# pax / GNU extension headers: edgekit writes plain ustar, and tarfile would read their data into memory
# before we could look at it, so they are refused from the header alone.
_EXTENDED_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                   tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)

_HINTS = {
    "not_found": "check the path; a bundle is the *.edgebundle file written by edgekit",
    "truncated": "the copy is incomplete or the file is not a bundle: copy it again and compare its "
                 "sha256 with the host's copy",
    "tampered": "the bundle changed after it was signed; rebuild it on the host and copy it again",
    "bad_signature": "make sure the device pins the public key (.pub) of the host that built the bundle, "
                     "or rebuild the bundle with the matching private key",
    "unsigned": "build the bundle with `edgekit convert` (it signs with --key); devices accept signed "
                "bundles only",
    "unsafe_path": "the bundle was not made by edgekit or was tampered with; do not use it",
    "link_member": "the bundle was not made by edgekit or was tampered with; do not use it",
    "device_member": "the bundle was not made by edgekit or was tampered with; do not use it",
    "extra_member": "the bundle was not made by edgekit or was tampered with; do not use it",
    "too_large": "if the model really is this large, raise the member size cap (max_member_bytes)",
    "missing_member": "the bundle is incomplete; rebuild it on the host",
    "malformed": "rebuild the bundle with edgekit",
    "schema": "upgrade edge-agent on the device, or build the bundle with a matching edgekit",
    "dest_exists": "unpack into a new folder (remove the old one first if you mean to replace it)",
    "io_error": "check free space and permissions of the folders involved",
}


def _fail(bundle: Path, member: str | None, what: str, reason: str, hint: str | None = None) -> BundleError:
    where = f"bundle {bundle}" + (f", member {member!r}" if member else "")
    return BundleError(f"{where}: {what}", hint=hint or _HINTS[reason], reason=reason)


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: Manifest
    signer: str  # fingerprint of the key the manifest signature verified with


@dataclass(frozen=True)
class UnpackedBundle:
    root: Path
    manifest: Manifest
    signer: str

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model

    def member(self, name: str) -> Path:
        """Path of a member (one of manifest.files, or manifest.json / manifest.sig) under ``root``."""
        if name not in self.manifest.files and name not in RESERVED:
            raise BundleError(f"unpacked bundle {self.root} has no member {name!r}",
                              hint=f"members: {', '.join(sorted(self.manifest.files))}",
                              reason="missing_member")
        return self.root.joinpath(*check_member_name(name).split("/"))


class _ExtendedHeader(Exception):
    """Raised from inside tarfile when a header is a pax/GNU extension (see _EXTENDED_TYPES)."""


class _PlainTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses extension headers before tarfile reads their data."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _EXTENDED_TYPES:
            raise _ExtendedHeader(self.type.decode("ascii", "replace"))
        return super()._proc_member(tarfile_)


@dataclass
class _Reader:
    """One pass over a bundle. With a key, any mismatch raises; without (inspect) mismatches are noted."""

    path: Path
    key: Ed25519PublicKey | None
    max_member_bytes: int
    out_dir: Path | None = None
    manifest: Manifest | None = None
    manifest_raw: dict[str, Any] | None = None
    manifest_bytes: bytes = b""
    signed: bool = False
    members: list[dict[str, Any]] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    made_dirs: list[Path] = field(default_factory=list)
    current: str | None = None

    def run(self) -> None:
        with _open_bundle(self.path) as f:
            try:
                with tarfile.open(fileobj=f, mode="r:", tarinfo=_PlainTarInfo) as tf:
                    index = 0
                    while True:
                        self.current = None  # a header error belongs to no member
                        info = tf.next()
                        if info is None:
                            break
                        self.current = info.name
                        self._member(tf, info, index)
                        index += 1
                    end = tf.offset
                if index == 0:
                    raise _fail(self.path, None, "the archive holds no members: truncated or not a bundle",
                                "truncated")
                self._check_end(f, end)
            except (tarfile.TarError, EOFError) as e:
                raise _fail(self.path, self.current, f"truncated or not a bundle ({e})", "truncated") from e
            except _ExtendedHeader as e:
                raise _fail(self.path, self.current,
                            f"extended tar header of type {e} (pax/GNU); bundles are plain ustar tars",
                            "malformed") from e
            except OSError as e:
                raise _fail(self.path, self.current, f"cannot read: {e.strerror or e}", "io_error") from e
        if self.key is not None and not self.signed:
            raise _fail(self.path, SIGNATURE_NAME, "the bundle has no manifest.sig", "unsigned")
        assert self.manifest is not None  # the first member is manifest.json, parsed by now
        missing = sorted(set(self.manifest.files) - {m["name"] for m in self.members})
        if missing:
            raise _fail(self.path, missing[0],
                        f"listed in the manifest but absent (missing: {', '.join(missing)})", "missing_member")

    # ---- one member, decided from its header first

    def _member(self, tf: tarfile.TarFile, info: tarfile.TarInfo, index: int) -> None:
        name = info.name
        try:
            check_member_name(name)
        except BundleError as e:
            raise _fail(self.path, name, "absolute path, '..', backslash or odd characters in the name",
                        "unsafe_path") from e
        if info.issym() or info.islnk():
            raise _fail(self.path, name, f"is a {'symbolic' if info.issym() else 'hard'} link to "
                        f"{info.linkname!r}; bundles hold regular files only", "link_member")
        if info.ischr() or info.isblk() or info.isfifo():
            raise _fail(self.path, name, "is a device or fifo; bundles hold regular files only", "device_member")
        if info.isdir():
            raise _fail(self.path, name, "is a directory entry; bundles hold regular files only",
                        "extra_member")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise _fail(self.path, name, f"has tar type {info.type!r}; bundles hold regular files only",
                        "malformed")
        if info.size < 0:
            raise _fail(self.path, name, f"has a negative size ({info.size})", "malformed")
        cap = MAX_MANIFEST_BYTES if name == MANIFEST_NAME else self.max_member_bytes
        if info.size > cap:
            raise _fail(self.path, name, f"is {info.size} bytes, over the cap of {cap} bytes", "too_large")
        if any(m["name"] == name for m in self.members):
            raise _fail(self.path, name, "appears twice in the archive", "extra_member")
        self.members.append({"name": name, "size": info.size})

        if index == 0:
            if name != MANIFEST_NAME:
                raise _fail(self.path, name, "the first member must be manifest.json", "malformed")
            self.manifest_bytes = self._read(tf, info, None)
            if self.key is None:
                self._parse_manifest()
            return
        if name == SIGNATURE_NAME:
            if index != 1:
                raise _fail(self.path, name, "manifest.sig must directly follow manifest.json", "malformed")
            self._signature(tf, info)
            return
        if index == 1 and self.key is not None:
            raise _fail(self.path, SIGNATURE_NAME, f"the bundle has no manifest.sig as its second member "
                        f"(found {name!r})", "unsigned")
        self._listed_member(tf, info)

    def _signature(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        if info.size != SIGNATURE_BYTES:
            if self.key is not None:
                raise _fail(self.path, SIGNATURE_NAME, f"is {info.size} bytes; an Ed25519 signature is "
                            f"{SIGNATURE_BYTES}", "unsigned")
            return
        sig = self._read(tf, info, None)
        self.signed = True
        if self.key is None:
            return
        if not verify(self.key, self.manifest_bytes, sig):
            raise _fail(self.path, MANIFEST_NAME,
                        f"the manifest signature does not verify with the pinned key {fingerprint(self.key)}: "
                        "the bundle was signed by another key or its manifest was modified", "bad_signature")
        self._parse_manifest()
        if self.out_dir is not None:  # only now: nothing unsigned is ever written
            self._write_whole(MANIFEST_NAME, self.manifest_bytes)
            self._write_whole(SIGNATURE_NAME, sig)

    def _listed_member(self, tf: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        assert self.manifest is not None
        name = info.name
        entry = self.manifest.files.get(name)
        if entry is None:
            raise _fail(self.path, name, "is not listed in the manifest", "extra_member")
        if info.size != entry.size:
            if self.key is None:
                self.mismatched.append(name)
                return
            raise _fail(self.path, name, f"is {info.size} bytes, the signed manifest says {entry.size}",
                        "tampered")
        digest = hashlib.sha256()
        self._read(tf, info, digest)
        if digest.hexdigest() != entry.sha256:
            if self.key is None:
                self.mismatched.append(name)
                return
            raise _fail(self.path, name, "its sha256 differs from the signed manifest", "tampered")

    # ---- reading and writing

    def _read(self, tf: tarfile.TarFile, info: tarfile.TarInfo, digest: Any) -> bytes:
        """Stream a member; into ``out_dir`` when hashing a listed member, else return its bytes."""
        src = tf.extractfile(info)
        assert src is not None  # a regular member
        if digest is None:
            return src.read()
        out = self._create(info.name) if self.out_dir is not None else None
        try:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                if out is not None:
                    self._io(out.write, chunk)
            if out is not None:
                self._io(out.flush)
                self._io(os.fsync, out.fileno())
        finally:
            if out is not None:
                out.close()
        return b""

    def _write_whole(self, name: str, data: bytes) -> None:
        with self._create(name) as out:
            self._io(out.write, data)
            self._io(out.flush)
            self._io(os.fsync, out.fileno())

    def _create(self, name: str) -> BinaryIO:
        assert self.out_dir is not None
        parts = name.split("/")
        folder = self.out_dir
        for part in parts[:-1]:
            folder = folder / part
            if not folder.is_dir():
                self._io(os.mkdir, folder, 0o755)
                self._io(os.chmod, folder, 0o755)
                self.made_dirs.append(folder)
        target = folder / parts[-1]
        fd = self._io(os.open, target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        self._io(os.fchmod, fd, 0o644)  # 0644 whatever the umask or the tar header says
        return os.fdopen(fd, "wb")

    def _io(self, fn: Any, *args: Any) -> Any:
        """Run a write-side OS call; its failure names the destination, not the bundle."""
        try:
            return fn(*args)
        except OSError as e:
            raise BundleError(f"bundle {self.path}, member {self.current!r}: cannot write into "
                              f"{self.out_dir}: {e.strerror or e}", hint=_HINTS["io_error"],
                              reason="io_error") from e

    def _check_end(self, f: BinaryIO, end: int) -> None:
        """After the last member: two zero blocks, then nothing but zero padding."""
        f.seek(end)
        marker = f.read(_END_MARKER)
        if len(marker) < _END_MARKER or marker.count(0) != _END_MARKER:
            raise _fail(self.path, None, "no end-of-archive marker after the last complete member: "
                        "truncated or not a bundle", "truncated")
        while chunk := f.read(_CHUNK):
            if chunk.count(0) != len(chunk):
                raise _fail(self.path, None, "data after the end-of-archive marker", "malformed")

    def _parse_manifest(self) -> None:
        try:
            raw = json.loads(self.manifest_bytes.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            raise _fail(self.path, MANIFEST_NAME, f"is not UTF-8 JSON: {e}", "malformed") from e
        try:
            self.manifest = parse_manifest(raw)
        except BundleError as e:
            raise _fail(self.path, MANIFEST_NAME, e.message, e.reason, e.hint) from e
        self.manifest_raw = raw


def _open_bundle(path: Path) -> BinaryIO:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a fifo must not hang us
    except FileNotFoundError as e:
        raise _fail(path, None, "no such file", "not_found") from e
    except OSError as e:
        raise _fail(path, None, f"cannot open: {e.strerror}", "io_error") from e
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        os.close(fd)
        raise _fail(path, None, f"cannot stat: {e.strerror}", "io_error") from e
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _fail(path, None, "is not a regular file", "not_found")
    return os.fdopen(fd, "rb")


def _pinned(public_key: Path | str | Ed25519PublicKey) -> Ed25519PublicKey:
    return public_key if isinstance(public_key, Ed25519PublicKey) else load_public_key(public_key)


def inspect_bundle(path: Path | str, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> dict[str, Any]:
    """Structure and hashes of a bundle, without a key (the signature is NOT checked).

    Returns ``{"manifest": dict, "members": [{"name", "size"}], "signed": bool, "hashes_ok": bool}``;
    ``signed`` means a 64-byte manifest.sig is present. Raises ``BundleError`` when the bundle is
    malformed or unsafe.
    """
    reader = _Reader(Path(path), None, max_member_bytes)
    reader.run()
    return {"manifest": reader.manifest_raw, "members": reader.members, "signed": reader.signed,
            "hashes_ok": not reader.mismatched}


def verify_bundle(path: Path | str, public_key: Path | str | Ed25519PublicKey,
                  max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> VerifiedBundle:
    """Every check (structure, signature under the pinned key, sizes, hashes); extracts nothing."""
    key = _pinned(public_key)
    reader = _Reader(Path(path), key, max_member_bytes)
    reader.run()
    assert reader.manifest is not None
    return VerifiedBundle(Path(path), reader.manifest, fingerprint(key))



def unpack_bundle(path: Path | str, dest: Path | str, public_key: Path | str | Ed25519PublicKey,
                  max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> UnpackedBundle:
    """Verify and extract into ``dest`` (which must not exist), atomically.

    Members are written into a temporary folder beside ``dest``, fsynced, and the folder is renamed to
    ``dest``. On any failure nothing is left at ``dest`` and the temporary folder is removed. ``dest``
    holds manifest.json, manifest.sig and the listed members, all mode 0644.
    """
    path, dest = Path(path), Path(dest)
    key = _pinned(public_key)
    if dest.exists() or dest.is_symlink():
        raise _fail(path, None, f"destination {dest} already exists", "dest_exists")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    except OSError as e:
        raise _fail(path, None, f"cannot create a folder beside {dest}: {e.strerror}", "io_error") from e
    moved = False
    try:
        reader = _Reader(path, key, max_member_bytes, out_dir=tmp)
        reader.run()
        assert reader.manifest is not None
        try:
            for folder in (*reversed(reader.made_dirs), tmp):
                _fsync_dir(folder)
            os.chmod(tmp, 0o755)
            if dest.exists() or dest.is_symlink():
                raise _fail(path, None, f"destination {dest} appeared while unpacking", "dest_exists")
            os.replace(tmp, dest)
            moved = True
            _fsync_dir(dest.parent)
        except OSError as e:
            raise _fail(path, None, f"cannot move the unpacked bundle to {dest}: {e.strerror}",
                        "io_error") from e
    except BaseException:
        shutil.rmtree(dest if moved else tmp)  # the rule: a failed unpack leaves nothing behind
        raise
    return UnpackedBundle(dest, reader.manifest, fingerprint(key))


def _load_npz(unpacked: UnpackedBundle, member: str, specs: tuple[TensorSpec, ...]) -> list[np.ndarray]:
    path = unpacked.member(member)
    names = [s.name for s in specs]
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise BundleError(f"golden member {member!r} in {unpacked.root} is not an .npz archive",
                              hint=_HINTS["malformed"], reason="malformed")
        with npz:
            if sorted(npz.files) != sorted(names):
                raise BundleError(
                    f"golden member {member!r} in {unpacked.root} holds arrays {sorted(npz.files)}, "
                    f"expected one per tensor: {names}", hint=_HINTS["malformed"], reason="malformed")
            return [npz[n] for n in names]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise BundleError(f"golden member {member!r} in {unpacked.root} cannot be read: {e}",
                          hint=_HINTS["malformed"], reason="malformed") from e


def load_golden(unpacked: UnpackedBundle) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
    """The golden (inputs, outputs) arrays in manifest tensor order, or None when the bundle has none."""
    golden = unpacked.manifest.golden
    if golden is None:
        return None
    return (_load_npz(unpacked, golden["inputs"], unpacked.manifest.inputs),
            _load_npz(unpacked, golden["outputs"], unpacked.manifest.outputs))
