"""x86-64 specifics: the register set, syscall numbers and the kernel's restart rules.

The engine injects x86-64 machine code, so it refuses any other architecture and any
ia32 (compat) task up front instead of corrupting it.
"""

from __future__ import annotations

import ctypes
import platform

X86_64_CS = 0x33  # user code segment of 64-bit tasks; ia32 tasks run with 0x23


class ArchError(RuntimeError):
    """The machine or the task is not x86-64."""


def require_x86_64() -> None:
    machine = platform.machine()
    if machine != "x86_64":
        raise ArchError(f"the swap engine injects x86-64 code; this machine is {machine}")


class UserRegs(ctypes.Structure):
    """struct user_regs_struct from <sys/user.h> (27 registers, 216 bytes)."""

    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in (
            "r15 r14 r13 r12 rbp rbx r11 r10 r9 r8 rax rcx rdx rsi rdi orig_rax "
            "rip cs eflags rsp ss fs_base gs_base ds es fs gs"
        ).split()
    ]

    def copy(self) -> "UserRegs":
        clone = UserRegs()
        ctypes.pointer(clone)[0] = self
        return clone

    def signed(self, name: str) -> int:
        return ctypes.c_longlong(getattr(self, name)).value


def check_task_regs(regs: UserRegs, tid: int) -> None:
    if regs.cs != X86_64_CS:
        raise ArchError(f"task {tid} runs in ia32 compat mode (cs={regs.cs:#x}); only x86-64 tasks can be swapped")


class Nr:
    """Syscall numbers used by the engine (x86-64)."""

    read = 0
    write = 1
    openat = 257
    close = 3
    lseek = 8
    mmap = 9
    mprotect = 10
    munmap = 11
    mremap = 25
    msync = 26
    madvise = 28
    dup3 = 292
    fcntl = 72
    flock = 73
    chdir = 80
    fchdir = 81
    chroot = 161
    prctl = 157
    mlock = 149
    brk = 12
    getpid = 39
    tgkill = 234
    epoll_ctl = 233
    inotify_add_watch = 254
    restart_syscall = 219
    process_vm_readv = 310
    pidfd_open = 434
    pidfd_getfd = 438
    epoll_wait = 232
    epoll_pwait = 281
    epoll_pwait2 = 441


ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
EINTR = 4
SYSCALL_INSN_LEN = 2

# Calls that return EINTR (not a restart code) when a ptrace stop interrupts them; see
# signal(7) "Interruption of system call ... by a stop signal".
EINTR_ON_STOP = {Nr.epoll_wait, Nr.epoll_pwait, Nr.epoll_pwait2}


def as_resumed(regs: UserRegs) -> UserRegs:
    """The registers with which the task would leave its stop if no signal were delivered.

    This is the kernel's own restart logic (arch_do_signal_or_restart), applied ahead of time
    so that the injected epilogue can jump straight to it when the tracer has vanished.
    """
    out = regs.copy()
    if regs.signed("orig_rax") < 0:
        return out
    rax = regs.signed("rax")
    if rax in (-ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND):
        out.rax = regs.orig_rax
        out.rip = regs.rip - SYSCALL_INSN_LEN
    elif rax == -ERESTART_RESTARTBLOCK:
        out.rax = Nr.restart_syscall
        out.rip = regs.rip - SYSCALL_INSN_LEN
    out.orig_rax = ctypes.c_ulonglong(-1).value
    return out


def without_spurious_eintr(regs: UserRegs, caught_signal_pending: bool) -> UserRegs | None:
    """epoll_wait & co. answer a ptrace stop with EINTR; turn that back into a restart.

    Returns the fixed registers, or None when nothing needs fixing.  A caught signal that is
    pending keeps its EINTR (the application would have seen it anyway).
    """
    if caught_signal_pending or regs.signed("orig_rax") not in EINTR_ON_STOP:
        return None
    if regs.signed("rax") != -EINTR:
        return None
    out = regs.copy()
    out.rax = regs.orig_rax
    out.rip = regs.rip - SYSCALL_INSN_LEN
    out.orig_rax = ctypes.c_ulonglong(-1).value
    return out
