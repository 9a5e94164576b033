"""Create the host's Ed25519 signing key pair.

``<name>.key`` (PEM PKCS8, mode 0600) signs bundle manifests and stays on the host; ``<name>.pub``
(PEM SubjectPublicKeyInfo, mode 0644) is copied to every device, which pins it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import KeyFileError

DEFAULT_KEY_DIR = Path.home() / ".config" / "edgekit" / "keys"
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` (never overwrite) with ``mode`` from the first byte on, write, fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644 for the public key)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        path.unlink()  # never leave a half-written key behind
        raise
    finally:
        os.close(fd)


def init_keys(directory: Path, name: str = "edgekit-signing") -> tuple[Path, Path]:
    """Write a new pair ``<name>.key`` / ``<name>.pub`` into ``directory``; returns their paths."""
    directory = Path(directory)
    if not _NAME.fullmatch(name):
        raise KeyFileError(f"key name {name!r} is not a plain file name",
                           hint="use letters, digits, '_', '.', '-' (e.g. edgekit-signing)")
    private_path = directory / f"{name}.key"
    public_path = directory / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise KeyFileError(
                f"{p} already exists; refusing to overwrite a signing key",
                hint="use another --dir (or --name), or remove the old pair knowingly: devices that pin "
                     "its public key will refuse bundles signed with a new one",
            )
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"cannot create key folder {directory}: {e.strerror}",
                           hint="check the path and its permissions, or pass another --dir") from e

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    written: list[Path] = []
    try:
        for path, data, mode in ((private_path, private_pem, 0o600), (public_path, public_pem, 0o644)):
            _write_new(path, data, mode)
            written.append(path)
    except FileExistsError as e:
        for p in written:
            p.unlink()
        raise KeyFileError(f"{e.filename} already exists; refusing to overwrite a signing key",
                           hint="use another --dir, or remove the old pair knowingly") from e
    except OSError as e:
        for p in written:
            p.unlink()
        raise KeyFileError(f"cannot write key file {e.filename or directory}: {e.strerror}",
                           hint="check free space and permissions of the key folder") from e
    return private_path, public_path
