"""Thin ctypes wrappers for the Linux syscalls Python's os module lacks.

Everything here exists on Linux 6.1 (the lab guest): renameat2 (3.15),
setns (3.0). setfsuid/setfsgid/setgroups are issued as raw syscalls because the kernel
applies them to the calling thread only, whereas glibc's setgroups() (and Python's
os.setgroups) broadcasts the change to every thread of the process.
"""

from __future__ import annotations

import ctypes
import os

from spfs.sys.libc import check as _check
from spfs.sys.libc import libc as _libc

_syscall = _libc.syscall

# x86-64 syscall numbers (the project is x86-64 only, like CRIU's and ptrace's parts).
SYS_SETGROUPS = 116
SYS_SETFSUID = 122
SYS_SETFSGID = 123
SYS_RENAMEAT2 = 316

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2



def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_syscall(SYS_RENAMEAT2, olddirfd, ctypes.c_char_p(oldname), newdirfd,
                    ctypes.c_char_p(newname), ctypes.c_uint(flags)), "renameat2")


def set_thread_fsuid(uid: int) -> None:
    # setfsuid never fails with an error code; it returns the previous value.
    _syscall(SYS_SETFSUID, ctypes.c_uint(uid))


def set_thread_fsgid(gid: int) -> None:
    _syscall(SYS_SETFSGID, ctypes.c_uint(gid))


def set_thread_groups(groups: list[int] | tuple[int, ...]) -> None:
    array = (ctypes.c_uint * max(1, len(groups)))(*groups)
    _check(_syscall(SYS_SETGROUPS, ctypes.c_size_t(len(groups)), array), "setgroups")


MNT_DETACH = 2


def umount2(path: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(path), flags), f"umount2 {path}")
