"""The systemd notify protocol (sd_notify(3)) without libsystemd: readiness, status, watchdog.

systemd passes ``NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) to a ``Type=notify``
service; the service sends newline-separated ``KEY=VALUE`` datagrams to it. With ``WatchdogSec=`` it also
passes ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be our pid for the watchdog to be ours); the
service then has to send ``WATCHDOG=1`` more often than that, or systemd kills and restarts it.

Outside systemd (no ``NOTIFY_SOCKET``) every method is a no-op, so the agent calls them unconditionally.
A failed send is logged once and never raised: telling systemd is best effort, serving is not.

    notifier = Notifier.from_env()
    notifier.ready("serving mlp 1.0.0")        # READY=1 + STATUS=
    notifier.watchdog()                         # from the inference loop; sends at most every interval/2
    notifier.reloading(); notifier.ready()      # SIGHUP: RELOADING=1 + MONOTONIC_USEC, then READY=1
    notifier.stopping()                         # SIGTERM received
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _clean(text: str) -> str:
    """One line: the protocol separates assignments by newlines."""
    return " ".join(str(text).splitlines()).strip()


def socket_address(value: str) -> str | bytes | None:
    """``NOTIFY_SOCKET`` -> an address for ``sendto``: a path, or bytes starting with NUL for ``@name``.

    None for an empty value and for address families this module does not speak (``vsock:``, systemd 254+).
    """
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify messages to ``address``; with ``address=None`` every method does nothing."""

    def __init__(self, address: str | bytes | None = None, *, watchdog_usec: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self._watchdog_s = watchdog_usec / 1e6 if address is not None and watchdog_usec > 0 else 0.0
        self._clock = clock  # monotonic seconds; injectable for tests
        self._next_ping = 0.0  # the first watchdog() call always sends
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """A notifier for what systemd passed: ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``WATCHDOG_PID``."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address = socket_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket path or @abstract name: not notifying systemd",
                        raw)
        usec = 0
        text = env.get("WATCHDOG_USEC", "")
        if text:
            try:
                usec = int(text)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not an integer: watchdog off", text)
            pid = env.get("WATCHDOG_PID", "")
            if pid and pid != str(os.getpid()):
                usec = 0  # the watchdog is another process's (we were started by the service's main process)
        return cls(address, watchdog_usec=max(usec, 0))

    # ---------------------------------------------------------------------------------------------- state

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self.address is not None

    @property
    def watchdog_interval_s(self) -> float:
        """systemd's watchdog timeout in seconds (``WATCHDOG_USEC``); 0.0 when there is no watchdog."""
        return self._watchdog_s

    # ---------------------------------------------------------------------------------------------- messages

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (start-up or a reload is complete), with an optional status line."""
        return self.send("READY=1", *(() if status is None else (f"STATUS={_clean(status)}",)))

    def status(self, text: str) -> bool:
        """``STATUS=<text>``: shown by ``systemctl status``."""
        return self.send(f"STATUS={_clean(text)}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, at most once per half the watchdog interval (cheap to call every loop slice).

        Returns True when a message was sent.
        """
        if not self._watchdog_s:
            return False
        now = self._clock()
        if now < self._next_ping:
            return False
        self._next_ping = now + self._watchdog_s / 2
        return self.send("WATCHDOG=1")

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd 253+; older ones ignore it); send ``ready()`` after."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}",
                         *(() if status is None else (f"STATUS={_clean(status)}",)))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutting down (SIGTERM received)."""
        return self.send("STOPPING=1", *(() if status is None else (f"STATUS={_clean(status)}",)))

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask for ``seconds`` more to start, reload or stop (e.g. a TensorRT build)."""
        return self.send(f"EXTEND_TIMEOUT_USEC={max(int(seconds * 1e6), 0)}")

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; False (logged once) when that fails."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    kind = socket.SOCK_DGRAM | getattr(socket, "SOCK_CLOEXEC", 0)
                    self._sock = socket.socket(socket.AF_UNIX, kind)
                self._sock.sendto(data, self.address)
            except OSError as e:
                if not self._failed:
                    self._failed = True
                    log.warning("cannot notify systemd at %s: %s (further failures are not logged)",
                                self._printable_address(), e)
                return False
        return True

    def close(self) -> None:
        """Close the socket (a later message opens a new one)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def _printable_address(self) -> str:
        a = self.address
        return "@" + a[1:].decode(errors="replace") if isinstance(a, bytes) else str(a)
