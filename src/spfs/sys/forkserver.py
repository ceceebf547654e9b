"""Children that run Python, forked from one clean process.

A fork of a multi-threaded Python copies every lock another thread held at that moment
(logging's, the import system's, a buffered file's), and a child that touches one waits
forever, maybe inside a container's frozen window. So the programs that have threads
(spfs-manager, the SPFS daemon, criu-spfs) call start() while they still have one thread:
the fork server is a fork of the program taken then, and all it ever does is fork again.

Each job goes to it as a module-level function and its arguments (pickled: the server is a
copy of the same program, reached only over a private socketpair) and runs in a fresh child
of it, a *worker*, which sees the descriptors the job names under the same numbers as the
caller does, and no other descriptor of the caller. A process with one thread and no server
forks its workers itself, through the same worker code; one with threads and no server gets
a server started by exec, which is slow (an interpreter start) but never unsafe.

Worker and caller talk over a SEQPACKET socketpair: the worker says its pid; the caller sends
the job, then the descriptors in batches (SCM_RIGHTS carries at most 253 per message); the
worker answers with the result and its descriptors the same way, or with the error.
"""

from __future__ import annotations

import errno
import faulthandler
import fcntl
import gc
import importlib
import logging
import os
import pickle
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from spfs.sys.fds import close_all_but, raise_fd_limit

log = logging.getLogger(__name__)

_FDS_PER_MESSAGE = 250  # SCM_MAX_FD is 253
_MAX_MESSAGE = 1 << 20
_PID = struct.Struct("<i")
_EXEC_START_TIMEOUT = 120.0  # an interpreter start under emulation takes seconds


class JobError(OSError):
    """The job failed in the worker; errno and message come from there."""

    def __init__(self, code: int, message: str, trace: str = "") -> None:
        super().__init__(code, message)
        self.trace = trace


@dataclass
class JobResult:
    """What a job returns when it has descriptors to hand back (they arrive in the caller
    under new numbers), or work to do after its answer is sent (*after*, in the worker)."""

    value: Any = None
    fds: list[int] = field(default_factory=list)
    after: Callable[[], None] | None = None


@dataclass(frozen=True)
class Job:
    func: Callable[..., Any]  # module-level: it travels by name
    args: tuple[Any, ...] = ()
    fds: tuple[int, ...] = ()  # present in the worker under these same numbers
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or getattr(self.func, "__qualname__", repr(self.func))


# -- the caller's side

class Worker:
    """A running job. Not necessarily our child (the server's, usually): it is watched and
    signalled through a pidfd, and its end is read from its channel."""

    def __init__(self, pid: int, channel: socket.socket, label: str, ours: bool) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.channel = channel
        self.label = label
        self.ours = ours  # forked by us: we reap it
        self.returncode: int | None = None

    def result(self, timeout: float) -> JobResult:
        """The job's answer; the worker is killed if it has none within *timeout* s."""
        deadline = time.monotonic() + timeout
        try:
            reply = _receive(self.channel, deadline)
        except TimeoutError:
            self.kill()
            self.wait(max(1.0, deadline - time.monotonic()))
            raise OSError(errno.ETIMEDOUT, f"{self.label}: worker {self.pid} gave no answer "
                                           f"in {timeout:g} s") from None
        if reply is None:
            self.wait(max(1.0, deadline - time.monotonic()))
            raise JobError(errno.EIO, f"{self.label}: worker {self.pid} died without an answer")
        if reply[0] == "err":
            _, code, message, trace = reply
            self.wait(max(1.0, deadline - time.monotonic()))
            raise JobError(code, message, trace)
        _, value, batches = reply
        try:
            fds = _receive_fds(self.channel, batches, deadline)
        except TimeoutError:
            self.kill()
            raise OSError(errno.ETIMEDOUT, f"{self.label}: worker {self.pid} did not hand over "
                                           "its descriptors") from None
        return JobResult(value, [fd for _, fd in fds])

    def poll(self) -> int | None:
        """Its exit code once it exited (0 if its job succeeded, 1 if it failed, -9 if it
        ended without an answer), else None."""
        self.wait(0)
        return self.returncode

    def wait(self, timeout: float) -> bool:
        """True once it exited; waits at most *timeout* s."""
        if self.returncode is not None:
            return True
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if not poller.poll(max(0, int(timeout * 1000))):
            return False
        self.returncode = self._exit_code()
        return True

    def _exit_code(self) -> int:
        if self.ours:
            try:
                _, status = os.waitpid(self.pid, 0)
                return os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                pass
        try:
            reply = _receive(self.channel, time.monotonic())
        except (TimeoutError, OSError):
            reply = None
        if reply is None:
            return -signal.SIGKILL
        return 0 if reply[0] == "ok" else 1

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        """Let go of it (it runs on if it still has work)."""
        self.channel.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


class _Server:
    def __init__(self, pid: int, sock: socket.socket, ours: bool) -> None:
        self.pid = pid
        self.sock = sock
        self.ours = ours
        self.lock = threading.Lock()

    def request(self, channel: socket.socket, module: str) -> None:
        with self.lock:
            socket.send_fds(self.sock, [module.encode()], [channel.fileno()])


_server: _Server | None = None
_start_lock = threading.Lock()


def start(preload: Iterable[str] = ()) -> None:
    """Fork the server now, while this process has one thread; *preload*: modules it imports
    while idle, so that its workers need not. Later calls do nothing; so does a call from a
    process that has threads already (a server is started by exec when a job needs it)."""
    global _server
    with _start_lock:
        if _server is not None:
            return
        if threading.active_count() > 1:  # too late to fork: one is exec'd when needed
            log.warning("fork server not started: threads run already (%s)",
                        ", ".join(t.name for t in threading.enumerate()))
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        _flush_logs()
        pid = os.fork()
        if pid == 0:
            try:
                ours.close()
                _serve(theirs, list(preload))
            finally:
                os._exit(0)
        theirs.close()
        _server = _Server(pid, ours, ours=True)


def started() -> bool:
    return _server is not None


def server_pid() -> int | None:
    """The server's pid: a caller that moves itself out of a cgroup it is about to freeze
    moves the server too (its workers guard that freeze)."""
    return _server.pid if _server is not None else None


def spawn(job: Job, timeout: float) -> Worker:
    """Start *job* in a worker; returns once the worker has it (bounded by *timeout*)."""
    if any(fd < 3 for fd in job.fds):
        raise ValueError(f"{job.label}: stdio cannot be handed to a worker")
    payload = pickle.dumps((job.func, job.args, list(job.fds)))
    deadline = time.monotonic() + timeout
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        direct = _server is None and threading.active_count() == 1
        if direct:
            _flush_logs()
            pid = os.fork()
            if pid == 0:
                ours.close()
                _worker(theirs, inherited=True)
        else:
            _server_for(job).request(theirs, job.func.__module__)
        theirs.close()
        started = _receive_raw(ours, deadline)
        if not started or len(started) != _PID.size:
            raise OSError(errno.EIO, f"{job.label}: the worker did not start")
        worker = Worker(_PID.unpack(started)[0], ours, job.label, ours=direct)
    except TimeoutError:
        ours.close()
        raise OSError(errno.ETIMEDOUT, f"{job.label}: no worker started in {timeout:g} s") from None
    except BaseException:
        ours.close()
        theirs.close()
        raise
    try:
        ours.settimeout(max(0.001, deadline - time.monotonic()))
        ours.sendall(payload)
        if not direct:
            _send_fds(ours, list(job.fds))
        ours.settimeout(None)
    except OSError as exc:
        worker.kill()
        worker.wait(1.0)
        worker.close()
        raise OSError(exc.errno or errno.EIO, f"{job.label}: handing the job to worker "
                                              f"{worker.pid}: {exc}") from None
    return worker


def call(job: Job, timeout: float) -> JobResult:
    """Run *job* in a worker and return its result; the worker is killed after *timeout* s."""
    deadline = time.monotonic() + timeout
    worker = spawn(job, timeout)
    try:
        result = worker.result(max(0.001, deadline - time.monotonic()))
        if worker.ours:
            worker.wait(max(1.0, deadline - time.monotonic()))
        return result
    finally:
        worker.close()


def _server_for(job: Job) -> _Server:
    """The server; one started by exec if this process has threads and never started one
    (or if it died: a killed server must not stop the program's work)."""
    global _server
    with _start_lock:
        if _server is not None and _alive(_server.pid):
            return _server
        log.warning("no fork server running (for %s): starting one by exec", job.label)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        import subprocess
        proc = subprocess.Popen([sys.executable, "-m", "spfs.sys.forkserver", str(theirs.fileno())],
                                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        _server = _Server(proc.pid, ours, ours=False)
        _exec_servers.append(proc)
        return _server


_exec_servers: list[Any] = []  # their Popen objects: reaped by subprocess when they end


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


# -- messages

def _receive_raw(sock: socket.socket, deadline: float) -> bytes | None:
    """One message; None at end of file; TimeoutError past *deadline*."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if poller.poll(max(0, int(left * 1000))):
            try:
                data = sock.recv(_MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                return None
            return data or None
        if left <= 0:
            raise TimeoutError


def _receive(sock: socket.socket, deadline: float) -> tuple[Any, ...] | None:
    data = _receive_raw(sock, deadline)
    return None if data is None else pickle.loads(data)


def _send_fds(sock: socket.socket, fds: list[int]) -> None:
    """The descriptors in batches, each with the numbers they stand for."""
    sock.sendall(_PID.pack(len(fds)))
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        batch = fds[i:i + _FDS_PER_MESSAGE]
        socket.send_fds(sock, [pickle.dumps(batch)], batch)


def _receive_fds(sock: socket.socket, batches: int | None, deadline: float) -> list[tuple[int, int]]:
    """(number it stood for, descriptor here) pairs; *batches* None: read the count first."""
    received: list[tuple[int, int]] = []
    try:
        count = batches
        if count is None:
            head = _receive_raw(sock, deadline)
            if head is None:
                raise OSError(errno.EIO, "the descriptors' count is missing")
            count = _PID.unpack(head)[0]
        while len(received) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            try:
                data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, _FDS_PER_MESSAGE)
            except socket.timeout:
                raise TimeoutError from None
            finally:
                sock.settimeout(None)
            if not data:
                raise OSError(errno.EIO, "the descriptors stopped short")
            received += list(zip(pickle.loads(data), fds))
    except BaseException:
        for _, fd in received:
            os.close(fd)
        raise
    return received


# -- the server

def _serve(sock: socket.socket, preload: list[str]) -> None:
    """Fork a worker per request until the program's end of the socket closes. Workers are
    left running then: a thaw guard or a watchdog must outlive the program."""
    close_all_but({0, 1, 2, sock.fileno()})
    for sig in (signal.SIGUSR1, signal.SIGUSR2):  # a dump to a log file we just closed
        faulthandler.unregister(sig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    logging.getLogger().handlers.clear()  # their streams are closed: workers log to stderr
    logging.basicConfig(level=logging.WARNING, format="spfs worker %(process)d: %(message)s")
    imported: set[str] = set(sys.modules)
    # Out of the collector's reach: a collection in a worker would write to every object's
    # header and copy most of the heap's pages (see standby.md).
    gc.freeze()
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    while True:
        if not poller.poll(0 if preload else 1000):
            _reap_all()
            if preload:
                _import(preload.pop(0), imported)
            continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        except OSError:
            return
        if not data and not fds:
            return  # the program is gone
        if not fds:
            continue
        _import(data.decode(errors="replace"), imported)
        pid = os.fork()
        if pid == 0:
            sock.close()
            _worker(socket.socket(fileno=fds[0]), inherited=False)
        os.close(fds[0])
        _reap_all()


def _import(module: str, imported: set[str]) -> None:
    """Imported here once rather than in every worker. A failure is the worker's to report."""
    if module in imported:
        return
    imported.add(module)
    try:
        importlib.import_module(module)
    except Exception:  # the worker imports it again and says why it fails
        pass
    gc.freeze()


def _reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


# -- the worker

def _worker(channel: socket.socket, inherited: bool) -> None:
    """Run one job and exit; never returns. *inherited*: forked by the caller itself, so the
    job's descriptors are here already under their numbers."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise_fd_limit()  # a donor may hold more descriptors than the default soft limit
        channel.sendall(_PID.pack(os.getpid()))
        deadline = time.monotonic() + 60
        payload = _receive_raw(channel, deadline)
        if payload is None:
            return
        func, args, numbers = pickle.loads(payload)
        if not inherited:
            channel = _place(_receive_fds(channel, None, deadline), channel)
        close_all_but({0, 1, 2, channel.fileno(), *numbers})
        code = _answer(channel, func, args)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _answer(channel: socket.socket, func: Callable[..., Any], args: tuple[Any, ...]) -> int:
    try:
        out = func(*args)
    except OSError as exc:
        what = exc.strerror or str(exc)
        if exc.filename is not None:
            what = f"{what}: {exc.filename!r}"
        _reply(channel, ("err", exc.errno or errno.EIO, what, ""))
        return 1
    except BaseException as exc:  # reported whatever it is: the caller must never hang
        _reply(channel, ("err", errno.EIO, f"{type(exc).__name__}: {exc}",
                         traceback.format_exc()[-2000:]))
        return 1
    result = out if isinstance(out, JobResult) else JobResult(out)
    _reply(channel, ("ok", result.value, len(result.fds)))
    for fd in result.fds:
        socket.send_fds(channel, [pickle.dumps([fd])], [fd])
    if result.after is not None:
        result.after()
    return 0


def _reply(channel: socket.socket, message: tuple[Any, ...]) -> None:
    try:
        channel.sendall(pickle.dumps(message))
    except OSError:
        pass  # the caller gave up on us


def _place(received: list[tuple[int, int]], channel: socket.socket) -> socket.socket:
    """Each received descriptor under the number it had in the caller; returns the channel,
    moved if it sat on one of those numbers."""
    wanted = {number for number, _ in received}
    top = max(wanted, default=2) + 1
    if channel.fileno() in wanted:
        moved = fcntl.fcntl(channel.fileno(), fcntl.F_DUPFD_CLOEXEC, top)
        channel.close()
        channel = socket.socket(fileno=moved)
    staged = []
    for number, fd in received:  # above every wanted number first: none is overwritten
        staged.append((number, fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, top)))
        os.close(fd)
    for number, high in staged:
        os.dup2(high, number, inheritable=False)
        os.close(high)
    return channel


def main() -> None:
    """Started by exec (see _server_for): serve on the inherited descriptor."""
    fd = int(sys.argv[1])
    try:
        _serve(socket.socket(fileno=fd), [])
    finally:
        os._exit(0)


if __name__ == "__main__":
    # through the module's own name: as __main__ its JobResult would be another class
    from spfs.sys import forkserver as _named
    _named.main()
