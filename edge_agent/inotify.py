"""Linux inotify on folders, through libc with ctypes (no dependency): wake up when a file lands in an inbox
instead of looking every few milliseconds (fewer wake-ups on an idle board, and no polling delay).

``FolderWatch.create()`` returns None where inotify is missing (not Linux, no libc symbol, the per-user
watch limit reached); the caller then polls. Events are not interpreted: any event means "look again".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE | IN_DELETE_SELF | IN_MOVE_SELF


class FolderWatch:
    """An inotify descriptor watching some folders; ``fileno()`` becomes readable on any event."""

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self._libc = libc
        self._fd = fd
        self.folders: set[Path] = set()

    @classmethod
    def create(cls) -> FolderWatch | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            init = libc.inotify_init1
        except (OSError, AttributeError):
            return None
        fd = init(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            log.warning("inotify is not available (%s): the inboxes are polled",
                        os.strerror(ctypes.get_errno()))
            return None
        return cls(libc, fd)

    def fileno(self) -> int:
        return self._fd

    def add(self, folder: Path) -> bool:
        """Watch ``folder`` (True), or False when it does not exist or cannot be watched."""
        if folder in self.folders:
            return True
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(folder), _MASK)
        if wd < 0:
            return False
        self.folders.add(folder)
        return True

    def forget_missing(self) -> None:
        """Folders that went away (a USB stick pulled out) are watched again when they come back."""
        self.folders = {f for f in self.folders if f.is_dir()}

    def drain(self) -> None:
        """Read and drop the pending events."""
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._fd)
