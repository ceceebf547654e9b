"""Run a proxy syscall with the caller's filesystem credentials.

fsuid, fsgid and the supplementary groups are per-thread in Linux, and every proxy syscall
runs on a worker thread (workers.py), so switching them around each call on that thread
gives every request its caller's identity without affecting anything else. A worker serves
many callers in turn: a thread whose switch back to the daemon failed is marked, and its
next call, even one as the daemon, first resets it (or is refused), so one caller's
identity never carries over to the next.
When fsuid leaves 0 the kernel drops the filesystem capabilities (CAP_DAC_OVERRIDE,
CAP_CHOWN, CAP_FOWNER, ...) from the thread, so the target's permission checks apply.

Each switch is read back (spfs.sys.thread_creds); one that did not take effect refuses the
request (EACCES) rather than run it as root, and the daemon refuses to start where the
switch cannot work at all (check_switch).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
import time
from typing import ContextManager

import pyfuse3

from spfs.sys import thread_creds
from spfs.sys.thread_creds import CredentialSwitchError

log = logging.getLogger(__name__)

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
        self._thread = threading.local()   # the groups last set on each thread

    def of(self, ctx: pyfuse3.RequestContext | None) -> ContextManager[None]:
        if ctx is None or (ctx.uid == 0 and ctx.gid == 0):
            if getattr(self._thread, "switched", False):
                self._reset_thread()
            return _AS_DAEMON  # the daemon is root already: nothing to switch
        return _AsCaller(self, ctx.uid, ctx.gid, self.group_cache.groups(ctx.pid))

    def _reset_thread(self) -> None:
        """Back to the daemon's identity on a thread a caller's switch left behind."""
        try:
            thread_creds.set_thread_fsuid(0)
            thread_creds.set_thread_fsgid(0)
            self.set_groups(())
        except (OSError, CredentialSwitchError) as e:
            log.error("resetting a worker thread to the daemon's credentials: %s; "
                      "request refused", e)
            raise pyfuse3.FUSEError(errno.EACCES) from None
        self._thread.switched = False

    def set_groups(self, groups: tuple[int, ...]) -> None:
        """setgroups for this thread, skipped when it has these groups already (most
        callers have none, and the daemon's thread has none between requests)."""
        if getattr(self._thread, "groups", None) != groups:
            thread_creds.set_thread_groups(groups)
            self._thread.groups = groups


class _AsCaller:
    """A plain class rather than a generator context manager: it runs around most
    requests of non-root callers, and is half the cost."""
    __slots__ = ("_creds", "_uid", "_gid", "_groups")

    def __init__(self, creds: CallerCredentials, uid: int, gid: int,
                 groups: tuple[int, ...]) -> None:
        self._creds, self._uid, self._gid, self._groups = creds, uid, gid, groups

    def __enter__(self) -> None:
        self._creds._thread.switched = True   # until _back_to_daemon has fully succeeded
        try:
            self._creds.set_groups(self._groups)
            thread_creds.set_thread_fsgid(self._gid)
            thread_creds.set_thread_fsuid(self._uid)
        except (OSError, CredentialSwitchError) as e:
            # never run the request with whatever the thread was left with (root)
            log.error("switching to uid %d gid %d: %s; request refused", self._uid,
                      self._gid, e)
            self._back_to_daemon()
            raise pyfuse3.FUSEError(errno.EACCES) from None

    def __exit__(self, *exc_info: object) -> None:
        self._back_to_daemon()

    def _back_to_daemon(self) -> None:
        thread_creds.set_thread_fsuid(0)
        thread_creds.set_thread_fsgid(0)
        self._creds.set_groups(())
        self._creds._thread.switched = False


def check_switch(machine: str | None = None) -> None:
    """For the daemon's start: raises (UnsupportedArchitecture, CredentialSwitchError)
    where the per-thread switch cannot work (an architecture without a known setgroups
    number, or a switch that does not read back), rather than run every request as root.
    *machine*: platform.machine() unless given (tests name another architecture)."""
    thread_creds.probe(machine)
