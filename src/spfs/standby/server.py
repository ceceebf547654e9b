"""The standby's loop: single-threaded (a fork copies only the calling thread, so no other
thread may exist to leave a lock held in the child), with every program's modules imported.

Each accepted connection carries one spawn request. The child is forked at once, told its
pid, and the connection is kept as its lifeline: the exit status goes back on it when the
child is reaped. A client that goes away leaves its child running.
"""

from __future__ import annotations

import errno
import gc
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import traceback
from dataclasses import dataclass, field
from types import ModuleType

from spfs.standby.child import run_child
from spfs.standby.protocol import (PROGRAMS, RequestError, SpawnRequest, receive_message,
                                   send_message)

log = logging.getLogger(__name__)

REQUEST_WAIT_S = 5.0  # a connection that sends nothing is dropped after this


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


@dataclass
class StandbyServer:
    socket_path: str
    modules: dict[str, ModuleType] = field(default_factory=dict)
    children: dict[int, socket.socket] = field(default_factory=dict)  # pid -> its lifeline
    _listener: socket.socket | None = None
    _selector: selectors.DefaultSelector = field(default_factory=selectors.DefaultSelector)
    _wakeup: tuple[int, int] | None = None
    _stopping: bool = False

    def preload(self) -> None:
        """What makes the standby worth having: every program's imports, done once."""
        for program, module in PROGRAMS.items():
            self.modules[program] = importlib.import_module(module)
        from spfs.manager.swapper import import_swap_engine
        import_swap_engine()  # the manager imports it later in a thread; here it is free
        log.info("imported %s", ", ".join(sorted(m.__name__ for m in self.modules.values())))

    def bind(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path) or ".", mode=0o700, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        if _answers(self.socket_path):
            raise OSError(errno.EADDRINUSE, f"a standby already serves {self.socket_path}")
        try:
            os.unlink(self.socket_path)  # a stale one, left by a standby that was killed
        except FileNotFoundError:
            pass
        old_umask = os.umask(0o177)
        try:
            listener.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener

    def serve(self) -> None:
        """Until SIGTERM or SIGINT; the children go on without us."""
        assert self._listener is not None
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (read_end, write_end)
        signal.set_wakeup_fd(write_end)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(read_end, selectors.EVENT_READ, "signal")
        log.info("standby %d serving on %s", os.getpid(), self.socket_path)
        try:
            while not self._stopping:
                for key, _ in self._selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "signal":
                        self._drain(read_end)
                self._reap()
        finally:
            self.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stopping = True

    @staticmethod
    def _drain(fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.set_inheritable(False)
        try:
            self._handle(conn)
        except OSError as exc:
            log.warning("request failed: %s", exc)
            conn.close()

    def _handle(self, conn: socket.socket) -> None:
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid not in (0, os.geteuid()):
            log.warning("refused uid %d (pid %d)", uid, pid)
            send_message(conn, {"error": "permission denied"})
            conn.close()
            return
        conn.settimeout(REQUEST_WAIT_S)
        fds: list[int] = []
        try:
            data, fds = receive_message(conn)
            request = SpawnRequest.decode(data, len(fds))
        except (RequestError, OSError) as exc:
            for fd in fds:
                os.close(fd)
            log.warning("bad request from pid %d: %s", pid, exc)
            send_message(conn, {"error": f"bad request: {exc}"})
            conn.close()
            return
        try:
            child = self._fork(request, fds)
        finally:
            for fd in fds:
                os.close(fd)
        log.info("pid %d: %s %s -> child %d", pid, request.program,
                 json.dumps(request.argv), child)
        send_message(conn, {"pid": child})
        conn.setblocking(False)
        self.children[child] = conn

    def _fork(self, request: SpawnRequest, fds: list[int]) -> int:
        for handler in logging.getLogger().handlers:
            handler.flush()
        # Everything allocated so far (the imports, mostly) out of the collector's reach: a
        # collection in the child would otherwise write to every object's header and copy
        # nearly every page of the heap, which under emulation costs more than the fork.
        gc.freeze()
        sys.stdout.flush()
        sys.stderr.flush()
        child = os.fork()
        if child == 0:
            logged = True
            def leave_standby() -> None:
                nonlocal logged
                logging.getLogger().handlers.clear()
                logged = False
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                code = run_child(self.modules[request.program], request, fds, leave_standby)
            except BaseException:
                if logged:  # before the child had the client's stderr
                    log.exception("child %d: setting up %s failed", os.getpid(),
                                  request.program)
                else:
                    traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()  # os._exit skips it: a daemon's stderr is block-buffered
            os._exit(code)
        return child

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            conn = self.children.pop(pid, None)
            log.info("child %d exited with %d", pid, code)
            if conn is not None:
                try:
                    send_message(conn, {"exit": code})
                except OSError as exc:
                    if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.EAGAIN):
                        log.warning("child %d: telling its client: %s", pid, exc)
                conn.close()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        signal.set_wakeup_fd(-1)
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None
        for conn in self.children.values():
            conn.close()
        self.children.clear()
        log.info("standby stopped")
