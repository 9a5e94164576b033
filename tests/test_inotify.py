"""edge_agent.inotify against the real kernel: a file renamed into a watched folder wakes the watcher."""

from __future__ import annotations

import os
import select
from pathlib import Path

import pytest

from edge_agent.inotify import FolderWatch


@pytest.fixture
def watch() -> FolderWatch:
    w = FolderWatch.create()
    if w is None:
        pytest.skip("inotify is not available on this system")
    return w


def readable(w: FolderWatch, timeout: float) -> bool:
    return bool(select.select([w.fileno()], [], [], timeout)[0])


def test_a_rename_into_a_watched_folder_wakes_it(watch: FolderWatch, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert watch.add(inbox) and watch.add(inbox)  # idempotent
    assert not readable(watch, 0.05)
    (tmp_path / "b.part").write_bytes(b"bundle")
    os.replace(tmp_path / "b.part", inbox / "b.edgebundle")
    assert readable(watch, 2)
    watch.drain()
    assert not readable(watch, 0.05)
    watch.close()


def test_missing_folders_are_not_watched_until_they_appear(watch: FolderWatch, tmp_path: Path) -> None:
    usb = tmp_path / "usb"
    assert not watch.add(usb)
    usb.mkdir()
    assert watch.add(usb)
    usb.rmdir()  # the stick is pulled out
    watch.forget_missing()
    assert usb not in watch.folders
    watch.close()
