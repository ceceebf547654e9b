"""A bounded pool of worker threads for every syscall on the proxy target.

A target that stops answering (a hard-mounted NFS server that is down) leaves the thread
that asked stuck in the kernel. Were that the trio thread, the control socket, FORGET,
RELEASE and SIGTERM would all wait with it; so the loop only hands calls to these threads
and goes on serving. The threads are few (--workers), daemon threads (one stuck in the
kernel never keeps the process from exiting), and each call runs with its caller's
filesystem credentials, set on the worker around that one call (creds.py).

A call the loop stops waiting for (its task was cancelled, or SIGTERM's grace ran out) is
abandoned: the thread finishes it on its own and its result is dropped. Descriptors the
loop closes while calls are running (an inode forgotten or re-bound by a switch) are
closed only once every call that could still be using them has ended, so a late syscall
of an abandoned call can never reach another file that inherited the descriptor number.

All bookkeeping happens on the trio thread: a worker only stores its result in the call
and signals its eventfd, so none of it needs a lock.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import queue
import threading
from typing import Any, Callable, TypeVar

import outcome
import pyfuse3
import trio

from spfs.fs.creds import CallerCredentials

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_WORKERS = 16
# After SIGTERM: how long a backend call may still take before its request is answered EIO
# (the daemon exits once the kernel lets go of the mount, which a request stuck on a dead
# target would otherwise prevent for ever).
SHUTDOWN_GRACE_S = 5.0
_EXPIRY_TICK_S = 0.25


@dataclasses.dataclass(eq=False, slots=True)
class _Call:
    ticket: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    ctx: pyfuse3.RequestContext | None
    started: float                      # trio clock
    answered: bool = False     # the waiting task got its answer (or gave up waiting)
    abandoned: bool = False    # ... before the thread was done
    result: outcome.Outcome | None = None


class _Worker:
    """One thread, its job queue, and the eventfd it signals each finished call on: the
    waiting task wakes straight from trio's epoll (a third cheaper per call, measured,
    than reporting back through the trio token)."""

    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.jobs: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.thread = threading.Thread(target=self._work, args=(pool.creds,),
                                       name=f"spfs-worker-{index}", daemon=True)
        self.thread.start()

    def _work(self, creds: CallerCredentials) -> None:
        while True:
            call = self.jobs.get()
            if call is None:
                return
            if call.abandoned:  # read without a lock: at worst an abandoned call runs anyway
                call.result = outcome.Error(pyfuse3.FUSEError(errno.EIO))
            else:
                call.result = outcome.capture(_as_caller, creds, call.ctx, call.fn, call.args)
            os.eventfd_write(self.efd, 1)


class WorkerPool:
    def __init__(self, size: int = DEFAULT_WORKERS,
                 creds: CallerCredentials | None = None) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.creds = creds if creds is not None else CallerCredentials()
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []
        self._busy: dict[_Worker, _Call] = {}
        self._free = trio.lowlevel.ParkingLot()   # tasks waiting for an idle worker
        self._next_ticket = 0
        # Calls whose thread has not finished yet, in ticket order (dicts keep it).
        self._running: dict[int, _Call] = {}
        # (ticket bound, fd): close fd once no call with a ticket below the bound runs.
        self._retired: collections.deque[tuple[int, int]] = collections.deque()
        self._progress: trio.Event | None = None   # set when a call ends (for drain)
        self._to_close: list[int] = []
        self._close_wanted: trio.Event | None = None
        self._closes_asked = 0        # close_soon calls so far
        self._closes_done = 0         # ... of which every one has been closed
        self._closes_changed = trio.Event()
        self.shutdown_at: float | None = None
        self.abandoned = 0

    # -- state -------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Calls handed to a thread whose thread has not finished."""
        return len(self._running)

    @property
    def threads(self) -> int:
        return len(self._workers)

    def oldest_seconds(self) -> float:
        """How long the oldest running call has been running (0 without one)."""
        for call in self._running.values():
            return trio.current_time() - call.started
        return 0.0

    # -- calls -------------------------------------------------------------------------
    async def run(self, ctx: pyfuse3.RequestContext | None, fn: Callable[..., T],
                  *args: Any) -> T:
        """fn(*args) on a worker thread with *ctx*'s credentials (the daemon's if None)."""
        worker = self._idle.pop() if self._idle else await self._take_worker()
        call = _Call(self._next_ticket, fn, args, ctx, trio.current_time())
        self._next_ticket += 1
        self._running[call.ticket] = call
        self._busy[worker] = call
        worker.jobs.put(call)
        try:
            await trio.lowlevel.wait_readable(worker.efd)
        except trio.ClosedResourceError:   # SIGTERM's grace ran out (_expire)
            self._abandon(worker, call)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except BaseException:
            self._abandon(worker, call)   # cancelled from outside: the daemon is exiting
            raise
        os.eventfd_read(worker.efd)
        self._finished(worker, call)
        assert call.result is not None
        return call.result.unwrap()  # type: ignore[no-any-return]

    async def _take_worker(self) -> _Worker:
        while True:
            if self._idle:
                return self._idle.pop()
            if len(self._workers) < self.size:
                worker = _Worker(self, len(self._workers))
                self._workers.append(worker)
                return worker
            await self._free.park()

    def close_soon(self, fd: int | None) -> None:
        """Close a descriptor of a target file in a worker, without waiting: closing a
        file written on NFS writes it back, which waits for the server. Closes queued
        together go to one worker in one batch."""
        if fd is None:
            return
        self._to_close.append(fd)
        self._closes_asked += 1
        if self._close_wanted is None:
            self._close_wanted = trio.Event()
            trio.lowlevel.spawn_system_task(self._closer)
        self._close_wanted.set()

    async def _closer(self) -> None:
        while True:
            assert self._close_wanted is not None
            await self._close_wanted.wait()
            self._close_wanted = trio.Event()
            fds, self._to_close = self._to_close, []
            asked = self._closes_asked
            try:
                await self.run(None, _close_all, fds)
            except pyfuse3.FUSEError:
                pass  # abandoned at shutdown
            finally:
                self._closes_done = asked
                event, self._closes_changed = self._closes_changed, trio.Event()
                event.set()

    async def closes_settled(self) -> None:
        """Wait until every close_soon so far has been done. Unlinking or renaming over a
        file the daemon still holds open makes an NFS client keep it as .nfsXXXX (and
        its directory then cannot be removed): the closes of released files go first,
        as when RELEASE closed before the next request was read."""
        asked = self._closes_asked
        while self._closes_done < asked:
            await self._closes_changed.wait()

    def close_later(self, fd: int) -> None:
        """Close *fd* (an O_PATH descriptor: never blocks) once no call that started
        before now is still running."""
        if not self._running:
            _close_quietly(fd)
        else:
            self._retired.append((self._next_ticket, fd))

    # -- loop side -----------------------------------------------------------------------
    def _finished(self, worker: _Worker, call: _Call) -> None:
        call.answered = True
        del self._running[call.ticket]
        del self._busy[worker]
        self._idle.append(worker)
        if self._free:
            self._free.unpark()
        if self._retired:
            self._close_retired()
        if self._progress is not None:
            self._progress.set()
            self._progress = None

    def _abandon(self, worker: _Worker, call: _Call) -> None:
        """Stop waiting for *call*; its worker rejoins the pool once the thread is done."""
        call.answered = call.abandoned = True
        self.abandoned += 1
        try:
            trio.lowlevel.spawn_system_task(self._reclaim, worker, call)
        except RuntimeError:
            pass  # the run is ending: nobody will need the worker again

    async def _reclaim(self, worker: _Worker, call: _Call) -> None:
        await trio.lowlevel.wait_readable(worker.efd)
        os.eventfd_read(worker.efd)
        self._finished(worker, call)

    def _close_retired(self) -> None:
        oldest = next(iter(self._running), self._next_ticket)
        while self._retired and self._retired[0][0] <= oldest:
            _close_quietly(self._retired.popleft()[1])

    async def drain(self, timeout: float, what: str) -> bool:
        """Wait (at most *timeout* s) until every call started before now has ended."""
        bound = self._next_ticket
        with trio.move_on_after(timeout):
            while self._running and next(iter(self._running)) < bound:
                if self._progress is None:
                    self._progress = trio.Event()
                await self._progress.wait()
            return True
        log.warning("%s: %d backend calls still running after %.1f s (the oldest for %.1f s)",
                    what, self.running, timeout, self.oldest_seconds())
        return False

    # -- shutdown ------------------------------------------------------------------------
    def shut_down(self) -> None:
        """After SIGTERM: calls still running SHUTDOWN_GRACE_S from now (or from their
        start) are answered EIO and abandoned, so the daemon can exit."""
        if self.shutdown_at is not None:
            return
        self.shutdown_at = trio.current_time()
        if self._running:
            log.info("%d backend calls running at shutdown; those not done within %.0f s "
                     "will be answered EIO", self.running, SHUTDOWN_GRACE_S)
        trio.lowlevel.spawn_system_task(self._expire)

    async def _expire(self) -> None:
        assert self.shutdown_at is not None
        while True:
            await trio.sleep(_EXPIRY_TICK_S)
            now = trio.current_time()
            for worker, call in list(self._busy.items()):
                if call.answered:
                    continue
                if now - max(call.started, self.shutdown_at) >= SHUTDOWN_GRACE_S:
                    log.warning("%s still running %.1f s after shutdown: answered EIO",
                                getattr(call.fn, "__name__", call.fn), now - self.shutdown_at)
                    # Wakes the waiting task with ClosedResourceError; the eventfd itself
                    # stays open for the thread (and the reclaim that waits for it).
                    trio.lowlevel.notify_closing(worker.efd)


def _as_caller(creds: CallerCredentials, ctx: pyfuse3.RequestContext | None,
               fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    with creds.of(ctx):
        return fn(*args)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close_quietly(fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
