"""The stop window: freeze -> seize+interrupt every thread -> thaw -> wait for the stops ->
re-validate -> inject per process (each parks) -> the decision -> restore -> detach.

Nothing in here may leave a task stopped, frozen or with altered registers: release()
runs in a finally block and does best-effort work per task, and the injected code
restores a task by itself if this process dies (see remote.py).  Which side a task ends
on is decided by one write into the decision pipe (tables.py): before it, a killed
manager leaves every task on A; after it, on B."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spfs.swap import handover, procfs, ptrace, tables
from spfs.swap.arch import check_task_regs, without_spurious_eintr
from spfs.swap.cgroup import Freezer, FreezerError, Watchdog, pin_to_cpu, restore_affinity
from spfs.swap.discover import cgroup_pids, cgroup_tids, late_relative_path
from spfs.swap.model import (Description, FdRef, Phase, ProcessPlan, RefreezeFailed, SwapChanged,
                             SwapError, SwapPlan, TasksPending, ThawFailed)
from spfs.swap.prepare import Prepared, open_on_target, read_counter
from spfs.sys.beneath import ShareChanged, magic_path
from spfs.swap.remote import REGION, Injector, Tracee, choose_marker_signal
from spfs.sys import pidfd

log = logging.getLogger(__name__)

SEIZE_OPTIONS = ptrace.PTRACE_O_TRACECLONE | ptrace.PTRACE_O_TRACEFORK | ptrace.PTRACE_O_TRACEVFORK
PTRACE_GETEVENTMSG = 0x4201

# Set from a signal handler (CLI) to ask a running switch to revert and stop.
abort_requested = threading.Event()


@dataclass
class FailPoint:
    """Test hook: make the switch fail inside the table of the n-th injected process."""

    unit: int
    entry: int = 0


class UnitFailed(SwapError):
    pass


@dataclass
class InTable:
    """A task let go while parked inside its table (it runs the rest on its own)."""

    tgid: int
    tid: int  # the thread that runs the table
    region: tuple[int, int]  # where the injected code is: [start, end)

    def inside(self) -> bool:
        """Still in its table, as far as /proc tells: its program counter is in the injected
        code.  A task that is gone is not; one that is running right now ("running": no pc
        to read) counts as inside, the safe side for a report of what still holds A."""
        try:
            words = open(f"/proc/{self.tgid}/task/{self.tid}/syscall").read().split()
        except OSError:  # gone (ENOENT, ESRCH): holds nothing any more
            return False
        if not words or words[0] == "running":
            return True
        return self.region[0] <= int(words[-1], 16) < self.region[1]


@dataclass
class Unsettled:
    """Tasks committed into a cgroup the caller keeps frozen: they finish their tables (and
    let go of A) only once thawed.  `done` is our own copy of the done counter."""

    done: int
    tasks: list[InTable]
    got: int = 0  # done bytes read so far

    def wait(self, timeout: float) -> tuple[int, list[int]]:
        """Wait (bounded) for their done bytes: how many have not finished, and the pids of
        those found still inside their table (the counter says how many, /proc names them)."""
        self.got += read_counter(self.done, len(self.tasks) - self.got, timeout)
        missing = len(self.tasks) - self.got
        return missing, ([t.tgid for t in self.tasks if t.inside()] if missing else [])

    def close(self) -> None:
        if self.done >= 0:
            os.close(self.done)
            self.done = -1




@dataclass
class Window:
    """Timestamps of the stop window (time.perf_counter)."""

    started: float = 0.0  # commit began (tables are built before the first stop)
    first_stop: float = 0.0
    all_stopped: float = 0.0
    injected: float = 0.0
    released: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)


class Engine:
    def __init__(self, plan: SwapPlan, prepared: Prepared, *, freeze: bool = True, timeout: float = 5.0,
                 fail: FailPoint | None = None, pin: bool = True, on_stopped: Callable[[], None] | None = None):
        self.plan = plan
        self.prepared = prepared
        self.timeout = timeout
        self.fail = fail
        self.pin = pin
        self.on_stopped = on_stopped
        self.freezer = Freezer(plan.cgroup) if (plan.cgroup and freeze) else None
        self.stop_set = [p for p in plan.processes if p.has_work or p.fd_table_of or p.fs_of or p.mm_of]
        self.units = [p for p in self.stop_set if self._does_fds(p) or self._does_dirs(p) or self._does_maps(p)]
        self.tracees: dict[int, Tracee] = {}
        self.injectors: dict[int, Injector] = {}
        self.pipes = tables.Pipes(prepared.decision_read, prepared.done)
        self.vdso_of = {p.pid: p.vdso for p in self.stop_set}
        self.window = Window()
        self.we_froze = False
        self.caller_froze = False
        self.prebuilt: dict[int, tuple[tables.SyscallTable, tuple]] = {}
        self.scratch: dict[int, int] = {}  # per process: free address for saving private pages
        self.committed = False  # the decision was written: every task ends on B
        # tasks let go inside their table that had not finished when we returned
        self.pending: list[InTable] = []
        self.pending_count = 0
        # what went wrong after the switch itself (freezer state, pending tasks): raised
        # by run() unless it already raises for something else (then only logged)
        self.problems: list[SwapError] = []

    @staticmethod
    def _does_fds(p: ProcessPlan) -> bool:
        return bool(p.fds or p.epoll) and p.fd_table_of is None

    @staticmethod
    def _does_maps(p: ProcessPlan) -> bool:
        return bool(p.maps or p.exe) and p.mm_of is None

    @staticmethod
    def _does_dirs(p: ProcessPlan) -> bool:
        return bool(p.dirs) and p.fs_of is None

    # -- the whole transaction -------------------------------------------------------
    def run(self) -> None:
        if self.plan.phase is not Phase.PREPARED:
            raise SwapError(f"commit needs a prepared plan (phase is {self.plan.phase.value})")
        self.window.started = time.perf_counter()
        if not self.stop_set:
            self.plan.advance(Phase.STOPPED)
            self.plan.advance(Phase.COMMITTED)
            self.committed = True
            return
        self._prebuild_tables()
        watchdog = self.prepared.watchdog
        if watchdog is not None and not watchdog.wait_ready(self.timeout + 10):
            # It acts on what it reads whenever it gets there: only its start-up CPU time
            # would now compete with the window (a slow machine, e.g. an emulated guest).
            log.warning("the swap watchdog is still starting; going on")
        affinity = self._pin() if self.pin else {}
        try:
            self._stop_all(watchdog)
            self.plan.advance(Phase.STOPPED)
            if self.on_stopped is not None:
                self.on_stopped()
            self._revalidate()
            self._move_manager_side_state()
            self._inject_all()
            self._commit_point()
            self.committed = True
            self.plan.advance(Phase.COMMITTED)
        except BaseException as exc:
            if self.plan.phase is Phase.STOPPED:
                self._rollback()
                self.plan.advance(Phase.ROLLED_BACK)
            elif self.plan.phase is not Phase.FAILED:
                self.plan.advance(Phase.FAILED)
            if isinstance(exc, SwapError):
                raise
            if isinstance(exc, (OSError, TimeoutError, RuntimeError)):
                raise SwapError(f"switch failed, everything left on the source: {exc}") from exc
            raise
        finally:
            self._release(watchdog)
            restore_affinity(affinity)
        if self.problems:
            # each was logged where it happened; the first is the one the caller acts on
            raise self.problems[0]

    def _prebuild_tables(self) -> None:
        """Build and lay out each table before the stop; rebuilt in the window only if the
        re-validation changed what it must do (late fds, locks, private pages)."""
        self._assign_lock_takers()
        for p in self.units:
            table = self._build_table(p, None)
            table.compile()
            self.prebuilt[p.pid] = (table, self._table_signature(p))

    def _assign_lock_takers(self) -> None:
        handover.assign_lock_takers(self.plan, [p for p in self.units if self._does_fds(p)])

    def _build_table(self, p: ProcessPlan, fail_after: int | None) -> tables.SyscallTable:
        return tables.build(p, self.prepared.donor_pid(p.pid), self.pipes, do_fds=self._does_fds(p),
                            do_dirs=self._does_dirs(p), do_maps=self._does_maps(p),
                            scratch=self.scratch.get(p.pid, 0), scratch_size=_scratch_size(p),
                            fail_after=fail_after)

    def _table_signature(self, p: ProcessPlan) -> tuple:
        return (tuple((r.fd, r.desc.index, tuple(r.posix_locks),
                       tuple(r.desc.locks) if r.desc.lock_taker == (p.pid, r.fd) else ()) for r in p.fds),
                len(p.epoll), len(p.dirs),
                tuple(tuple(m.dirty) for m in p.maps), self.scratch.get(p.pid, 0))

    def _tracee(self, tid: int, tgid: int) -> Tracee:
        watchdog = self.prepared.watchdog
        tracee = Tracee(tid, tgid, witness=watchdog.hold_signal if watchdog is not None else None)
        self.tracees[tid] = tracee
        return tracee

    # -- stopping ---------------------------------------------------------------------
    def _pin(self) -> dict[int, set[int]]:
        cpu = min(os.sched_getaffinity(0))
        tids = [threading.get_native_id()] + [t for p in self.stop_set for t in p.tids]
        return pin_to_cpu(tids, cpu)

    def _stop_all(self, watchdog: Watchdog | None) -> None:
        self.window.first_stop = time.perf_counter()
        if self.freezer is not None:
            assert watchdog is not None
            self.caller_froze = self.freezer.is_frozen()
            watchdog.arm(restore_frozen=self.caller_froze)
            if not self.caller_froze:
                self.freezer.freeze(self.timeout)
                self.we_froze = True
            self._check_no_new_processes()
        if self.freezer is not None:
            self._seize_frozen_cgroup()
        else:
            for p in self.stop_set:
                self._seize_process(p)
        if self.freezer is not None:
            # Injected code never runs while frozen; tasks trap before any user code after thaw.
            self.freezer.thaw(self.timeout)
            self.we_froze = False
        deadline = time.monotonic() + self.timeout
        for tid in list(self.tracees):
            self._wait_interrupt_stop(tid, deadline)
        if self.freezer is None:
            for p in self.stop_set:  # threads created between discovery and the seize
                self._seize_process(p)
            for tid in list(self.tracees):
                if self.tracees[tid].regs is None:
                    self._wait_interrupt_stop(tid, deadline)
        self.window.all_stopped = time.perf_counter()
        log.info("stopped %d threads of %d processes in %.2f ms", len(self.tracees), len(self.stop_set),
                 (self.window.all_stopped - self.window.first_stop) * 1e3)

    def _check_no_new_processes(self) -> None:
        known = {p.pid for p in self.plan.processes}
        new = [pid for pid in cgroup_pids(self.plan.cgroup) if pid not in known]
        for pid in new:
            with contextlib.suppress(FileNotFoundError):
                if _holds_source(pid, self.plan.source.dev):
                    raise SwapChanged(f"process {pid} appeared after discovery and uses the source; run the switch again")

    def _seize_frozen_cgroup(self) -> None:
        """One read of the cgroup's thread list instead of a /proc/PID/task scan per process.
        A planned process that has exited is found before any seize: a task seized and
        interrupted while frozen and then left would stop for good once thawed."""
        known = {tid: p.pid for p in self.stop_set for tid in p.tids}
        wanted = {p.pid for p in self.stop_set}
        threads: list[tuple[int, int]] = []
        for tid in cgroup_tids(self.plan.cgroup):
            tgid = known.get(tid)
            if tgid is None:  # a thread born after discovery
                with contextlib.suppress(FileNotFoundError):
                    tgid = procfs.status(tid).tgid
            if tgid in wanted:
                threads.append((tid, tgid))
        gone = wanted - {tgid for _, tgid in threads}
        if gone:
            raise SwapChanged(f"process(es) {sorted(gone)} exited after discovery")
        for tid, tgid in threads:
            if tid not in self.tracees:
                ptrace.seize(tid, SEIZE_OPTIONS)
                self._tracee(tid, tgid)
                ptrace.interrupt(tid)

    def _seize_process(self, p: ProcessPlan) -> None:
        for tid in procfs.threads(p.pid):
            if tid in self.tracees:
                continue
            ptrace.seize(tid, SEIZE_OPTIONS)
            self._tracee(tid, p.pid)
            ptrace.interrupt(tid)

    def _wait_interrupt_stop(self, tid: int, deadline: float) -> None:
        tracee = self.tracees[tid]
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SwapError(f"task {tid} did not stop in {self.timeout} s (uninterruptible sleep, "
                                "e.g. a request parked on a stub FUSE mount?)")
            stop = ptrace.wait_stop(tid, remaining)
            if stop.exited:
                del self.tracees[tid]
                raise SwapError(f"task {tid} exited during the switch")
            if stop.is_event_stop:
                regs = ptrace.getregs(tid)
                if self._in_injected_code(tracee.tgid, regs.rip):
                    # Still finishing the table of a previous switch (it ran on after that
                    # detach): let it leave the injected code before we overwrite it.
                    ptrace.cont(tid)
                    time.sleep(0.001)
                    ptrace.interrupt(tid)
                    continue
                check_task_regs(regs, tid)
                fixed = without_spurious_eintr(regs, caught_signal_pending=bool(tracee.pending))
                if fixed is not None:
                    ptrace.setregs(tid, fixed)
                    regs = fixed
                tracee.regs = regs
                return
            if stop.event in (ptrace.PTRACE_EVENT_CLONE, ptrace.PTRACE_EVENT_FORK, ptrace.PTRACE_EVENT_VFORK):
                msg = ctypes.c_ulong()
                ptrace.libc.ptrace(PTRACE_GETEVENTMSG, tid, None, ctypes.byref(msg))
                if stop.event == ptrace.PTRACE_EVENT_CLONE:
                    self._tracee(msg.value, tracee.tgid)  # auto-attached thread
                else:
                    raise_later = SwapChanged(f"process {tracee.tgid} forked {msg.value} during the switch; run it again")
                    self._tracee(msg.value, msg.value)
                    self._wait_interrupt_stop(msg.value, deadline)
                    ptrace.cont(tid)
                    raise raise_later
                self._wait_interrupt_stop(msg.value, deadline)
            elif stop.is_signal_delivery:
                tracee.record_signal()
            ptrace.cont(tid)

    # -- validation and manager-side state ----------------------------------------------------
    def _revalidate(self) -> None:
        me = os.getpid()
        for p in self.stop_set:
            numbers = procfs.fd_numbers(p.pid)
            replaced = []
            for ref in list(p.fds):
                if ref.fd not in numbers or _kcmp_file(me, p.pid, ref.desc.old_fd, ref.fd) != 0:
                    # Closed (or reused for another file) since discovery: nothing to move there.
                    p.fds.remove(ref)
                    ref.desc.holders = [h for h in ref.desc.holders if h != (ref.pid, ref.fd)]
                    p.epoll = [e for e in p.epoll if e.target.tfd != ref.fd]
                    if ref.fd in numbers:
                        replaced.append(ref.fd)
                ref.posix_locks = []
            if numbers != p.fd_numbers or replaced:
                for fd in sorted((set(numbers) - set(p.fd_numbers)) | set(replaced)):
                    with contextlib.suppress(FileNotFoundError):
                        if os.stat(f"/proc/{p.pid}/fd/{fd}").st_dev == self.plan.source.dev:
                            self._adopt_late_fd(p, fd)
                p.fd_numbers = numbers
            for d in p.dirs:
                if d.kind in ("cwd", "root"):
                    now = os.stat(f"/proc/{p.pid}/{d.kind}")
                    then = os.fstat(d.old_fd)
                    if (now.st_dev, now.st_ino) != (then.st_dev, then.st_ino):
                        raise SwapChanged(f"{d.kind} of process {p.pid} changed after discovery; run the switch again")
        for p in self.units:
            if self._does_maps(p):
                self._revalidate_mappings(p)
        handover.find_locks(self.plan, self.stop_set)
        self._assign_lock_takers()
        self.window.marks["revalidated"] = time.perf_counter()

    def _revalidate_mappings(self, p: ProcessPlan) -> None:
        """A remap is MAP_FIXED: the range must still hold exactly what discovery saw."""
        now = procfs.maps(p.pid)
        current = {(v.start, v.end, v.perms, v.offset, v.dev, v.ino) for v in now}
        for m in p.maps:
            v = m.vma
            if (v.start, v.end, v.perms, v.offset, v.dev, v.ino) not in current:
                raise SwapChanged(f"mapping {v.start:#x}-{v.end:#x} of process {p.pid} changed after discovery; "
                                "run the switch again")
            if not v.shared:
                m.dirty = procfs.private_anon_runs(p.pid, v.start, v.end)
        known = {(m.vma.start, m.vma.end) for m in p.maps}
        new = [v for v in now if v.dev == self.plan.source.dev and v.ino and (v.start, v.end) not in known]
        if new:
            raise SwapChanged(f"process {p.pid} mapped {new[0].path} after discovery; run the switch again")
        need = max((sum(n for _, n in m.dirty) for m in p.maps), default=0)
        if need:
            self.scratch[p.pid] = _free_range([(v.start, v.end) for v in now], need)

    def _adopt_late_fd(self, p: ProcessPlan, fd: int) -> None:
        """An fd opened on the source between discovery and the stop: add it to the plan."""
        if p.pid in self.prepared.donor_of:
            raise SwapChanged(f"process {p.pid} opened fd {fd} on the source after discovery and its fd donor "
                            "was started before; run the switch again")
        owner = next((q for q in self.stop_set if q.pid == p.fd_table_of), p) if p.fd_table_of else p
        if any(r.fd == fd for r in owner.fds):
            return  # already adopted through a process sharing the fd table
        info = procfs.fdinfo(p.pid, fd)
        st = os.stat(f"/proc/{p.pid}/fd/{fd}")
        me = os.getpid()
        desc = next((d for d in self.plan.descriptions if (d.dev, d.ino) == (st.st_dev, st.st_ino)
                     and ptrace.kcmp(me, p.pid, ptrace.KCMP_FILE, d.old_fd, fd) == 0), None)
        if desc is None:
            link = os.readlink(f"/proc/{p.pid}/fd/{fd}")
            rel = late_relative_path(self.plan, p.pid, link, info.mnt_id, st)
            # prepare may have dropped descriptions: a count could repeat an index
            index = max((d.index for d in self.plan.descriptions), default=-1) + 1
            desc = Description(index=index, rel=rel, flags=info.flags, mode=st.st_mode,
                               dev=st.st_dev, ino=st.st_ino, mapped=st.st_nlink == 0)
            desc.old_fd = self.prepared.track(pidfd.getfd_from(self.prepared.pidfd(p.pid), fd))
            try:
                desc.new_fd = self.prepared.track(open_on_target(self.plan, self.prepared, desc))
            except ShareChanged as exc:
                raise SwapError(f"process {p.pid} fd {fd}: {exc}") from exc
            self.plan.descriptions.append(desc)
        desc.holders.append((p.pid, fd))
        owner.fds.append(FdRef(p.pid, fd, desc, cloexec=bool(info.flags & os.O_CLOEXEC)))
        log.info("process %d opened fd %d (%s) after discovery: adopted", p.pid, fd, desc.rel)

    def _move_manager_side_state(self) -> None:
        handover.move_description_state(self.plan, self.prepared)
        watchdog = self.prepared.watchdog
        target_dev = self.prepared.target.dev

        def tell_watchdog(reg) -> None:
            present = [w.wd for w in procfs.fdinfo(os.getpid(), reg.copy_fd).inotify]
            # the watchdog was forked holding the same descriptor number (prepare.py)
            watchdog.watch_moving(reg.copy_fd, reg.watch.mask, magic_path(reg.source_fd), target_dev, present)

        handover.move_inotify_watches(self.plan, self.stop_set, forward=True,
                                      before_move=tell_watchdog if watchdog is not None else None)
        self.window.marks["descriptions"] = time.perf_counter()

    # -- injection ----------------------------------------------------------------------
    def _injector(self, p: ProcessPlan) -> Injector:
        if p.pid in self.injectors:
            return self.injectors[p.pid]
        tid = p.pid if p.pid in self.tracees else next(t for t, tr in self.tracees.items() if tr.tgid == p.pid)
        tracee = self.tracees[tid]
        marker = choose_marker_signal(p.sig_ignored, p.sig_caught, ptrace.getsigmask(tid))
        if marker is None:
            raise UnitFailed(f"process {p.pid} catches or blocks every signal usable as a marker")
        if p.vdso is None:
            raise UnitFailed(f"process {p.pid} has no [vdso] to host the injected code")
        ns_ids = None
        if p.pid in self.prepared.donor_of:
            ns_ids = (p.nspid, procfs.status(tid).nspid[-1])
        injector = Injector(tracee, p.vdso, marker, self.timeout, p.writable, ns_ids)
        self.injectors[p.pid] = injector
        injector.install()
        return injector

    def _in_injected_code(self, tgid: int, rip: int) -> bool:
        vdso = self.vdso_of.get(tgid)
        return vdso is not None and vdso[1] - REGION <= rip < vdso[1]

    def _inject_all(self) -> None:
        """Each table installs B and parks its task; nothing is decided yet."""
        for index, p in enumerate(self.units):
            if abort_requested.is_set():
                raise SwapError("switch aborted by a signal; reverting")
            fail_after = self.fail.entry if self.fail and self.fail.unit == index else None
            table, signature = self.prebuilt.get(p.pid, (None, None))
            if table is None or fail_after is not None or signature != self._table_signature(p):
                table = self._build_table(p, fail_after)
            result = self._injector(p).run(table, below=self.scratch.get(p.pid, 0))
            if not result.ok:
                what = table.entries[result.failed_index].what
                raise UnitFailed(f"process {p.pid}: {what} failed: {os.strerror(-result.error)}")
        self.window.injected = time.perf_counter()

    def _commit_point(self) -> None:
        """One byte per parked task into the decision pipe: from this write on, every task
        ends on B whatever happens to us."""
        # One more byte than readers: the watchdog tells "committed" by a byte left over.
        count = 1 + sum(1 for injector in self.injectors.values() if injector.parked)
        if os.write(self.prepared.decision_write, b"c" * count) != count:
            raise SwapError("short write into the decision pipe")
        self.window.marks["committed"] = time.perf_counter()

    def _rollback(self) -> None:
        """Close the decision pipe: every parked task reads end of file and undoes its table."""
        self.prepared.close_decision()
        for injector in self.injectors.values():
            try:
                injector.finish()
            except Exception:  # noqa: BLE001 - keep reverting the others (a parked task reverts on its own)
                log.exception("revert of process %d failed", injector.tracee.tgid)
        handover.move_inotify_watches(self.plan, self.stop_set, forward=False)
        log.warning("reverted %d processes to the source", len(self.injectors))

    # -- release --------------------------------------------------------------------------
    def _release(self, watchdog: Watchdog | None) -> None:
        self.window.marks["release"] = time.perf_counter()
        with_signals = {t.tgid for t in self.tracees.values() if t.pending}
        for injector in self.injectors.values():
            try:
                if injector.parked and (injector.tracee.tgid in with_signals or injector.code_page):
                    # Its signals must arrive at its own code, not inside the table; a code
                    # page must be unmapped by us.  Otherwise it finishes after the detach.
                    injector.finish()
                injector.uninstall()
            except OSError as exc:
                log.error("could not restore task %d: %s", injector.tracee.tid, exc)
        if self.freezer is not None and (self.caller_froze or self.we_froze):
            try:
                self.freezer.freeze(self.timeout)  # traced tasks count as frozen: completes at once
            except (OSError, FreezerError) as exc:
                if self.caller_froze:
                    self._problem(RefreezeFailed(
                        f"could not freeze {self.freezer.path} again before letting its tasks go (the "
                        f"caller had frozen it): {exc}; they run", self._frozen_now()))
                else:  # only a step before our own thaw below
                    log.warning("could not freeze %s again before the thaw: %s", self.freezer.path, exc)
        for tracee in self.tracees.values():
            try:
                if tracee.regs is not None and tracee.tgid not in self.injectors:
                    ptrace.setregs(tracee.tid, tracee.regs)
                for info in tracee.pending:
                    ptrace.requeue_signal(tracee.tgid, tracee.tid, info)
            except OSError as exc:
                log.error("task %d: %s", tracee.tid, exc)
        if watchdog is not None and with_signals:
            watchdog.signals_delivered()
        self.window.marks["restored"] = time.perf_counter()
        let_go = [InTable(i.tracee.tgid, i.tracee.tid, self._region(i)) for i in self.injectors.values() if i.parked]
        for tracee in self.tracees.values():
            try:
                ptrace.detach(tracee.tid)
            except OSError as exc:
                if exc.errno != 3:  # ESRCH: gone, or not stopped (then the kernel detaches on our exit)
                    log.error("detach %d: %s", tracee.tid, exc)
        self.window.released = time.perf_counter()
        if self.plan.phase is Phase.COMMITTED:
            self._wait_done(len(self.injectors), let_go)
        if self.freezer is not None and not self.caller_froze:
            try:
                if self.freezer.is_frozen():
                    self.freezer.thaw(self.timeout)
            except (OSError, FreezerError) as exc:
                frozen = self._frozen_now()
                self._problem(ThawFailed(
                    f"could not thaw {self.freezer.path} after the switch "
                    f"({'committed' if self.committed else 'nothing moved'}): {exc}; "
                    f"{'it is left frozen' if frozen else 'its state: ' + repr(frozen)}", frozen))
        if watchdog is not None:
            watchdog.disarm()
        self.plan.advance(Phase.RELEASED)

    def _region(self, injector: Injector) -> tuple[int, int]:
        if injector.code_page:
            return injector.code_page, injector.code_page + 4096
        vdso = self.vdso_of.get(injector.tracee.tgid)
        # (an injector exists only with a vdso or a code page: never raise in the release)
        return (vdso[1] - REGION, vdso[1]) if vdso is not None else (0, 0)

    def _frozen_now(self) -> bool | None:
        assert self.freezer is not None
        try:
            return self.freezer.is_frozen()
        except OSError:
            return None

    def _problem(self, problem: SwapError) -> None:
        log.error("%s", problem)
        self.problems.append(problem)

    def _wait_done(self, count: int, let_go: list[InTable]) -> None:
        """Tasks detached while parked finish their table on their own: wait for their byte
        in the done counter, so that no kept A reference is left when we return (umount A).
        Those that have not finished by then are reported, never passed over."""
        if self.caller_froze:
            # frozen again: they finish when the caller thaws them (api.settle waits then)
            self.pending, self.pending_count = let_go, len(let_go)
            return
        got = self.prepared.read_done(count, self.timeout)
        if got >= count:
            return
        self.pending_count = count - got
        self.pending = [t for t in let_go if t.inside()]
        self._problem(TasksPending(
            f"committed, but {count - got} of {count} processes had not finished their switch within "
            f"{self.timeout} s and still hold references to the source "
            f"(in their table: {', '.join(str(t.tgid) for t in self.pending)})"))


def _kcmp_file(me: int, pid: int, mine: int, theirs: int) -> int:
    try:
        return ptrace.kcmp(me, pid, ptrace.KCMP_FILE, mine, theirs)
    except OSError:
        return -1  # the fd went away


def _scratch_size(p: ProcessPlan) -> int:
    return max((sum(n for _, n in m.dirty) for m in p.maps), default=0)


def _free_range(ranges: list[tuple[int, int]], size: int, page: int = 4096) -> int:
    """An unmapped address range of `size` bytes (mapped with MAP_FIXED_NOREPLACE, so a
    race only makes the switch fail, never clobbers anything)."""
    size = (size + page - 1) // page * page
    lowest = min((start for start, _ in ranges if start >= 1 << 32), default=1 << 40)
    candidate = (lowest - size - 64 * page) & ~(page - 1)
    for start, end in sorted(ranges, reverse=True):
        if start < candidate + size and end > candidate:
            candidate = (start - size - 64 * page) & ~(page - 1)
    return candidate


def _holds_source(pid: int, dev: int) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(f"/proc/{pid}/fd/{fd}").st_dev == dev:
                return True
    return any(os.stat(f"/proc/{pid}/{k}").st_dev == dev for k in ("cwd", "root"))
