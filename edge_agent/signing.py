"""Ed25519 keys and signatures for bundle manifests.

The host signs ``manifest.json`` with its private key (PEM, PKCS8, unencrypted, mode 0600); the device
pins the matching public key (PEM, SubjectPublicKeyInfo). A key is named by its fingerprint:
``SHA256:`` + the first 16 hex digits of the SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import KeyFileError

_MAX_KEY_FILE_BYTES = 64 * 1024  # a PEM Ed25519 key is ~120 bytes; anything this big is not a key


def _read_key_file(path: Path, what: str) -> tuple[bytes, int]:
    """The bytes and the permission bits of a key file, read through one file descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(f"{what} file {path} does not exist",
                           hint="create a key pair with `edgekit keys init`, or pass the right path") from None
    except OSError as e:
        raise KeyFileError(f"cannot read {what} file {path}: {e.strerror}",
                           hint="check the path and its permissions") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} path {path} is not a regular file", hint="pass the key file itself")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as e:
        raise KeyFileError(f"cannot read {what} file {path}: {e.strerror}",
                           hint="check the path and its permissions") from e
    finally:
        os.close(fd)
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{what} file {path} is too large to be a PEM Ed25519 key",
                           hint="pass the .key / .pub file written by `edgekit keys init`")
    return data, stat.S_IMODE(st.st_mode)


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an unencrypted PEM PKCS8 Ed25519 private key that only its owner can read."""
    path = Path(path)
    data, mode = _read_key_file(path, "private key")
    if mode & 0o077:
        raise KeyFileError(
            f"private key file {path} is readable or writable by group/others (mode {mode:04o})",
            hint=f"chmod 600 {path}",
        )
    if b"-----BEGIN PUBLIC KEY-----" in data:
        raise KeyFileError(f"{path} holds a PUBLIC key where the private (signing) key is expected",
                           hint="pass the .key file of the pair, not the .pub file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:  # cryptography: the key is encrypted and no password was given
        raise KeyFileError(f"private key file {path} is encrypted; edgekit reads unencrypted keys only",
                           hint="create a key pair with `edgekit keys init` and keep it mode 0600") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM PKCS8 private key: {e}",
                           hint="pass the .key file written by `edgekit keys init`") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key",
                           hint="create an Ed25519 pair with `edgekit keys init`")
    return key


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a PEM SubjectPublicKeyInfo Ed25519 public key (the key a device pins)."""
    path = Path(path)
    data, _mode = _read_key_file(path, "public key")
    if b"PRIVATE KEY-----" in data:
        raise KeyFileError(
            f"{path} holds a PRIVATE key where the public (verifying) key is expected",
            hint="pass the .pub file of the pair; the private key never belongs on a device",
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{path} is not a PEM public key: {e}",
                           hint="pass the .pub file written by `edgekit keys init`") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key",
                           hint="pass the .pub file written by `edgekit keys init`")
    return key


def fingerprint(public_key: Ed25519PublicKey) -> str:
    """``SHA256:`` + the first 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, data: bytes) -> bytes:
    """The 64-byte Ed25519 signature of ``data``."""
    return private_key.sign(data)


def verify(public_key: Ed25519PublicKey, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is a valid signature of ``data`` under ``public_key``."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
