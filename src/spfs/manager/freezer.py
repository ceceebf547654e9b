"""Freezing a container's cgroup (v1 freezer.state or v2 cgroup.freeze), bounded and guarded.

Every wait is bounded.  A freeze that does not complete (a task sleeping uninterruptibly, e.g.
in a FUSE request of a stub) is undone before the error is raised.  While a cgroup is frozen a
small guard (a worker of the fork server) holds a pipe from us: if the manager dies, the guard sees EOF and thaws the
cgroup, so a killed manager never leaves a container frozen.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from spfs.sys import forkserver
from spfs.sys.forkserver import Job

log = logging.getLogger(__name__)


class FreezerVersion(enum.Enum):
    V1 = "v1"
    V2 = "v2"


class FreezeError(OSError):
    pass


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class CgroupFreezer:
    """One cgroup directory; detects whether it is a v1 freezer or a v2 cgroup."""

    def __init__(self, path: str | Path, poll_interval: float = 0.002) -> None:
        self.path = Path(path)
        self.poll_interval = poll_interval
        if (self.path / "cgroup.freeze").exists():
            self.version = FreezerVersion.V2
        elif (self.path / "freezer.state").exists():
            self.version = FreezerVersion.V1
        else:
            raise FreezeError(errno.ENOENT, f"{self.path} is neither a v1 freezer nor a v2 "
                                            "cgroup with cgroup.freeze")

    def is_frozen(self) -> bool:
        if self.version is FreezerVersion.V1:
            return (self.path / "freezer.state").read_text().strip() == "FROZEN"
        return "frozen 1" in (self.path / "cgroup.events").read_text().splitlines()

    def is_thawed(self) -> bool:
        if self.version is FreezerVersion.V1:
            return (self.path / "freezer.state").read_text().strip() == "THAWED"
        return "frozen 0" in (self.path / "cgroup.events").read_text().splitlines()

    def _request(self, frozen: bool) -> None:
        if self.version is FreezerVersion.V1:
            _write(self.path / "freezer.state", "FROZEN" if frozen else "THAWED")
        else:
            _write(self.path / "cgroup.freeze", "1" if frozen else "0")

    def _wait(self, frozen: bool, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        interval = self.poll_interval
        check = self.is_frozen if frozen else self.is_thawed
        while not check():
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)
            interval = min(interval * 2, 0.05)
        return True

    def freeze(self, timeout: float) -> None:
        """Freeze or raise ETIMEDOUT, leaving the cgroup thawed."""
        started = time.monotonic()
        self._request(True)
        if self._wait(True, timeout):
            log.info("froze %s (%s) in %.1f ms", self.path, self.version.value,
                     (time.monotonic() - started) * 1000)
            return
        self.thaw(timeout)
        raise FreezeError(errno.ETIMEDOUT, f"{self.path} did not freeze in {timeout} s "
                                           "(a task in uninterruptible sleep?)")

    def thaw(self, timeout: float) -> None:
        self._request(False)
        if not self._wait(False, timeout):
            raise FreezeError(errno.ETIMEDOUT, f"{self.path} did not thaw in {timeout} s")
        log.info("thawed %s", self.path)


def _hierarchy_root(path: Path) -> Path:
    """The mount root of the cgroup hierarchy `path` belongs to."""
    dev = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == dev:
        path = path.parent
    return path


def _pids_below(path: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(path):
        if "cgroup.procs" in files:
            pids.update(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def evacuate(cgroup: str | Path, pids: list[int]) -> list[int]:
    """Move `pids` out of the cgroup's subtree to its hierarchy's root.

    The manager and the SPFS daemon must never be frozen with the container: the manager
    would stop itself, and a frozen SPFS daemon leaves every FUSE request (the manager's own
    /proc lookups included) hanging.  CRIU may restore tasks, and start us, inside the
    container's cgroups.  Returns the pids that were moved."""
    path = Path(cgroup)
    inside = _pids_below(path) & set(pids)
    if inside:
        root = _hierarchy_root(path)
        for pid in sorted(inside):
            log.warning("pid %d is inside %s: moving it to %s", pid, path, root)
            _write(root / "cgroup.procs", str(pid))
    return sorted(inside)


class ThawGuard:
    """A worker of the fork server that thaws the cgroup if we die while it is frozen.

    Armed (after the swap committed, before the mounts moved), it first runs `finish`, the
    rest of the replace that the processes' new references need (the real mount put where
    SPFS is), in a worker of its own with a deadline, and the thaw still comes. `finish`
    travels to it by name (a module-level function or a bound method of a plain object)."""

    FINISH_TIMEOUT_S = 30.0
    START_TIMEOUT_S = 30.0

    def __init__(self, freezer: CgroupFreezer, finish: Callable[[], None] | None = None,
                 keep_fds: tuple[int, ...] = ()) -> None:
        read_end, self._write_end = os.pipe2(os.O_CLOEXEC)
        try:
            self.worker = forkserver.spawn(
                Job(_guard, (freezer, read_end, finish, keep_fds), fds=(read_end, *keep_fds),
                    name="thaw guard"), self.START_TIMEOUT_S)
        except BaseException:
            os.close(self._write_end)
            raise
        finally:
            os.close(read_end)
        self.pid = self.worker.pid

    def arm(self) -> None:
        os.write(self._write_end, b"a")

    def disarm(self) -> None:
        os.write(self._write_end, b"d")

    def dismiss(self) -> None:
        """We thawed ourselves: tell the guard so and let it end (bounded)."""
        try:
            os.write(self._write_end, b"k")
        finally:
            os.close(self._write_end)
            if not self.worker.wait(2.0):
                log.warning("thaw guard %d did not exit", self.pid)
            self.worker.close()


def _guard(freezer: CgroupFreezer, read_end: int, finish: Callable[[], None] | None,
           keep_fds: tuple[int, ...]) -> bool:
    """In the worker: thaw unless dismissed; True if dismissed."""
    if _wait_for_dismissal(read_end, finish, keep_fds):
        return True
    freezer._request(False)
    return False


def _wait_for_dismissal(read_end: int, finish: Callable[[], None] | None,
                        keep_fds: tuple[int, ...]) -> bool:
    """True once dismissed; False when the manager died (after running `finish` if armed)."""
    armed = False
    while True:
        byte = os.read(read_end, 1)
        if byte == b"k":
            return True
        if byte in (b"a", b"d"):
            armed = byte == b"a"
            continue
        if armed and finish is not None:
            try:
                # with the descriptors it needs (the real mount's): a worker has no others
                forkserver.call(Job(finish, fds=keep_fds, name="the replace's last step"),
                                ThawGuard.FINISH_TIMEOUT_S)
            except OSError:
                pass  # the thaw comes all the same
        return False


class FreezerLocks:
    """One lock per cgroup: several replaces of one container take turns on its freezer."""

    def __init__(self) -> None:
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def lock_for(self, path: str) -> threading.Lock:
        key = os.path.realpath(path)
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


@dataclass(frozen=True)
class FreezePolicy:
    lock_timeout: float = 120.0  # waiting for another replace of the same cgroup
    attempt: float = 10.0  # one freeze attempt
    deadline: float = 120.0  # all attempts: a task parked on a stub or a hung NFS server
    thaw: float = 10.0


def freeze_with_retries(freezer: CgroupFreezer, policy: FreezePolicy) -> None:
    """Tasks in uninterruptible sleep (a stub of another share not yet proxying, an NFS server
    away for a while) keep a cgroup from freezing: thaw, wait, and try again until the
    deadline."""
    deadline = time.monotonic() + policy.deadline
    delay = 0.2
    while True:
        try:
            freezer.freeze(min(policy.attempt, max(0.1, deadline - time.monotonic())))
            return
        except FreezeError as exc:
            left = deadline - time.monotonic()
            if exc.errno != errno.ETIMEDOUT or left <= 0:
                raise
            log.warning("%s; trying again in %.1f s", exc, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, 5.0)


@contextlib.contextmanager
def frozen(freezer: CgroupFreezer, lock: threading.Lock,
           policy: FreezePolicy = FreezePolicy(), finish: Callable[[], None] | None = None,
           keep_fds: tuple[int, ...] = (),
           freezing: Callable[[], None] = lambda: None) -> Iterator[ThawGuard]:
    """Hold the cgroup's lock and keep it frozen for the block; thaw on every path, also
    if we die (the guard; see ThawGuard for `finish`). *freezing* is called just before the
    freeze, once the lock is ours: the wait for another replace of the cgroup is not part of
    this one's frozen window."""
    if not lock.acquire(timeout=policy.lock_timeout):
        raise FreezeError(errno.EBUSY, f"{freezer.path} is held by another replace "
                                       f"for more than {policy.lock_timeout} s")
    try:
        guard = ThawGuard(freezer, finish, keep_fds)
        try:
            freezing()
            freeze_with_retries(freezer, policy)
            try:
                yield guard
            finally:
                thaw_hard(freezer, policy.thaw)
        finally:
            guard.dismiss()
    finally:
        lock.release()


def thaw_hard(freezer: CgroupFreezer, timeout: float) -> None:
    """Thawing is the one thing that must not be skipped: retry before giving up."""
    last: OSError | None = None
    for _ in range(3):
        try:
            freezer.thaw(timeout)
            return
        except OSError as exc:
            last = exc
            log.error("thaw of %s failed: %s; retrying", freezer.path, exc)
    assert last is not None
    raise last
