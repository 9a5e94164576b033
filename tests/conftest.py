"""Fixtures shared by every test module. Helper modules: tests/models.py (tiny ONNX models)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def realmodels_dir() -> Path:
    return Path(os.environ.get("EDGEKIT_REALMODELS", ROOT.parent / "shared" / "realmodels"))


@pytest.fixture(scope="session")
def realmodels() -> Path:
    """The public models in ../shared/realmodels (or $EDGEKIT_REALMODELS); skips when absent."""
    d = realmodels_dir()
    if not (d / "MANIFEST.md").is_file():
        pytest.skip(f"real models not found at {d} (set EDGEKIT_REALMODELS to their folder)")
    return d


@pytest.fixture(scope="session")
def keypair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway Ed25519 signing key pair: (private key path, public key path)."""
    from converters.keys import init_keys

    return init_keys(tmp_path_factory.mktemp("keys"))
