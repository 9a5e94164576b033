"""A private OpenSSH server for tests, on a free loopback port, with throwaway keys.

``Sshd(workdir).start()`` generates a host key and a client key (``ssh-keygen -t ed25519 -N ''``), writes
an ``sshd_config`` (loopback only, that host key, the client key as the only authorized key, no passwords,
no PAM, a pid file in the work folder), starts ``/usr/sbin/sshd -D -e -f CONF`` as the current user and
waits until the port accepts connections. ``ssh_options()`` are the client options that trust exactly this
server and use exactly that key (``-F /dev/null`` so the user's own ssh config does not interfere).
It only ever stops the process it started. Tests are skipped with a reason when sshd is not installed.

Run as root, sshd needs its privilege separation folder ``/run/sshd`` (systemd makes it for the packaged
service); the helper creates it (empty, root-owned, mode 0755) when it is missing.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.mosquitto import free_port, port_accepts

SSHD = "/usr/sbin/sshd"
_PRIVSEP_DIR = Path("/run/sshd")


def _keygen(path: Path) -> None:
    keygen = shutil.which("ssh-keygen")
    if keygen is None:
        pytest.skip("ssh-keygen is not installed (apt-get install openssh-client)")
    subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "edgekit-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True)


class Sshd:
    """One sshd process owned by a test."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        if not Path(SSHD).is_file():
            pytest.skip(f"OpenSSH server is not installed ({SSHD} not found; apt-get install openssh-server, "
                        "or run scripts/setup.sh)")
        if shutil.which("ssh") is None:
            pytest.skip("the OpenSSH client is not installed (apt-get install openssh-client)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.user = getpass.getuser()
        self.host_key = self.workdir / "host_ed25519"
        self.client_key = self.workdir / "client_ed25519"
        self.authorized_keys = self.workdir / "authorized_keys"
        self.known_hosts = self.workdir / "known_hosts"
        self.conf = self.workdir / "sshd_config"
        self.log = self.workdir / "sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _prepare(self) -> None:
        if not self.host_key.exists():
            _keygen(self.host_key)
        if not self.client_key.exists():
            _keygen(self.client_key)
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        host_pub = Path(f"{self.host_key}.pub").read_text().split()
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        self.conf.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.host}\n"
            f"HostKey {self.host_key}\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PermitRootLogin prohibit-password\n"
            f"AllowUsers {self.user}\n"
            f"PidFile {self.workdir / 'sshd.pid'}\n"
            "LogLevel VERBOSE\n"
            "Subsystem sftp /usr/lib/openssh/sftp-server\n"  # as Debian ships it; scp (SFTP) needs it
        )
        if os.geteuid() == 0 and not _PRIVSEP_DIR.is_dir():
            _PRIVSEP_DIR.mkdir(mode=0o755, parents=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> Sshd:
        if self.running:
            raise RuntimeError("this sshd is already running")
        self._prepare()
        with open(self.log, "ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.conf)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"sshd exited at start on port {self.port}:\n{self.log.read_text()}")
            if port_accepts(self.host, self.port):
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"sshd did not accept connections on port {self.port} within {timeout} s")

    def ssh_options(self) -> list[str]:
        """Client options that use the throwaway key and trust exactly this server's host key."""
        return ["-F", "/dev/null", "-i", str(self.client_key), "-o", "IdentitiesOnly=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", "StrictHostKeyChecking=yes", "-o", "LogLevel=ERROR"]

    def target(self, path: str = "") -> str:
        """An ``ssh://user@127.0.0.1:PORT/path`` push target for this server."""
        return f"ssh://{self.user}@{self.host}:{self.port}{path}"

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self.proc = None
