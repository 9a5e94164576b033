"""File-system helpers shared by everything that writes durably (temp file, fsync, rename, fsync the folder)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so a rename or a new file in it survives a power cut."""
    fd = os.open(Path(folder), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
