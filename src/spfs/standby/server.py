"""The standby's loop: single-threaded (a fork copies only the calling thread, so no other
thread may exist to leave a lock held in the child), with every program's modules imported.

Each accepted connection carries one spawn request. The child is told its pid, and the
connection is kept as its lifeline: the exit status goes back on it when the child is reaped.
A client that goes away leaves its child running.

A spare child per program is forked ahead of time and waits on a socket pair for a request:
a request takes it, so the fork (tens of ms of copied page tables under emulation) is not
paid in the middle of a restore; a new spare is forked once requests have paused for a
while. Without a spare (taken, or died) the child is forked on the spot.
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
import time
import traceback
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable

from spfs.standby.child import run_child
from spfs.sys.private_dir import bind_private, ensure_private_dir
from spfs.standby.protocol import (PROGRAMS, RequestError, SpawnRequest, receive_message,
                                   send_message)

log = logging.getLogger(__name__)

REQUEST_WAIT_S = 5.0  # a connection that sends nothing is dropped after this
SPARE_AFTER_IDLE_S = 1.0  # new spares once requests have paused this long
HANDOVER_WAIT_S = 5.0  # for a spare to confirm it took a request
TAKEN = b"T"


@dataclass
class Spare:
    pid: int
    channel: socket.socket  # our end; the spare waits for a request on the other


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
    spares: dict[str, Spare] = field(default_factory=dict)  # program -> its spare
    _refill_at: float | None = None
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
        # root-only, on the host, before anything in it is touched (spfs.sys.private_dir)
        ensure_private_dir(os.path.dirname(os.path.abspath(self.socket_path)))
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        if _answers(self.socket_path):
            raise OSError(errno.EADDRINUSE, f"a standby already serves {self.socket_path}")
        try:
            os.unlink(self.socket_path)  # a stale one, left by a standby that was killed
        except FileNotFoundError:
            pass
        bind_private(listener, self.socket_path)
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
        self._refill_at = time.monotonic()
        try:
            while not self._stopping:
                if self._refill_at is not None and time.monotonic() >= self._refill_at:
                    self._refill_at = None
                    self._refill()
                wait = 1.0 if self._refill_at is None else \
                    min(1.0, max(0.0, self._refill_at - time.monotonic()))
                for key, _ in self._selector.select(timeout=wait):
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
            child = self._hand_to_spare(request.program, data, fds)
            how = "spare"
            if child is None:
                child, how = self._fork(request, fds), "forked"
        finally:
            for fd in fds:
                os.close(fd)
        self._refill_at = time.monotonic() + SPARE_AFTER_IDLE_S
        log.info("pid %d: %s %s -> child %d (%s)", pid, request.program,
                 json.dumps(request.argv), child, how)
        send_message(conn, {"pid": child})
        conn.setblocking(False)
        self.children[child] = conn

    def _hand_to_spare(self, program: str, data: bytes, fds: list[int]) -> int | None:
        """The spare's pid once it has confirmed it took the request; None when there is no
        spare to take or it did not (died meanwhile: _reap collects it)."""
        spare = self.spares.pop(program, None)
        if spare is None:
            return None
        try:
            spare.channel.settimeout(HANDOVER_WAIT_S)
            socket.send_fds(spare.channel, [data], fds)
            if spare.channel.recv(1) == TAKEN:
                return spare.pid
            problem = "gone"
        except OSError as exc:
            problem = str(exc) or type(exc).__name__
        finally:
            spare.channel.close()
        # never two children for one request: a spare that is merely slow must not go on
        os.kill(spare.pid, signal.SIGKILL)
        log.warning("spare %s %d: %s; forking instead", program, spare.pid, problem)
        return None

    def _refill(self) -> None:
        for program in PROGRAMS:
            if program not in self.spares:
                try:
                    self.spares[program] = self._fork_spare(program)
                except OSError as exc:
                    log.warning("no spare %s: %s", program, exc)

    def _fork_spare(self, program: str) -> Spare:
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            child = self._forked(lambda: self._wait_as_spare(theirs, ours))
        finally:
            theirs.close()
        log.debug("spare %s: %d", program, child)
        return Spare(child, ours)

    def _wait_as_spare(self, channel: socket.socket, standby_end: socket.socket) -> int:
        # Nothing of the standby's but the log: the listener (a dead standby must refuse
        # connections, not queue them), the lifelines, the standby's end of every spare's
        # channel, ours included (a spare ends on EOF from the standby, which a copy held
        # here would prevent)
        for sock in (self._listener, standby_end, *self.children.values(),
                     *(s.channel for s in self.spares.values())):
            if sock is not None:
                sock.close()
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
        os.close(self._selector.fileno())  # only our copy: unregistering would be the parent's
        data, fds = receive_message(channel)
        if not data:
            return 0  # the standby stopped or died: nothing asked of us
        channel.send(TAKEN)
        channel.close()
        return self._run(SpawnRequest.decode(data, len(fds)), fds)

    def _fork(self, request: SpawnRequest, fds: list[int]) -> int:
        return self._forked(lambda: self._run(request, fds))

    def _forked(self, body: Callable[[], int]) -> int:
        """Fork; the child runs *body* and exits with its status."""
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
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_DFL)
                code = body()
            except BaseException:
                log.exception("child %d failed before its program ran", os.getpid())
            finally:
                sys.stderr.flush()  # os._exit skips it: a daemon's stderr is block-buffered
            os._exit(code)
        return child

    def _run(self, request: SpawnRequest, fds: list[int]) -> int:
        """In the child: become the program."""
        logged = True
        def leave_standby() -> None:
            nonlocal logged
            logging.getLogger().handlers.clear()
            logged = False
        try:
            return run_child(self.modules[request.program], request, fds, leave_standby)
        except BaseException:
            if logged:  # before the child had the client's stderr
                log.exception("child %d: setting up %s failed", os.getpid(), request.program)
            else:
                traceback.print_exc()
            return 1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            for program, spare in list(self.spares.items()):
                if spare.pid == pid:  # died unused (killed?): replaced after a pause
                    log.warning("spare %s %d exited with %d", program, pid, code)
                    spare.channel.close()
                    del self.spares[program]
                    self._refill_at = time.monotonic() + SPARE_AFTER_IDLE_S
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
        for spare in self.spares.values():
            spare.channel.close()  # EOF: the spare exits
        self.spares.clear()
        log.info("standby stopped")
