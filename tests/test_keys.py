"""Signing keys: converters.keys.init_keys and edge_agent.signing, with real Ed25519 keys on disk."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from converters.keys import DEFAULT_KEY_DIR, init_keys
from edge_agent.errors import KeyFileError
from edge_agent.signing import fingerprint, load_private_key, load_public_key, sign, verify


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_key_dir_is_under_the_users_config() -> None:
    assert DEFAULT_KEY_DIR == Path.home() / ".config" / "edgekit" / "keys"


def test_pair_signs_and_verifies(tmp_path: Path) -> None:
    priv_path, pub_path = init_keys(tmp_path / "k")
    assert (priv_path.name, pub_path.name) == ("edgekit-signing.key", "edgekit-signing.pub")
    priv, pub = load_private_key(priv_path), load_public_key(pub_path)
    sig = sign(priv, b"manifest bytes")
    assert len(sig) == 64
    assert verify(pub, b"manifest bytes", sig)
    assert not verify(pub, b"manifest bytes!", sig)
    assert not verify(pub, b"manifest bytes", bytes(64))


def test_file_and_folder_modes(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "keys"
    priv_path, pub_path = init_keys(folder, name="lab")
    assert _mode(priv_path) == 0o600
    assert _mode(pub_path) == 0o644
    assert _mode(folder) == 0o700
    assert priv_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_private_key_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        priv_path, pub_path = init_keys(tmp_path)
    finally:
        os.umask(old)
    assert _mode(priv_path) == 0o600
    assert _mode(pub_path) == 0o644


def test_fingerprint_format_and_identity(tmp_path: Path) -> None:
    a = init_keys(tmp_path / "a")
    b = init_keys(tmp_path / "b")
    fa = fingerprint(load_public_key(a[1]))
    assert fa.startswith("SHA256:") and len(fa) == len("SHA256:") + 16
    int(fa.removeprefix("SHA256:"), 16)
    assert fa == fingerprint(load_private_key(a[0]).public_key())
    assert fa != fingerprint(load_public_key(b[1]))


@pytest.mark.parametrize("which", ["key", "pub"])
def test_refuses_to_overwrite_either_file(tmp_path: Path, which: str) -> None:
    (tmp_path / f"edgekit-signing.{which}").write_bytes(b"old")
    with pytest.raises(KeyFileError) as e:
        init_keys(tmp_path)
    assert "refusing to overwrite" in e.value.message
    assert "--dir" in (e.value.hint or "")
    assert (tmp_path / f"edgekit-signing.{which}").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"edgekit-signing.{which}"]


def test_second_init_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    priv_path, _ = init_keys(tmp_path)
    before = priv_path.read_bytes()
    with pytest.raises(KeyFileError):
        init_keys(tmp_path)
    assert priv_path.read_bytes() == before


def test_rejects_a_key_name_with_a_path(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        init_keys(tmp_path, name="../escape")
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_private_key_readable_by_others(tmp_path: Path) -> None:
    priv_path, _ = init_keys(tmp_path)
    priv_path.chmod(0o644)
    with pytest.raises(KeyFileError) as e:
        load_private_key(priv_path)
    assert e.value.hint == f"chmod 600 {priv_path}"
    priv_path.chmod(0o640)
    with pytest.raises(KeyFileError):
        load_private_key(priv_path)
    priv_path.chmod(0o600)
    load_private_key(priv_path)


def test_missing_key_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_private_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="does not exist"):
        load_public_key(tmp_path / "nope.pub")


def test_public_file_passed_as_private_key(tmp_path: Path) -> None:
    _, pub_path = init_keys(tmp_path)
    pub_path.chmod(0o600)
    with pytest.raises(KeyFileError, match="PUBLIC key") as e:
        load_private_key(pub_path)
    assert ".key" in (e.value.hint or "")


def test_private_file_passed_as_public_key(tmp_path: Path) -> None:
    priv_path, _ = init_keys(tmp_path)
    with pytest.raises(KeyFileError, match="PRIVATE key") as e:
        load_public_key(priv_path)
    assert ".pub" in (e.value.hint or "")


def test_garbage_and_folders_are_not_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(b"not a key at all")
    bad.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_private_key(bad)
    with pytest.raises(KeyFileError, match="not a PEM"):
        load_public_key(bad)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_public_key(tmp_path)


def test_non_ed25519_keys_are_refused(tmp_path: Path) -> None:
    ec = generate_private_key(SECP256R1())
    priv = tmp_path / "ec.key"
    priv.write_bytes(ec.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    priv.chmod(0o600)
    pub = tmp_path / "ec.pub"
    pub.write_bytes(ec.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(KeyFileError, match="not an Ed25519 private key"):
        load_private_key(priv)
    with pytest.raises(KeyFileError, match="not an Ed25519 public key"):
        load_public_key(pub)


def test_encrypted_private_key_is_refused(tmp_path: Path) -> None:
    priv_path, _ = init_keys(tmp_path)
    key = load_private_key(priv_path)
    enc = tmp_path / "enc.key"
    enc.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"secret")))
    enc.chmod(0o600)
    with pytest.raises(KeyFileError, match="encrypted"):
        load_private_key(enc)


def test_conftest_keypair_fixture(keypair: tuple[Path, Path]) -> None:
    priv_path, pub_path = keypair
    priv = load_private_key(priv_path)
    assert verify(load_public_key(pub_path), b"x", sign(priv, b"x"))
