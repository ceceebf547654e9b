"""Run a proxy syscall with the caller's filesystem credentials.

fsuid, fsgid and the supplementary groups are per-thread in Linux, and pyfuse3 runs every
handler on the one trio thread, so switching them around each (synchronous, never awaiting)
syscall block gives every request its caller's identity without affecting anything else.
When fsuid leaves 0 the kernel drops the filesystem capabilities (CAP_DAC_OVERRIDE,
CAP_CHOWN, CAP_FOWNER, ...) from the thread, so the target's permission checks apply.
"""

from __future__ import annotations

import contextlib
import time
from typing import ContextManager, Iterator

import pyfuse3

from spfs.fs import syscalls

_GROUPS_TTL_S = 1.0
_AS_DAEMON = contextlib.nullcontext()


class GroupCache:
    """Supplementary groups of caller pids, re-read at most once a second per pid."""

    def __init__(self) -> None:
        self._cache: dict[int, tuple[float, tuple[int, ...]]] = {}

    def groups(self, pid: int) -> tuple[int, ...]:
        if pid <= 0:
            return ()
        now = time.monotonic()
        hit = self._cache.get(pid)
        if hit is not None and now - hit[0] < _GROUPS_TTL_S:
            return hit[1]
        try:
            groups = tuple(sorted(pyfuse3.get_sup_groups(pid)))
        except (OSError, RuntimeError, ValueError):
            groups = ()  # the caller is gone or lives in another pid namespace
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[pid] = (now, groups)
        return groups


class CallerCredentials:
    def __init__(self) -> None:
        self.group_cache = GroupCache()

    def of(self, ctx: pyfuse3.RequestContext | None) -> ContextManager[None]:
        if ctx is None or (ctx.uid == 0 and ctx.gid == 0):
            return _AS_DAEMON  # the daemon is root already: nothing to switch
        return self._as_caller(ctx)

    @contextlib.contextmanager
    def _as_caller(self, ctx: pyfuse3.RequestContext) -> Iterator[None]:
        syscalls.set_thread_groups(self.group_cache.groups(ctx.pid))
        syscalls.set_thread_fsgid(ctx.gid)
        syscalls.set_thread_fsuid(ctx.uid)
        try:
            yield
        finally:
            syscalls.set_thread_fsuid(0)
            syscalls.set_thread_fsgid(0)
            syscalls.set_thread_groups(())
