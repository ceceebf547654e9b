"""The swap engine (spfs.swap) behind the manager's ReferenceSwapper interface.

The engine is imported on first use, not at the manager's start (see import_swap_engine).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from spfs.manager.interfaces import SwapJob, TasksMustRun
from spfs.sys.beneath import open_in_root

log = logging.getLogger(__name__)



def _engine() -> ModuleType:
    from spfs.swap import api  # 0.1-0.2 s, seconds in an emulated guest: see import_swap_engine
    return api


PREPARE_ATTEMPTS = 3
# a Python process start; seconds on a loaded machine
WATCHDOG_START_TIMEOUT = 30.0


def _wait_for_watchdog(plan: Any, timeout: float) -> None:
    """The engine's freezer watchdog is a process started by prepare(); commit() waits for it
    to run (~0.3 s of Python start-up).  Waiting here keeps that out of the frozen window.
    (Reaches into the prepared plan: spfs.swap.api has no call for it yet.)"""
    watchdog = getattr(getattr(plan, "prepared", None), "watchdog", None)
    if watchdog is not None and hasattr(watchdog, "wait_ready"):
        watchdog.wait_ready(timeout)


def _coverage(plan: Any) -> set[tuple[str, int, object]]:
    """Which references a plan knows about."""
    known: set[tuple[str, int, object]] = set()
    for p in plan.processes:
        known |= {("fd", p.pid, r.fd) for r in p.fds}
        known |= {("dir", p.pid, d.kind) for d in p.dirs}
        known |= {("map", p.pid, m.vma.start) for m in p.maps}
        if p.exe:
            known.add(("exe", p.pid, p.exe.rel))
    known |= {("unmovable", u.pid, u.what) for u in plan.unmovable}
    return known


def _pids(plan: Any) -> set[int]:
    return {p.pid for p in plan.processes}


def import_swap_engine() -> None:
    """Import the engine ahead of the first replace (0.1-0.2 s here, seconds in an emulated
    guest): not while a container is frozen. Run in a thread at the manager's start."""
    _engine()


def must_run_first(report: Any) -> bool:
    return not report.ok and isinstance(report.failure, _engine().ListenerBusy)


def should_plan_again(report: Any) -> bool:
    """A failed commit worth one more try with a fresh plan: the engine found that the tasks
    changed since discovery (its SwapChanged; nothing was moved), decided on the type."""
    return not report.ok and isinstance(report.failure, _engine().SwapChanged)


@contextlib.contextmanager
def container_path(target_pid: int | None, path: str, expect_dev: int | None = None) -> Iterator[str]:
    """A path of the container as the manager can use it: held by a descriptor opened with
    the container's root as '/' (a symlink the container planted on the way resolves in
    its own tree, never in ours), and named by that descriptor's magic link for as long as
    the block runs. `expect_dev`: the device the object must be on (SPFS's)."""
    if target_pid is None:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    else:
        fd = open_in_root(target_pid, path)
    try:
        if expect_dev is not None and os.fstat(fd).st_dev != expect_dev:
            raise OSError(errno.ESTALE, f"{path} in the container is no longer SPFS "
                                        f"(device {os.fstat(fd).st_dev:#x}, not {expect_dev:#x})")
        yield f"/proc/{os.getpid()}/fd/{fd}"
    finally:
        os.close(fd)


def _spfs_root(job: SwapJob) -> contextlib.AbstractContextManager[str]:
    return container_path(job.target.pid if job.target else None, job.spfs_paths[0], job.spfs_dev)


class SwapEngineAdapter:
    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout
        # committed plans whose tasks finish once thawed, until settle(): by id of the job
        self._unsettled: dict[int, tuple[SwapJob, Any]] = {}
        self._lock = threading.Lock()

    def prepare(self, job: SwapJob, attempts: int = PREPARE_ATTEMPTS) -> Any:
        """The plan, made while the tasks run.  A task may close an fd between discovery
        and prepare (short-lived files on the mount): then look again, and if the tasks keep
        changing, leave it to swap(), inside the freeze, where nothing moves (None)."""
        engine = _engine()
        for attempt in range(1, attempts + 1):
            try:
                with _spfs_root(job) as source:
                    return self._prepare_plan(engine, engine.discover(
                        source, job.real_root, cgroup=job.cgroup, path_map=dict(job.path_map)))
            except OSError as exc:
                if exc.errno == errno.ESTALE:
                    raise  # the mountpoint itself changed: looking again will not help
                log.info("preparing the swap, attempt %d: %s", attempt, exc)
        log.warning("the tasks keep changing their references: the swap is planned inside "
                    "the freeze")
        return None

    def _prepare_plan(self, engine: ModuleType, plan: Any, reuse: Any = None) -> Any:
        plan.target_replaces_source = True  # the real mount goes where SPFS is
        try:
            engine.prepare(plan, reuse=reuse)
            _wait_for_watchdog(plan, WATCHDOG_START_TIMEOUT)
        except RuntimeError as exc:  # the engine's SwapError and FreezerError
            engine.abandon(plan)
            raise OSError(errno.EIO, f"swap engine: {exc}") from None
        if plan.unmovable:
            # they stay on SPFS, which keeps proxying them (the C manager's safety net too)
            log.warning("%d references cannot be moved: %s", len(plan.unmovable),
                        plan.unmovable[:5])
        return plan

    def swap(self, job: SwapJob, prepared: Any) -> dict[str, Any]:
        """Commit in the frozen cgroup; `prepared` belongs to this call from now on.

        The plan was made while the tasks ran: if a fresh look (cheap: /proc only) finds
        references it does not cover, or the engine finds the tasks changed, the plan is made
        again now, inside the freeze."""
        engine = _engine()
        try:
            try:
                with _spfs_root(job) as source:
                    now = engine.discover(source, job.real_root, cgroup=job.cgroup,
                                          path_map=dict(job.path_map))
                    if prepared is None:
                        prepared = self._prepare_plan(engine, now)
                    elif not _coverage(now) <= _coverage(prepared) or _pids(prepared) - _pids(now):
                        log.info("references appeared or processes left since the swap was "
                                 "prepared: preparing again")
                        earlier, prepared = prepared, None
                        try:  # its watchdog goes on serving: no Python start while frozen
                            prepared = self._prepare_plan(engine, now, reuse=earlier)
                        finally:
                            engine.abandon(earlier)
            except BaseException:
                if prepared is not None:
                    engine.abandon(prepared)
                raise
            report, plan = self._commit(engine, prepared)
            if should_plan_again(report):
                log.info("tasks changed since the swap was prepared (%s): preparing again",
                         report.error)
                report, plan = self._commit(engine, self.prepare(job))
        except RuntimeError as exc:  # the engine's SwapError and FreezerError
            raise OSError(errno.EIO, f"swap engine: {exc}") from None
        if not report.committed and must_run_first(report):
            raise TasksMustRun(errno.EAGAIN, f"swap engine: {report.error}")
        if not report.committed:
            raise OSError(errno.EIO, f"swap engine: {report.error}")
        if not report.ok:
            # Past the commit point the tasks are on the real fs whatever else went wrong (a
            # re-freeze): the mounts must follow, so this is reported, not rolled back.
            log.error("swap committed, but: %s", report.error)
        if report.pending_tasks:
            # the cgroup is ours and frozen: they finish once thawed (settle() waits then)
            with self._lock:
                self._unsettled[id(job)] = (job, plan)
        # where a frozen window goes, for the log (ms; "before_stop": tables and checks)
        log.info("swap done: %d processes, stop window %.0f ms, %s", report.processes,
                 report.stop_window_s * 1e3,
                 ", ".join(f"{k} {v * 1e3:.0f}" for k, v in sorted(report.timings.items())))
        return report.as_dict()

    def _commit(self, engine: ModuleType, plan: Any) -> tuple[Any, Any]:
        """Commit (that closes the plan); the plan goes on to settle() if tasks are pending."""
        report = engine.commit(plan, freeze=True, timeout=self.timeout)
        if not report.committed:
            engine.abandon(plan)  # nothing to settle
        return report, plan

    def settle(self, job: SwapJob, timeout: float) -> dict[str, Any]:
        """After the thaw: wait (bounded) for the tasks the swap let go inside their tables
        to finish them.  What is still pending after `timeout` (they keep SPFS referenced)."""
        with self._lock:
            _, plan = self._unsettled.pop(id(job), (None, None))
        if plan is None:
            return {"pending_tasks": 0, "pending_pids": []}
        missing, pids = _engine().settle(plan, timeout)
        return {"pending_tasks": missing, "pending_pids": pids}

    def abandon(self, prepared: Any) -> None:
        if prepared is not None:
            _engine().abandon(prepared)

    def switch(self, source: str | None, device: int | None, target: str, cgroup: str,
               ns_pid: int | None) -> dict[str, Any]:
        engine = _engine()
        if source is None:
            raise OSError(errno.ENOTSUP, "switch by device= is not supported by the swap "
                                         "engine: give source=")
        with container_path(ns_pid, source) as source_path, \
                container_path(ns_pid, target) as target_path:
            report = engine.switch(source_path, target_path, cgroup=cgroup, freeze=True,
                                   timeout=self.timeout)
        if not report.ok:
            raise OSError(errno.EIO, f"swap engine: {report.error}")
        return report.as_dict()
