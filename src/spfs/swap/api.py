"""Python API of the swap engine: discover -> prepare -> commit (see docs/swap.md)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from spfs.swap.arch import require_x86_64
from spfs.swap.discover import discover as _discover
from spfs.swap.engine import Engine, FailPoint, Unsettled
from spfs.swap.model import (FreezerLeft, ListenerBusy, Phase, RefreezeFailed, SwapChanged, SwapError, SwapPlan, SwapReport,
                             TasksPending, ThawFailed)
from spfs.swap.prepare import Prepared
from spfs.swap.prepare import prepare as _prepare

log = logging.getLogger(__name__)

# the errors a caller may decide on by type
__all__ = ["FreezerLeft", "ListenerBusy", "RefreezeFailed", "SwapChanged", "SwapError", "TasksPending", "ThawFailed",
           "abandon", "commit", "discover", "prepare", "report", "settle", "switch"]


def discover(source: str, target: str, *, cgroup: str | None = None, pids: list[int] | None = None,
             path_map: dict[str, str] | None = None) -> SwapPlan:
    """Find every task and reference on `source`; stops nothing."""
    require_x86_64()
    return _discover(source, target, cgroup=cgroup, pids=pids, path_map=path_map)


def prepare(plan: SwapPlan, reuse: SwapPlan | None = None) -> None:
    """Open everything on the target; stops nothing.  Raises SwapError.  `reuse`: an earlier
    plan of the same cgroup, prepared and not committed, whose watchdog this plan may take
    over (abandon it afterwards as usual)."""
    earlier = reuse.prepared if reuse is not None and isinstance(reuse.prepared, Prepared) else None
    plan.prepared = _prepare(plan, earlier)


def abandon(plan: SwapPlan) -> None:
    """Drop a prepared plan without committing it (or a committed one without settle())."""
    if isinstance(plan.prepared, Prepared):
        plan.prepared.close()
    if isinstance(plan.unsettled, Unsettled):
        plan.unsettled.close()
        plan.unsettled = None
    if plan.phase in (Phase.DISCOVERED, Phase.PREPARED):
        plan.advance(Phase.RELEASED)


def commit(plan: SwapPlan, *, freeze: bool = True, timeout: float = 5.0, fail: FailPoint | None = None,
           pin: bool = True, on_stopped: Callable[[], None] | None = None) -> SwapReport:
    """Stop, swap, resume.  On any failure every touched process is reverted to the source
    and the report says why (ok=False); tasks are always left running (or frozen, if the
    caller had frozen the cgroup).  `on_stopped` runs once every task is stopped (e.g. to
    sync data from A to B in tests); an exception from it aborts the switch."""
    if not isinstance(plan.prepared, Prepared):
        raise SwapError("commit needs prepare(plan) first")
    engine = Engine(plan, plan.prepared, freeze=freeze, timeout=timeout, fail=fail, pin=pin, on_stopped=on_stopped)
    failure: SwapError | None = None
    try:
        engine.run()
    except SwapError as exc:
        failure = exc
        log.error("switch failed: %s", exc)
    finally:
        plan.prepared.committed = engine.committed
        if engine.pending and engine.caller_froze:
            # they finish once the caller thaws the cgroup: keep the done counter for settle()
            plan.unsettled = Unsettled(os.dup(plan.prepared.done), list(engine.pending))
        plan.prepared.close()  # releases A's descriptions (and flock/OFD locks on A)
    return report(plan, engine, failure)


def settle(plan: SwapPlan, timeout: float) -> tuple[int, list[int]]:
    """After a commit into a cgroup the caller keeps frozen (report.pending_tasks), once the
    caller has thawed it: wait, bounded, for the tasks to finish their tables and let go of
    the source.  Returns how many have not, and the pids of those still inside their table
    ((0, []) when nothing was pending).  Releases what commit kept for this."""
    if not isinstance(plan.unsettled, Unsettled):
        return 0, []
    try:
        missing, pids = plan.unsettled.wait(timeout)
    finally:
        plan.unsettled.close()
        plan.unsettled = None
    if missing:
        log.error("%d processes had not finished their switch %s s after the thaw and still hold references "
                  "to the source (in their table: %s)", missing, timeout, pids)
    return missing, pids


def report(plan: SwapPlan, engine: Engine | None = None, error: str | SwapError | None = None) -> SwapReport:
    """`error`: why it failed (an exception from the engine keeps its type in `failure`)."""
    failure = error if isinstance(error, SwapError) else None
    if failure is not None:
        error = str(failure)
        # a problem after the switch itself (e.g. a thaw) is reported even when the switch failed too
        also = [str(p) for p in (engine.problems if engine else []) if p is not failure]
        if also:
            error = "; ".join([error, *(f"also: {a}" for a in also)])
    work = [p for p in plan.processes if p.has_work]
    w = engine.window if engine else None
    timings = {}
    if w and w.first_stop and w.released:
        timings = {name: t - w.first_stop for name, t in w.marks.items()}
        timings.update(all_stopped=w.all_stopped - w.first_stop if w.all_stopped else 0.0,
                       injected=w.injected - w.first_stop if w.injected else 0.0,
                       before_stop=w.first_stop - w.started if w.started else 0.0)
    ok = error is None and plan.phase in (Phase.RELEASED, Phase.COMMITTED)
    # what moved: everything once committed, whatever went wrong after that point
    moved = engine.committed if engine is not None else ok
    return SwapReport(
        ok=ok,
        phase=plan.phase.value,
        processes=len(work),
        threads=sum(len(p.tids) for p in work),
        fds_moved=sum(len(p.fds) for p in work if p.fd_table_of is None) if moved else 0,
        descriptions_moved=len(plan.descriptions) if moved else 0,
        dirs_moved=sum(len([d for d in p.dirs if d.kind in ("cwd", "root")]) for p in work if p.fs_of is None) if moved else 0,
        epoll_readded=sum(len(p.epoll) for p in work if p.fd_table_of is None) if moved else 0,
        unmovable=[{"pid": u.pid, "what": u.what, "reason": u.reason} for u in plan.unmovable],
        mappings_moved=sum(len(p.maps) for p in work if p.mm_of is None) if moved else 0,
        exe_moved=sum(1 for p in work if p.exe and p.mm_of is None) if moved else 0,
        watches_moved=sum(len(p.inotify) for p in work) if moved else 0,
        error=error,
        stop_window_s=(w.released - w.first_stop) if (w and w.released and w.first_stop) else 0.0,
        timings=timings,
        pending_tasks=engine.pending_count if engine else 0,
        committed=moved,
        pending_pids=[t.tgid for t in engine.pending] if engine else [],
        error_kind=type(failure).__name__ if failure is not None else None,
        failure=failure,
    )


def switch(source: str, target: str, *, cgroup: str | None = None, pids: list[int] | None = None,
           path_map: dict[str, str] | None = None, freeze: bool = True, timeout: float = 5.0,
           allow_unmovable: bool = False) -> SwapReport:
    """discover + prepare + commit.  Refuses (nothing stopped) when something can't be moved,
    unless allow_unmovable."""
    plan = discover(source, target, cgroup=cgroup, pids=pids, path_map=path_map)
    if plan.unmovable and not allow_unmovable:
        plan.advance(Phase.RELEASED)
        return report(plan, None, f"{len(plan.unmovable)} references cannot be moved; nothing was stopped")
    try:
        prepare(plan)
    except SwapError as exc:
        return report(plan, None, exc)
    done = commit(plan, freeze=freeze, timeout=timeout)
    abandon(plan)  # into a cgroup frozen before: report.pending_tasks says what the thaw finishes
    return done
