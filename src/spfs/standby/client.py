"""Asking the standby for a program, and a handle on the child it forked that behaves like
subprocess.Popen where the callers need it (pid, poll, wait, send_signal, terminate, kill).

The child is the standby's, not ours: its exit status comes on the connection, and signals go
through a pidfd, so a recycled pid can never be hit.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

from spfs.standby.protocol import SpawnRequest, receive_message

CONNECT_TIMEOUT = 5.0
UNKNOWN_EXIT = 255  # the standby died before telling: the child is gone, its status lost


class StandbyUnavailable(OSError):
    """No standby answers at that path: start the program the ordinary way."""


class StandbyError(RuntimeError):
    """The standby answered, but refused or failed the request."""


@dataclass
class StandbyChild:
    program: str
    pid: int
    _conn: socket.socket | None  # the lifeline; None once the standby is gone
    _pidfd: int
    returncode: int | None = None
    args: list[str] = field(default_factory=list)

    def _check(self, block_s: float) -> None:
        """Wait up to *block_s* for the exit status (from the standby) or, if the standby
        is gone, for the child's end (from its pidfd, status unknown)."""
        if self.returncode is not None:
            return
        if self._conn is None:
            if self._pidfd < 0 or select.select([self._pidfd], [], [], block_s)[0]:
                self._finish(UNKNOWN_EXIT)
            return
        if not select.select([self._conn], [], [], block_s)[0]:
            return
        try:
            data, fds = receive_message(self._conn)
        except (OSError, ValueError):
            data, fds = b"", []
        for fd in fds:
            os.close(fd)
        if data:
            self._finish(int(json.loads(data).get("exit", UNKNOWN_EXIT)))
        else:
            self._conn.close()
            self._conn = None
            self._check(0)

    def poll(self) -> int | None:
        self._check(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args or [self.program], timeout or 0)
            self._check(min(left, 1.0))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None and self._pidfd >= 0:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _finish(self, code: int) -> None:
        self.returncode = code
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def spawn(socket_path: str, program: str, argv: list[str], fds: dict[int, int] | None = None,
          env: dict[str, str] | None = None, cwd: str | None = None,
          new_session: bool = False) -> StandbyChild:
    """Have the standby fork *program* with *argv*; *fds* maps the child's descriptor numbers
    to ours (0, 1 and 2 default to /dev/null). Raises StandbyUnavailable when no standby
    answers (the caller starts the program itself) and StandbyError when it refuses."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    conn.settimeout(CONNECT_TIMEOUT)
    try:
        conn.connect(socket_path)
    except OSError as exc:
        conn.close()
        raise StandbyUnavailable(exc.errno or errno.ECONNREFUSED,
                                 f"no standby at {socket_path}: {exc.strerror}") from None
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        mapping = {0: null, 1: null, 2: null, **(fds or {})}
        request = SpawnRequest(program, argv, dict(os.environ if env is None else env),
                               cwd or os.getcwd(), new_session, list(mapping))
        socket.send_fds(conn, [request.encode()], list(mapping.values()))
        data, received = receive_message(conn)
    except OSError as exc:
        conn.close()
        raise StandbyError(f"standby at {socket_path}: {exc}") from None
    finally:
        os.close(null)
    for fd in received:
        os.close(fd)
    reply = json.loads(data) if data else {"error": "closed the connection"}
    if "pid" not in reply:
        conn.close()
        raise StandbyError(f"standby at {socket_path}: {reply.get('error')}")
    pid = int(reply["pid"])
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        pidfd = -1  # already reaped: its exit status is on the connection
    conn.settimeout(None)
    return StandbyChild(program, pid, conn, pidfd, args=[program, *argv])
