"""Running syscalls inside a seized, stopped task (the compel-like layer).

The code of blob.S is written into the zero tail of the task's [vdso] page (a private
copy-on-write page: other processes are unaffected), together with the registers the
task must resume with.  Each injection sets rip to an entry of that code and continues
the task; the code ends by sending the task a signal it ignores, which stops it for us.
If the tracer dies instead, the signal is dropped and the code restores the registers
itself, so a killed manager never leaves a task with altered registers.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from spfs.swap import blob, ptrace
from spfs.swap.arch import Nr, UserRegs, as_resumed
from spfs.swap.table import PARK_OK, SyscallTable

log = logging.getLogger(__name__)

PROT_RW = 0x3
PROT_RWX = 0x7
# Tests set this to exercise the fallback used when the vdso has no free tail.
FORCE_CODE_PAGE = False
MAP_PRIVATE_ANON = 0x22
PAGE = 4096
REGION = 512
RED_ZONE = 256  # the ABI's 128 bytes, doubled
STACK_TABLE_MAX = 16384  # bytes reserved at the end of the vdso mapping (blob.SIZE rounded up)

# Default action "ignore": dropping them has no effect on a task that does not catch them.
MARKER_CANDIDATES = (signal.SIGURG, signal.SIGWINCH, signal.SIGCHLD)
NEVER_MARKERS = {signal.SIGKILL, signal.SIGSTOP, signal.SIGCONT}


class InjectionError(RuntimeError):
    pass


def choose_marker_signal(sig_ignored: int, sig_caught: int, blocked: int) -> int | None:
    """A signal the task neither catches nor blocks and whose delivery does nothing."""
    for sig in marker_candidates(sig_ignored, sig_caught):
        if not blocked & (1 << (sig - 1)):
            return sig
    return None


@functools.lru_cache(maxsize=256)
def marker_candidates(sig_ignored: int, sig_caught: int) -> tuple[int, ...]:
    """Ignored signals first, then default-ignore ones the task does not handle."""
    out = [sig for sig in range(1, 65) if sig not in NEVER_MARKERS and sig_ignored & (1 << (sig - 1))]
    out += [int(sig) for sig in MARKER_CANDIDATES if not (sig_caught | sig_ignored) & (1 << (sig - 1))]
    return tuple(out)


@dataclass
class Tracee:
    """A seized thread, with the registers it must leave its stop with."""

    tid: int
    tgid: int
    regs: UserRegs | None = None
    pending: list[ptrace.SigInfo] = field(default_factory=list)
    # Told about every suppressed signal at once, so that one outlives a killed manager.
    witness: Callable[[int, int, ptrace.SigInfo], None] | None = None

    def record_signal(self) -> None:
        info = ptrace.getsiginfo(self.tid)
        self.pending.append(info)
        if self.witness is not None:
            self.witness(self.tgid, self.tid, info)


@dataclass
class RunResult:
    ok: bool
    failed_index: int
    error: int  # -errno of the failed entry
    parked: bool = False  # stopped at a park entry: finish() runs the rest of the table


class Injector:
    """Injection into one thread of one process; other threads of it stay stopped."""

    def __init__(self, tracee: Tracee, vdso: tuple[int, int], marker_signal: int, timeout: float,
                 writable: list[tuple[int, int]] = (), ns_ids: tuple[int, int] | None = None):
        assert tracee.regs is not None
        self.tracee = tracee
        self.marker_signal = marker_signal
        self.timeout = timeout
        self.vdso = vdso
        self.base = vdso[1] - REGION
        self.code_page = 0  # set when the code had to go into a page of its own
        self.syscall_insn = 0
        self.mem = -1
        self.parked = False  # stopped inside a table that has more to run (see finish)
        self.original = b""
        self.writable = list(writable)
        # The task names itself (tgkill) with its ids in its own pid namespace.
        self.ns_ids = ns_ids or (tracee.tgid, tracee.tid)

    def install(self) -> None:
        self.mem = os.open(f"/proc/{self.tracee.tid}/mem", os.O_RDWR | os.O_CLOEXEC)
        self.original = os.pread(self.mem, REGION, self.base)
        free = not any(self.original) or self.original.startswith(blob.CODE)
        if FORCE_CODE_PAGE or not free:
            self._install_in_code_page()
        resume = as_resumed(self.tracee.regs)
        image = blob.image(self.ns_ids[0], self.ns_ids[1], self.marker_signal, resume)
        os.pwrite(self.mem, image, self.base)

    def _install_in_code_page(self) -> None:
        """Fallback when the vdso tail is not free (another kernel's vdso layout): map a page
        for the code with one single-stepped mmap at a `syscall` instruction of the vdso.
        Only during that single step (and the munmap at the end) would a killed tracer leave
        the task with altered registers."""
        vdso = os.pread(self.mem, self.vdso[1] - self.vdso[0], self.vdso[0])
        at = vdso.find(b"\x0f\x05")
        if at < 0:
            raise InjectionError(f"task {self.tracee.tid}: no room for the injected code and no syscall in [vdso]")
        self.syscall_insn = self.vdso[0] + at
        page = self._single_step(Nr.mmap, 0, PAGE, PROT_RWX, MAP_PRIVATE_ANON, -1, 0)
        if -4096 < page < 0:
            raise InjectionError(f"task {self.tracee.tid}: mmap for the injected code: {os.strerror(-page)}")
        self.code_page = self.base = page
        self.original = bytes(REGION)

    def _single_step(self, nr: int, *args: int) -> int:
        tid = self.tracee.tid
        regs = self.tracee.regs.copy()
        regs.rip, regs.rax, regs.orig_rax = self.syscall_insn, nr, ctypes.c_ulonglong(-1).value
        for name, value in zip(("rdi", "rsi", "rdx", "r10", "r8", "r9"), args):
            setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
        ptrace.setregs(tid, regs)
        try:
            ptrace.singlestep(tid)
            while True:
                stop = ptrace.wait_stop(tid, self.timeout)
                if stop.exited:
                    raise InjectionError(f"task {tid} exited during injection")
                if stop.is_signal_delivery and stop.signal == ptrace.SIGTRAP:
                    return ctypes.c_longlong(ptrace.getregs(tid).rax).value
                if stop.is_signal_delivery:
                    self.tracee.record_signal()
                ptrace.singlestep(tid)
        finally:
            ptrace.setregs(tid, self.tracee.regs)

    def uninstall(self) -> None:
        """Put back the vdso bytes (zeros) and the task's registers; the task stays stopped.
        A parked task keeps both: after the detach it runs the rest of its table (as the
        decision pipe says) and restores its registers itself."""
        if self.mem < 0:
            return
        if self.parked:
            os.close(self.mem)
            self.mem = -1
            return
        try:
            # Registers first: a task parked in the blob must never see the blob erased.
            ptrace.setregs(self.tracee.tid, self.tracee.regs)
            if self.code_page:
                self._single_step(Nr.munmap, self.code_page, PAGE)
                self.code_page = 0
            else:
                os.pwrite(self.mem, bytes(len(self.original)), self.base)
        finally:
            os.close(self.mem)
            self.mem = -1

    def _enter(self, entry: int, **values: int) -> UserRegs:
        regs = self.tracee.regs.copy()
        regs.rip = self.base + entry
        regs.orig_rax = ctypes.c_ulonglong(-1).value
        for name, value in values.items():
            setattr(regs, name, value & 0xFFFFFFFFFFFFFFFF)
        ptrace.setregs(self.tracee.tid, regs)
        ptrace.cont(self.tracee.tid)
        return self._wait_marker()

    def _wait_marker(self) -> UserRegs:
        tid = self.tracee.tid
        while True:
            try:
                stop = ptrace.wait_stop(tid, self.timeout)
            except ptrace.WaitTimeout:
                self._recapture()
                raise InjectionError(f"task {tid}: the injected code did not come back in {self.timeout} s") from None
            if stop.exited:
                raise InjectionError(f"task {tid} exited during injection (status {stop.status:#x})")
            if stop.is_signal_delivery:
                regs = ptrace.getregs(tid)
                if stop.signal == self.marker_signal and regs.rip in (self.base + blob.MARKER_END,
                                                                      self.base + blob.LOOP_SYSCALL_END):
                    return regs
                if stop.signal == ptrace.SIGTRAP or stop.signal in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL):
                    raise InjectionError(f"task {tid}: injected code faulted with signal {stop.signal} "
                                         f"at {regs.rip:#x}")
                self.tracee.record_signal()  # delivered again before detach
            ptrace.cont(tid)

    def _recapture(self) -> None:
        """Stop a task that did not reach the marker.  Inside the blob (a blocking table
        syscall) its saved registers are still right; outside, it already restored itself
        and runs its own code: then its current registers must be kept."""
        tid = self.tracee.tid
        ptrace.interrupt(tid)
        while True:
            stop = ptrace.wait_stop(tid, self.timeout)
            if stop.exited:
                raise InjectionError(f"task {tid} exited during injection")
            if stop.is_event_stop:
                break
            if stop.is_signal_delivery:
                self.tracee.record_signal()
            ptrace.cont(tid)
        regs = ptrace.getregs(tid)
        if not self.base <= regs.rip < self.base + REGION:
            log.error("task %d left the injected code on its own; keeping its current state", tid)
            self.tracee.regs = regs

    def syscall(self, nr: int, *args: int) -> int:
        names = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
        regs = self._enter(blob.ENTRY_SINGLE, rax=nr, **dict(zip(names, args)))
        return ctypes.c_longlong(regs.rbx).value

    def run(self, table: SyscallTable, below: int = 0) -> RunResult:
        """`below`: an address range the table must not take (the table's own scratch for
        private pages starts there): a mapped table goes below it."""
        if not table.entries:
            return RunResult(True, -1, 0)
        late = {"tgid": self.ns_ids[0], "tid": self.ns_ids[1], "sig": self.marker_signal}
        base, unmap = self._place_on_stack(table, late), 0
        if base is None:  # large table, or no stack below rsp: a scratch mapping (one more round trip)
            unmap = (table.size + PAGE - 1) // PAGE * PAGE
            hint = max(below - unmap - 16 * PAGE, 0) if below else 0  # only a hint: never MAP_FIXED
            base = self.syscall(Nr.mmap, hint, unmap, PROT_RW, MAP_PRIVATE_ANON, -1, 0)
            if -4096 < base < 0:
                raise InjectionError(f"task {self.tracee.tid}: mmap of {unmap} bytes failed: {os.strerror(-base)}")
            os.pwrite(self.mem, table.serialize(base, late), base)
        # rsp below the table: if we die and a signal handler runs in the task, its frame
        # must not land on the table the loop is still reading.
        self.parked = True  # from here on the task is inside its table until it says otherwise
        regs = self._enter(blob.ENTRY_RUN, r12=base, r13=len(table.entries), r14=base, r15=unmap,
                           rsp=base - 64, rbp=0)
        index = (regs.r12 - base) // blob.TABLE_ENTRY_SIZE
        if regs.rip == self.base + blob.LOOP_SYSCALL_END:  # a park entry
            if index == table.labels.get(PARK_OK):
                return RunResult(True, -1, 0, parked=True)
            raw = os.pread(self.mem, len(table.entries) * blob.TABLE_ENTRY_SIZE, base)
            results = [struct.unpack_from("<q", raw, i * blob.TABLE_ENTRY_SIZE + 72)[0]
                       for i in range(len(table.entries))]
            failed = table.first_failure(results[:index])
            failed = index if failed is None else failed
            return RunResult(False, failed, results[failed], parked=True)
        self.parked = False
        if regs.r13 == 0:
            return RunResult(True, -1, 0)
        return RunResult(False, index, ctypes.c_longlong(regs.rbx).value)

    def finish(self) -> None:
        """Let a parked task read the decision and run the rest of its table, up to the
        final marker (then uninstall() can restore it)."""
        if not self.parked:
            return
        ptrace.cont(self.tracee.tid)
        self._wait_marker()
        self.parked = False

    def _place_on_stack(self, table: SyscallTable, late: dict[str, int]) -> int | None:
        """Write the table below the thread's stack pointer (past the red zone), if mapped."""
        if table.size > STACK_TABLE_MAX:
            return None
        rsp = self.tracee.regs.rsp
        base = (rsp - RED_ZONE - table.size) & ~0xF
        # Same read-write mapping as the stack pointer (never a guard page below it).
        if not any(start <= base and rsp <= end for start, end in self.writable):
            return None
        try:
            os.pwrite(self.mem, table.serialize(base, late), base)
        except OSError:
            return None
        return base
