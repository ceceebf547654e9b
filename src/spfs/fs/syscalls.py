"""Thin ctypes wrappers for the Linux syscalls Python's os module lacks.

Everything here exists on Linux 6.1 (the lab guest): openat2 (5.6), renameat2 (3.15). The
per-thread credential switch (setfsuid, setfsgid, setgroups) is spfs.sys.thread_creds.
"""

from __future__ import annotations

import ctypes
import errno
import os

from spfs.sys.libc import check as _check
from spfs.sys.libc import libc as _libc

_syscall = _libc.syscall

# Syscalls added since 5.1 have one number on x86_64 and aarch64 alike (the unified
# numbering); glibc 2.36 has no openat2() wrapper. (renameat2, older and numbered per
# architecture, is called through glibc's.)
SYS_OPENAT2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2



class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]



def try_openat2(dirfd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): the new descriptor, or -errno (no exception: a missing name is an
    ordinary answer on the lookup path)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    while True:
        res = _syscall(SYS_OPENAT2, dirfd, ctypes.c_char_p(path), ctypes.byref(how),
                       ctypes.sizeof(how))
        if res >= 0:
            return res
        err = ctypes.get_errno()
        if err != errno.EAGAIN:  # openat2 may ask for a retry when a rename raced
            return -err


def openat2(dirfd: int, path: bytes | str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open *path* relative to *dirfd* under the RESOLVE_* restrictions."""
    if isinstance(path, str):
        path = os.fsencode(path)
    res = try_openat2(dirfd, path, flags, resolve, mode)
    if res < 0:
        raise OSError(-res, os.strerror(-res), os.fsdecode(path))
    return res


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, ctypes.c_char_p(oldname), newdirfd,
                           ctypes.c_char_p(newname), ctypes.c_uint(flags)), "renameat2")


MNT_DETACH = 2


def umount2(path: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(path), flags), f"umount2 {path}")
