"""Push to a folder (``dir:/media/usb``): a USB stick or a share an air-gapped agent polls as ``--inbox``.

The bundle is copied to ``<dir>/.<name>.part``, fsynced, renamed to ``<dir>/<name>`` and the folder is
fsynced, so the agent never sees a half-written bundle. There is no return channel: the state is
``pushed``.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from converters.push import Progress, PushResult, Target, check_bundle, check_wait
from edge_agent.errors import InputError, PushError

_BLOCK = 1 << 20


class DirectoryTransport:
    """Copy a bundle into a local folder atomically."""

    name = "dir"

    def __init__(self, target: Target) -> None:
        if target.kind != "dir" or not target.path:
            raise InputError(f"{target} is not a dir: target")
        self.target = target
        self.folder = Path(target.path).expanduser()

    def push(self, bundle: Path, *, progress: Progress | None = None,
             wait_s: float | None = None) -> PushResult:
        """Copy ``bundle`` into the folder; ``wait_s`` cannot be honoured (no return channel) and says so."""
        bundle = Path(bundle)
        size = check_bundle(bundle)
        waited = check_wait(wait_s)
        if not self.folder.is_dir():
            what = "is not a folder" if self.folder.exists() else "does not exist"
            raise InputError(f"push target {self.target}: {self.folder} {what}",
                             hint="is the USB stick mounted? create the folder or fix the path")
        start = time.monotonic()
        part = self.folder / f".{bundle.name}.part"
        final = self.folder / bundle.name
        sent = 0
        try:
            with open(bundle, "rb") as src, open(part, "wb") as dst:
                while block := src.read(_BLOCK):
                    dst.write(block)
                    sent += len(block)
                    if progress is not None:
                        progress(sent, size)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(part, final)
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            part.unlink(missing_ok=True)
            if e.errno == errno.ENOSPC:
                raise PushError(f"no space left in {self.folder} for {bundle.name} ({size} bytes): {e}",
                                hint="free space on the stick or folder; nothing was left behind") from e
            raise PushError(f"cannot copy {bundle} to {self.folder}: {e}",
                            hint="check that the folder is writable (a stick mounted read-only?)") from e
        message = f"copied to {final}"
        if waited is not None:
            message += "; not waiting for a result: a folder has no return channel (the agent's events report it)"
        return PushResult(target=str(self.target), transport=self.name, bytes=size,
                          seconds=time.monotonic() - start, state="pushed",
                          detail={"path": str(final)}, message=message)
