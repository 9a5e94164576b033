"""Push over ssh (``ssh://[user@]host[:port][/inbox]``) with the user's own OpenSSH client.

Their ``~/.ssh/config``, keys, agent and jump hosts all apply. One ssh session runs one POSIX ``sh``
script (``remote_script``) that creates the inbox, streams stdin to ``<inbox>/.<name>.part``, checks the
byte count, removes a stale ``<name>.result.json``, renames the part to ``<inbox>/<name>`` (atomic on one
file system) and, when waiting, polls every 0.01 s for ``<inbox>/<name>.result.json`` (written by the agent
with temp + rename) and prints it. ssh runs with ``BatchMode=yes`` (never a password prompt), a connect
timeout and server keep-alives, so an unreachable device fails instead of hanging.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from converters.push import (
    DEFAULT_SSH_INBOX,
    RESULT_STATES,
    Progress,
    PushResult,
    Target,
    check_bundle,
    check_wait,
)
from edge_agent.errors import InputError, PushError

_BLOCK = 1 << 20
_POLL_S = 0.01
PUSHED, TIMEOUT, RESULT = "EDGEKIT-PUSHED", "EDGEKIT-TIMEOUT", "EDGEKIT-RESULT"
EXIT_SSH = 255  # ssh's own failures: unreachable, refused, authentication, host key
EXIT_WRITE = 3  # the inbox cannot be created or written
EXIT_SHORT = 4  # fewer bytes arrived than were sent
_RESULTS = ("activated", "rejected", "rolled_back")  # the "result" of <name>.result.json


def remote_script(inbox: str, name: str, size: int, wait_s: float | None) -> str:
    """The POSIX sh script the remote side runs (paths quoted with shlex.quote)."""
    lines = [
        f"inbox={shlex.quote(inbox)}; name={shlex.quote(name)}; size={int(size)}",
        'part="$inbox/.$name.part"; dest="$inbox/$name"; result="$dest.result.json"',
        "trap 'rm -f -- \"$part\"' EXIT",
        "trap 'exit 1' HUP INT TERM PIPE",
        # as few programs as possible: each one is a fork and exec on a small, busy board
        f'[ -d "$inbox" ] || mkdir -p -- "$inbox" || exit {EXIT_WRITE}',
        f'cat > "$part" || exit {EXIT_WRITE}',
        'got=$(($(wc -c < "$part")))',  # the arithmetic drops the padding some wc print
        f'if [ "$got" != "$size" ]; then echo "received $got of $size bytes" >&2; exit {EXIT_SHORT}; fi',
        f'if [ -e "$result" ]; then rm -f -- "$result" || exit {EXIT_WRITE}; fi',
        f'mv -f -- "$part" "$dest" || exit {EXIT_WRITE}',
        "trap - EXIT",
        f"echo {PUSHED}",
    ]
    if wait_s is not None:
        polls = max(1, math.ceil(wait_s / _POLL_S))
        lines += [
            "i=0",
            'while [ ! -s "$result" ]; do',
            f'  if [ "$i" -ge {polls} ]; then echo {TIMEOUT}; exit 0; fi',
            f"  sleep {_POLL_S}; i=$((i + 1))",
            "done",
            f"echo {RESULT}",
            'cat -- "$result"',
        ]
    return "\n".join(lines) + "\n"


def remote_command(inbox: str, name: str, size: int, wait_s: float | None) -> str:
    """The one command line ssh sends: ``sh -c '<remote_script>'`` (POSIX sh whatever the login shell)."""
    return "sh -c " + shlex.quote(remote_script(inbox, name, size, wait_s))


def _reader(stream: IO[bytes], into: list[bytes]) -> threading.Thread:
    t = threading.Thread(target=lambda: into.append(stream.read()), daemon=True)
    t.start()
    return t


class SshTransport:
    """Stream a bundle into a device's inbox over one ssh session."""

    name = "ssh"

    def __init__(self, target: Target, *, ssh_command: str | Sequence[str] = "ssh",
                 ssh_options: Sequence[str] = (), connect_timeout: float = 10.0,
                 alive_interval: float = 15.0) -> None:
        if target.kind != "ssh" or not target.host:
            raise InputError(f"{target} is not an ssh:// target")
        self.target = target
        self.ssh_command = shlex.split(ssh_command) if isinstance(ssh_command, str) else list(ssh_command)
        if not self.ssh_command:
            raise InputError("the ssh command is empty", hint="pass the ssh client to run, e.g. 'ssh'")
        self.ssh_options = list(ssh_options)
        self.connect_timeout = connect_timeout
        self.alive_interval = alive_interval
        self.inbox = target.path or DEFAULT_SSH_INBOX

    @property
    def destination(self) -> str:
        host = self.target.host or ""
        return f"{self.target.user}@{host}" if self.target.user else host

    def _by_hand(self) -> str:
        port = [] if self.target.port is None else ["-p", str(self.target.port)]
        return shlex.join([*self.ssh_command, *port, self.destination, "true"])

    def command(self, size: int, name: str, wait_s: float | None) -> list[str]:
        """The full ssh argv (user options first: for ``-o`` the first value wins)."""
        argv = [*self.ssh_command, *self.ssh_options,
                "-o", "BatchMode=yes",
                "-o", f"ConnectTimeout={max(1, math.ceil(self.connect_timeout))}",
                "-o", f"ServerAliveInterval={max(1, math.ceil(self.alive_interval))}",
                "-o", "ServerAliveCountMax=3"]
        if self.target.port is not None:
            argv += ["-p", str(self.target.port)]
        return [*argv, "--", self.destination, remote_command(self.inbox, name, size, wait_s)]

    def push(self, bundle: Path, *, progress: Progress | None = None,
             wait_s: float | None = None) -> PushResult:
        """Stream ``bundle`` into the inbox; with ``wait_s``, wait that long for the agent's result file."""
        bundle = Path(bundle)
        size = check_bundle(bundle)
        wait = check_wait(wait_s)
        argv = self.command(size, bundle.name, wait)
        start = time.monotonic()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            raise PushError(f"cannot run the ssh client {self.ssh_command[0]!r}: {e}",
                            hint="install the OpenSSH client (apt-get install openssh-client) or pass the "
                            "ssh command to use") from e
        out: list[bytes] = []
        err: list[bytes] = []
        readers = [_reader(proc.stdout, out), _reader(proc.stderr, err)]  # type: ignore[arg-type]
        sent = 0
        try:
            assert proc.stdin is not None
            try:
                with open(bundle, "rb") as f:
                    while block := f.read(_BLOCK):
                        proc.stdin.write(block)
                        sent += len(block)
                        if progress is not None:
                            progress(sent, size)
                proc.stdin.close()
            except BrokenPipeError:
                pass  # ssh exited early (unreachable, refused): its exit code and stderr say why
            deadline = self.connect_timeout + 30.0 + (wait * 1.2 if wait else 0.0)
            try:
                code = proc.wait(deadline)
            except subprocess.TimeoutExpired as e:
                raise PushError(f"ssh push to {self.target} did not finish within {deadline:.0f} s after the "
                                "bundle was sent", hint="check the device and the network; the ssh client "
                                "was stopped") from e
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for r in readers:
                r.join(5)
        stdout = b"".join(out).decode(errors="replace")
        stderr = b"".join(err).decode(errors="replace").strip()
        seconds = time.monotonic() - start
        if code == EXIT_SSH:
            raise PushError(f"ssh to {self.destination}"
                            f"{'' if self.target.port is None else ' port ' + str(self.target.port)} failed: "
                            f"{stderr or 'no message from ssh'}",
                            hint=f"check that '{self._by_hand()}' works by hand without a password "
                            "prompt (keys loaded in the agent or IdentityFile in ~/.ssh/config, known host key, "
                            "host and port reachable)")
        if code == EXIT_SHORT:
            raise PushError(f"ssh push to {self.target}: the device got an incomplete bundle ({stderr}); "
                            "it was removed", hint="the connection broke during the transfer: push again")
        if code != 0:
            raise PushError(f"ssh push to {self.target}: the remote command failed (exit {code}): "
                            f"{stderr or 'no message'}",
                            hint=f"check that {self.inbox} can be created and written by "
                            f"{self.target.user or 'the ssh user'} on {self.target.host}, and that it has space")
        return self._result(stdout, bundle.name, size, seconds, wait)

    def _result(self, stdout: str, name: str, size: int, seconds: float, wait: float | None) -> PushResult:
        lines = stdout.splitlines()
        if PUSHED not in lines:
            raise PushError(f"ssh push to {self.target}: the remote side did not confirm the bundle "
                            f"(output {stdout[-500:]!r})", hint="is the remote shell POSIX sh compatible?")
        dest = f"{self.inbox.rstrip('/')}/{name}"
        base: dict[str, Any] = {"target": str(self.target), "transport": self.name, "bytes": size,
                                "seconds": seconds}
        if wait is None:
            return PushResult(**base, state="pushed", message=f"delivered to {dest} on {self.target.host}")
        after = lines[lines.index(PUSHED) + 1:]
        if after[:1] == [TIMEOUT]:
            return PushResult(**base, state="timeout",
                              message=f"delivered to {dest}; no result from the agent within {wait:g} s")
        if after[:1] != [RESULT]:
            raise PushError(f"ssh push to {self.target}: unexpected output {stdout[-500:]!r}")
        raw = "\n".join(after[1:])
        try:
            detail = json.loads(raw)
        except ValueError:
            return PushResult(**base, state="failed", detail={"raw": raw[:2000]},
                              message="delivered, but the agent's result file is not JSON")
        if not isinstance(detail, dict) or detail.get("result") not in _RESULTS:
            return PushResult(**base, state="failed", detail={"raw": detail},
                              message="delivered, but the agent's result file has no known 'result' "
                              f"({', '.join(_RESULTS)})")
        state = RESULT_STATES[detail["result"]]
        why = detail.get("message") or detail.get("reason")
        return PushResult(**base, state=state, detail=detail,
                          message=f"{state} on {self.target.host}" + (f": {why}" if why else ""))
