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

All bookkeeping happens on the trio thread: a worker only reports back through the trio
token (run_sync_soon), so none of it needs a lock.
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


@dataclasses.dataclass(eq=False)
class _Call:
    ticket: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    ctx: pyfuse3.RequestContext | None
    task: trio.lowlevel.Task | None     # None: nobody waits (fire and forget)
    started: float                      # trio clock
    answered: bool = False     # the waiting task got its answer (or gave up waiting)
    abandoned: bool = False    # ... before the thread was done


class WorkerPool:
    def __init__(self, size: int = DEFAULT_WORKERS,
                 creds: CallerCredentials | None = None) -> None:
        if size < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = size
        self.creds = creds if creds is not None else CallerCredentials()
        self._jobs: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0                    # threads waiting for a job (loop's count)
        self._token: trio.lowlevel.TrioToken | None = None
        self._next_ticket = 0
        # Calls whose thread has not finished yet, in ticket order (dicts keep it).
        self._running: dict[int, _Call] = {}
        # (ticket bound, fd): close fd once no call with a ticket below the bound runs.
        self._retired: collections.deque[tuple[int, int]] = collections.deque()
        self._progress = trio.Event()     # set (and replaced) whenever a call ends
        self.shutdown_at: float | None = None
        self.abandoned = 0

    # -- state -------------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Calls handed to a thread (or queued for one) whose thread has not finished."""
        return len(self._running)

    @property
    def threads(self) -> int:
        return len(self._threads)

    def oldest_seconds(self) -> float:
        """How long the oldest running call has been running (0 without one)."""
        for call in self._running.values():
            return trio.current_time() - call.started
        return 0.0

    # -- calls -------------------------------------------------------------------------
    async def run(self, ctx: pyfuse3.RequestContext | None, fn: Callable[..., T],
                  *args: Any) -> T:
        """fn(*args) on a worker thread with *ctx*'s credentials (the daemon's if None)."""
        call = self._submit(ctx, fn, args, trio.lowlevel.current_task())

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._abandon(call)
            return trio.lowlevel.Abort.SUCCEEDED
        result = await trio.lowlevel.wait_task_rescheduled(abort)
        return result  # type: ignore[no-any-return]

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """fn(*args) on a worker thread as the daemon; nobody waits for it (closes)."""
        self._submit(None, fn, args, None)

    def close_soon(self, fd: int | None) -> None:
        """Close a descriptor of a target file in a worker: closing a file written on NFS
        writes it back, which waits for the server."""
        if fd is not None:
            self.submit(_close_quietly, fd)

    def close_later(self, fd: int) -> None:
        """Close *fd* (an O_PATH descriptor: never blocks) once no call that started
        before now is still running."""
        if not self._running:
            _close_quietly(fd)
        else:
            self._retired.append((self._next_ticket, fd))

    def _submit(self, ctx: pyfuse3.RequestContext | None, fn: Callable[..., Any],
                args: tuple[Any, ...], task: trio.lowlevel.Task | None) -> _Call:
        if self._token is None:
            self._token = trio.lowlevel.current_trio_token()
        call = _Call(self._next_ticket, fn, args, ctx, task, trio.current_time())
        self._next_ticket += 1
        self._running[call.ticket] = call
        if self._idle == 0 and len(self._threads) < self.size:
            thread = threading.Thread(target=self._work, name=f"spfs-worker-{len(self._threads)}",
                                      daemon=True)
            self._threads.append(thread)
            thread.start()
        else:
            self._idle = max(0, self._idle - 1)
        self._jobs.put(call)
        return call

    # -- worker side ---------------------------------------------------------------------
    def _work(self) -> None:
        creds = self.creds
        token = self._token
        assert token is not None
        while True:
            call = self._jobs.get()
            if call is None:
                return
            if call.abandoned:  # read without a lock: at worst an abandoned call runs anyway
                result: outcome.Outcome = outcome.Error(pyfuse3.FUSEError(errno.EIO))
            else:
                result = outcome.capture(_as_caller, creds, call.ctx, call.fn, call.args)
            try:
                token.run_sync_soon(self._finished, call, result)
            except trio.RunFinishedError:
                return  # the daemon is exiting; nobody is left to tell

    # -- loop side -----------------------------------------------------------------------
    def _finished(self, call: _Call, result: outcome.Outcome) -> None:
        self._idle += 1
        del self._running[call.ticket]
        if call.task is not None and not call.answered:
            call.answered = True
            trio.lowlevel.reschedule(call.task, result)
        elif isinstance(result, outcome.Error) and call.task is None:
            log.warning("background %s failed: %s", getattr(call.fn, "__name__", call.fn),
                        result.error)
        self._close_retired()
        event, self._progress = self._progress, trio.Event()
        event.set()

    def _abandon(self, call: _Call) -> None:
        call.answered = call.abandoned = True
        self.abandoned += 1

    def _close_retired(self) -> None:
        oldest = next(iter(self._running), self._next_ticket)
        while self._retired and self._retired[0][0] <= oldest:
            _close_quietly(self._retired.popleft()[1])

    async def drain(self, timeout: float, what: str) -> bool:
        """Wait (at most *timeout* s) until every call started before now has ended."""
        bound = self._next_ticket
        with trio.move_on_after(timeout):
            while self._running and next(iter(self._running)) < bound:
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
            for call in list(self._running.values()):
                if call.answered or call.task is None:
                    continue
                if now - max(call.started, self.shutdown_at) >= SHUTDOWN_GRACE_S:
                    log.warning("%s still running %.1f s after shutdown: answered EIO",
                                getattr(call.fn, "__name__", call.fn), now - self.shutdown_at)
                    self._abandon(call)
                    trio.lowlevel.reschedule(call.task, outcome.Error(pyfuse3.FUSEError(errno.EIO)))


def _as_caller(creds: CallerCredentials, ctx: pyfuse3.RequestContext | None,
               fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    with creds.of(ctx):
        return fn(*args)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
