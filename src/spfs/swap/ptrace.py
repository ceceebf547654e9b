"""A thin ctypes layer over ptrace(2), waitpid and friends (x86-64 Linux).

Every call must come from the thread that seized the task (a kernel rule), so the engine
runs a whole transaction on one thread.  Waits are always bounded.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time
from dataclasses import dataclass

from spfs.swap.arch import UserRegs
from spfs.sys.libc import libc

libc.ptrace.restype = ctypes.c_long
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_GETSIGINFO = 0x4202
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GETSIGMASK = 0x420A

PTRACE_O_TRACECLONE = 0x08
PTRACE_O_TRACEFORK = 0x02
PTRACE_O_TRACEVFORK = 0x04
PTRACE_EVENT_FORK = 1
PTRACE_EVENT_VFORK = 2
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_STOP = 128

WALL = 0x40000000
SIGTRAP = 5


class PtraceError(OSError):
    pass


class WaitTimeout(TimeoutError):
    pass


def _check(ret: int, what: str, tid: int) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise PtraceError(err, f"{what}({tid}): {os.strerror(err)}")
    return ret


def seize(tid: int, options: int = 0) -> None:
    _check(libc.ptrace(PTRACE_SEIZE, tid, None, ctypes.c_void_p(options)), "PTRACE_SEIZE", tid)


def interrupt(tid: int) -> None:
    _check(libc.ptrace(PTRACE_INTERRUPT, tid, None, None), "PTRACE_INTERRUPT", tid)


def cont(tid: int, sig: int = 0) -> None:
    _check(libc.ptrace(PTRACE_CONT, tid, None, ctypes.c_void_p(sig)), "PTRACE_CONT", tid)


def singlestep(tid: int, sig: int = 0) -> None:
    _check(libc.ptrace(PTRACE_SINGLESTEP, tid, None, ctypes.c_void_p(sig)), "PTRACE_SINGLESTEP", tid)


def detach(tid: int, sig: int = 0) -> None:
    _check(libc.ptrace(PTRACE_DETACH, tid, None, ctypes.c_void_p(sig)), "PTRACE_DETACH", tid)


def getregs(tid: int) -> UserRegs:
    regs = UserRegs()
    _check(libc.ptrace(PTRACE_GETREGS, tid, None, ctypes.byref(regs)), "PTRACE_GETREGS", tid)
    return regs


def setregs(tid: int, regs: UserRegs) -> None:
    _check(libc.ptrace(PTRACE_SETREGS, tid, None, ctypes.byref(regs)), "PTRACE_SETREGS", tid)


class SigInfo(ctypes.Structure):
    _fields_ = [("si_signo", ctypes.c_int), ("si_errno", ctypes.c_int), ("si_code", ctypes.c_int),
                ("_pad", ctypes.c_int), ("rest", ctypes.c_byte * 112)]


def getsiginfo(tid: int) -> SigInfo:
    info = SigInfo()
    _check(libc.ptrace(PTRACE_GETSIGINFO, tid, None, ctypes.byref(info)), "PTRACE_GETSIGINFO", tid)
    return info


def getsigmask(tid: int) -> int:
    mask = ctypes.c_uint64()
    _check(libc.ptrace(PTRACE_GETSIGMASK, tid, ctypes.c_void_p(8), ctypes.byref(mask)),
           "PTRACE_GETSIGMASK", tid)
    return mask.value


@dataclass(frozen=True)
class Stop:
    """What waitpid reported for one tracee."""

    tid: int
    status: int

    @property
    def exited(self) -> bool:
        return os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def signal(self) -> int:
        return os.WSTOPSIG(self.status) if os.WIFSTOPPED(self.status) else 0

    @property
    def event(self) -> int:
        return self.status >> 16

    @property
    def is_event_stop(self) -> bool:
        """PTRACE_EVENT_STOP: an interrupt stop or a group-stop of a seized task."""
        return os.WIFSTOPPED(self.status) and self.event == PTRACE_EVENT_STOP

    @property
    def is_signal_delivery(self) -> bool:
        return os.WIFSTOPPED(self.status) and self.event == 0


def wait_stop(tid: int, timeout: float) -> Stop:
    """Wait for the next ptrace stop (or exit) of one tracee, for at most `timeout` seconds.

    Polls with WNOHANG: a blocking waitpid cannot be bounded from a non-main thread.  The
    manager and the tracees share one CPU during the window, so yielding lets the tracee
    reach its stop; after a short spin the poll backs off to sleeps.
    """
    deadline = time.monotonic() + timeout
    spins = 0
    while True:
        try:
            pid, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError as exc:
            raise PtraceError(errno.ECHILD, f"waitpid({tid}): not a tracee any more") from exc
        if pid == tid:
            return Stop(tid, status)
        spins += 1
        if spins < 200:
            os.sched_yield()
            continue
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"task {tid} did not stop within {timeout:.3f} s")
        time.sleep(0.0002 if spins < 1000 else 0.002)


def tgkill(tgid: int, tid: int, sig: int) -> None:
    if libc.syscall(234, tgid, tid, sig) == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"tgkill({tgid}, {tid}, {sig})")


def requeue_signal(tgid: int, tid: int, info: SigInfo) -> None:
    """Send a suppressed signal again; queued siginfo (sigqueue) is kept when the kernel allows."""
    si_tkill = -6
    if info.si_code < 0 and info.si_code != si_tkill:
        if libc.syscall(297, tgid, tid, info.si_signo, ctypes.byref(info)) == 0:
            return
    tgkill(tgid, tid, info.si_signo)


def kcmp(pid1: int, pid2: int, kind: int, idx1: int = 0, idx2: int = 0) -> int:
    ret = libc.syscall(312, pid1, pid2, kind, ctypes.c_ulong(idx1), ctypes.c_ulong(idx2))
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp({pid1}, {pid2}, {kind}, {idx1}, {idx2}): {os.strerror(err)}")
    return ret


KCMP_FILE = 0
KCMP_VM = 1
KCMP_FILES = 2
KCMP_FS = 3


