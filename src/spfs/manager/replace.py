"""The replace pipeline of one SPFS mount (issue 5, steps a-g), as an explicit state machine.

Order and rollback (docs/manager.md has the full table):

a. HELD             wait for "release" (bounded)
b. MOUNTING_TARGET  real fs mounted, detached, in the container's namespaces (retries)
c. PROXY            SPFS proxies onto the detached real mount: blocked tasks continue;
                    then what needs no frozen task: placements, the swap engine's plan
d. FROZEN/SWAPPING  cgroup frozen (one lock per cgroup), references moved by the swap engine
e. MOUNTS_MOVED     SPFS detached from the mountpoint and every bind; the real mount attached
f. THAWED           cgroup thawed; the manager drops its last reference to SPFS
g. DONE             SPFS exits once unused; the manager notices (see manager.py)

Failure before PROXY leaves SPFS as it was (FAILED).  Failure after it leaves SPFS in place and
proxying onto the real mount, the container thawed (ROLLED_BACK).  The freezer context thaws
on every path, and a guard process thaws if the manager itself dies.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from spfs.manager.freezer import (CgroupFreezer, FreezePolicy, FreezerLocks, evacuate,
                                  freeze_with_retries, frozen, thaw_hard)
from spfs.manager.interfaces import (MountMover, RealFsMounter, ReferenceSwapper, SpfsHandle,
                                     SwapJob, TasksMustRun)
from spfs.manager.mounts import Placement, with_mountpoint_flags
from spfs.sys.nsexec import Namespaces, run_in_namespaces
from spfs.manager.phases import ALLOWED_TRANSITIONS
from spfs.manager.phases import ReplacePhase as P
from spfs.manager.phases import ReplaceProgress
from spfs.manager.protocol import SpfsMode
from spfs.manager.realmount import RealFs
from spfs.sys import forkserver
from spfs.sys.beneath import Share

log = logging.getLogger(__name__)

# A listener's queued connections at the stop: how often to thaw for the tasks to accept
# them, and for how long (times the attempt) before freezing and planning again.
LISTENER_RETRIES = 3
LISTENER_RUN_S = 0.05


@dataclass(frozen=True)
class ReplaceTimeouts:
    hold: float = 900.0
    freeze: FreezePolicy = FreezePolicy()
    move: float = 30.0
    settle: float = 10.0  # after the thaw, for the swapped tasks to let go of SPFS


@dataclass
class ReplaceJob:
    """One replace of one SPFS mount, with what it needs and what it has produced."""

    mount_id: str
    spfs: SpfsHandle
    target: Namespaces | None
    mountpoint: str  # as the container sees it
    bindmounts: tuple[str, ...]
    freeze_cgroup: str
    real_fs: RealFs
    progress: ReplaceProgress
    released: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)
    real_fd: int | None = None  # the detached real mount, kept while SPFS may proxy onto it
    spfs_mode_after: SpfsMode | None = None
    path_map: tuple[tuple[str, str], ...] = ()  # unlinked on SPFS -> name on the real fs
    remove_after: tuple[str, ...] = ()  # names to delete on the real fs once replaced

    @property
    def paths(self) -> list[str]:
        return [self.mountpoint, *[b for b in self.bindmounts if b != self.mountpoint]]


@dataclass
class _FreezePlan:
    placements: list[Placement]
    swap_job: SwapJob
    freezer: CgroupFreezer
    prepared: Any  # the swap engine's prepared plan


class PhaseFailure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _device_of(path: str) -> int:
    return os.stat(path).st_dev


def _stat_dev(target: Namespaces | None, path: str, timeout: float) -> int:
    return int(run_in_namespaces(target, _device_of, timeout, args=(path,)).value)


class ReplacePipeline:
    def __init__(self, mounter: RealFsMounter, mover: MountMover, swapper: ReferenceSwapper,
                 locks: FreezerLocks, timeouts: ReplaceTimeouts = ReplaceTimeouts()) -> None:
        self.mounter = mounter
        self.mover = mover
        self.swapper = swapper
        self.locks = locks
        self.timeouts = timeouts

    def run(self, job: ReplaceJob) -> None:
        """Run to a terminal phase; never raises, the outcome is in `job.progress`."""
        try:
            self._run(job)
        except Exception as exc:  # a bug must still end the replace, visibly
            log.exception("replace %s: internal error", job.mount_id)
            progress = job.progress
            progress.fail(progress.phase, errno.EIO, f"internal error: {exc!r}")
            # SPFS already proxying onto the real mount: that is a rollback, not a failure
            ends = (P.ROLLED_BACK, P.FAILED) if job.spfs_mode_after else (P.FAILED, P.ROLLED_BACK)
            for end in (*ends, P.DONE):
                if end in ALLOWED_TRANSITIONS[progress.phase]:
                    progress.advance(end)
                    break

    def _run(self, job: ReplaceJob) -> None:
        try:
            self._wait_release(job)
            self._mount_target(job)
            self._switch_to_proxy(job)
        except PhaseFailure as exc:
            self._give_up(job, exc, rolled_back=False)
            return
        try:
            self._freeze_swap_move(job, self._prepare_freeze(job))
        except PhaseFailure as exc:
            self._give_up(job, exc, rolled_back=True)
            return
        self._remove_leftovers(job)
        job.progress.advance(P.DONE)

    @staticmethod
    def _remove_leftovers(job: ReplaceJob) -> None:
        """CRIU's link_remap.N files kept silly-renamed files alive across the migration;
        now the processes hold the real files open, the names go (the NFS client turns each
        into a silly rename of its own).  A failure here costs a stray file, not the replace."""
        removed, problems = [], []
        try:
            real = Share.open(ReplacePipeline._real_root(job), "real fs")
        except OSError as exc:
            real, problems = None, [f"the real fs root: {exc}"]
        for name in job.remove_after if real is not None else ():
            try:
                # below the real root only, no symlink on the way, and only a file's own
                # name (a link_remap is a hard link, or a symlink itself) is removed
                if real.unlink(name, kinds=(stat.S_IFREG, stat.S_IFLNK)):
                    removed.append(name)
            except OSError as exc:
                problems.append(f"{name}: {exc.strerror or exc}")
        if real is not None:
            real.close()
        if removed:
            job.progress.details["removed"] = removed
            log.info("replace %s: removed %s from the real fs", job.mount_id, ", ".join(removed))
        if problems:
            job.progress.details["remove_errors"] = problems
            log.warning("replace %s: could not remove %s", job.mount_id, "; ".join(problems))

    # -- a
    def _wait_release(self, job: ReplaceJob) -> None:
        started = time.monotonic()
        deadline = started + self.timeouts.hold
        next_report = started + 30
        while not job.released.wait(timeout=0.5):
            if time.monotonic() > next_report:
                log.info("replace %s: still held after %.0f s", job.mount_id,
                         time.monotonic() - started)
                next_report += 30
            if job.cancelled.is_set():
                raise PhaseFailure(errno.ECANCELED, "replace cancelled while held")
            if job.spfs.exited():
                raise PhaseFailure(errno.ESRCH, "SPFS exited while the replace was held")
            if time.monotonic() > deadline:
                raise PhaseFailure(errno.ETIMEDOUT, f"not released in {self.timeouts.hold} s")
        job.progress.advance(P.MOUNTING_TARGET)

    # -- b
    def _mount_target(self, job: ReplaceJob) -> None:
        try:
            job.real_fd = self.mounter.mount(job.real_fs, job.target, job.mountpoint)
        except OSError as exc:
            raise PhaseFailure(exc.errno or errno.EIO, str(exc)) from None
        job.progress.advance(P.PROXY)

    # -- c
    def _switch_to_proxy(self, job: ReplaceJob) -> None:
        assert job.real_fd is not None
        try:
            job.spfs.set_mode(SpfsMode.PROXY, proxy_dir=self._real_root(job))
        except OSError as exc:
            try:  # best effort: a half-done switch must not leave SPFS on a mount we drop
                job.spfs.set_mode(SpfsMode.STUB)
            except OSError as again:
                job.progress.rollback_errors.append(f"back to stub: {again}")
            raise PhaseFailure(exc.errno or errno.EIO, f"switch to proxy: {exc}") from None
        job.spfs_mode_after = SpfsMode.PROXY

    @staticmethod
    def _real_root(job: ReplaceJob) -> str:
        # the detached mount is reachable only through our fd
        return f"/proc/{os.getpid()}/fd/{job.real_fd}"

    # -- end of c: everything that needs no frozen task, so the freeze stays short
    def _prepare_freeze(self, job: ReplaceJob) -> _FreezePlan:
        assert job.real_fd is not None
        try:
            spfs_dev = _stat_dev(job.target, job.mountpoint, self.timeouts.move)
            known = getattr(job.spfs, "dev", None)
            if known and spfs_dev != known:
                raise OSError(errno.ESTALE, f"{job.mountpoint} in the container is no longer this "
                                            f"SPFS (device {spfs_dev:#x}, SPFS is {known:#x})")
            paths = self._all_paths(job, spfs_dev)
            placements = with_mountpoint_flags(self.mover.describe(job.target, paths),
                                               job.real_fs.flags)
            swap_job = SwapJob(job.freeze_cgroup, job.target, tuple(paths), spfs_dev,
                               self._real_root(job), job.path_map)
            freezer = CgroupFreezer(job.freeze_cgroup)
            # the fork server too: the thaw guard and the swap's helpers are its workers
            ours = [os.getpid(), forkserver.server_pid(), job.spfs.pid]
            moved = evacuate(job.freeze_cgroup, [pid for pid in ours if pid])
            if moved:
                job.progress.details["moved_out_of_cgroup"] = moved
            prepared = self.swapper.prepare(swap_job)
        except OSError as exc:
            raise PhaseFailure(exc.errno or errno.EIO, f"preparing the freeze: {exc}") from None
        return _FreezePlan(placements, swap_job, freezer, prepared)

    def _all_paths(self, job: ReplaceJob, spfs_dev: int) -> list[str]:
        """The mountpoint, the binds the request named, and any other mount of the same SPFS
        in the container (a bind nobody listed would otherwise keep SPFS alive)."""
        paths = job.paths
        found = [p for p in self.mover.mounts_of(job.target, spfs_dev) if p not in paths]
        if found:
            log.info("replace %s: also replacing unlisted mounts of SPFS at %s", job.mount_id,
                     ", ".join(found))
        paths = [*paths, *found]
        job.progress.details["paths"] = paths
        return paths

    # -- d, e, f
    def _freeze_swap_move(self, job: ReplaceJob, plan: _FreezePlan) -> None:
        assert job.real_fd is not None
        lock = self.locks.lock_for(job.freeze_cgroup)
        phase = P.PROXY  # until the lock is ours and the freeze starts
        prepared = plan.prepared
        swapped = False
        try:
            # Swapped but not moved, the processes would hold NFS under a mountpoint that
            # is still SPFS, whose locks are its own: if we die there, the guard moves.
            move = functools.partial(self.mover.move, job.real_fd, plan.placements, job.target)
            def freezing() -> None:
                nonlocal phase
                phase = P.FROZEN
                job.progress.advance(P.FROZEN)

            with frozen(plan.freezer, lock, self.timeouts.freeze, finish=move,
                        keep_fds=(job.real_fd,), freezing=freezing) as guard:
                phase = P.SWAPPING
                job.progress.advance(P.SWAPPING)
                prepared = None  # swap() owns the prepared plan from here, even on failure
                job.progress.details["swap"] = self._swap_letting_tasks_run(job, plan)
                swapped = True
                guard.arm()
                phase = P.MOUNTS_MOVED
                job.progress.advance(P.MOUNTS_MOVED)
                move()
                guard.disarm()
                phase = P.THAWED
                job.progress.advance(P.THAWED)
        except OSError as exc:
            raise PhaseFailure(exc.errno or errno.EIO, f"{phase.value}: {exc}") from None
        finally:
            if prepared is not None:
                self.swapper.abandon(prepared)
            if swapped:  # thawed by now, on every path
                self._settle(job, plan.swap_job)

    def _swap_letting_tasks_run(self, job: ReplaceJob, plan: _FreezePlan) -> dict[str, Any]:
        """The swap, inside the freeze. When it needs the tasks to run first (a listener's
        queued connections: they must be accepted, no kernel interface moves them), thaw
        for a moment, freeze again and plan anew: at most LISTENER_RETRIES times."""
        prepared = plan.prepared
        for attempt in range(1, LISTENER_RETRIES + 1):
            try:
                return self.swapper.swap(plan.swap_job, prepared)
            except TasksMustRun as exc:
                run_for = LISTENER_RUN_S * attempt
                log.info("replace %s: %s; thawing for %.0f ms (attempt %d of %d)", job.progress.mount_id,
                         exc, run_for * 1000, attempt, LISTENER_RETRIES)
                job.progress.details["thawed_for_listeners"] = attempt
                prepared = None  # swap() gave it up; the next one plans inside the freeze
                thaw_hard(plan.freezer, self.timeouts.freeze.thaw)
                time.sleep(run_for)  # the tasks run: their accept() empties the queue
                freeze_with_retries(plan.freezer, self.timeouts.freeze)
        return self.swapper.swap(plan.swap_job, None)

    def _settle(self, job: ReplaceJob, swap_job: SwapJob) -> None:
        """The swapped tasks finish their switch once thawed: a replace that leaves some of
        them holding SPFS says so on its status instead of a plain success."""
        swap = job.progress.details.get("swap") or {}
        if swap.get("error"):
            job.progress.warn(f"swap committed, but: {swap['error']}")
        try:
            left = self.swapper.settle(swap_job, self.timeouts.settle)
        except OSError as exc:
            job.progress.warn(f"could not wait for the swapped tasks: {exc}")
            return
        if left.get("pending_tasks"):
            job.progress.details["pending_tasks"] = left["pending_tasks"]
            job.progress.details["pending_pids"] = left.get("pending_pids", [])
            job.progress.warn(f"{left['pending_tasks']} processes "
                              f"({', '.join(map(str, left.get('pending_pids', []))) or 'not found'}) "
                              f"had not finished their switch {self.timeouts.settle} s after the "
                              "thaw: they still hold SPFS")

    def _give_up(self, job: ReplaceJob, exc: PhaseFailure, rolled_back: bool) -> None:
        progress = job.progress
        progress.fail(progress.phase, exc.code, str(exc))
        if progress.phase is P.THAWED:
            # thawed and moved: only the final bookkeeping failed, the replace stands
            progress.advance(P.DONE)
            return
        if not rolled_back and job.real_fd is not None and job.spfs_mode_after is None:
            os.close(job.real_fd)  # nothing proxies onto it: let it go
            job.real_fd = None
        progress.advance(P.ROLLED_BACK if rolled_back else P.FAILED)
