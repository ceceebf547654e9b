"""Thin ctypes wrappers for the Linux syscalls Python's os module lacks.

Everything here exists on Linux 6.1 (the lab guest): renameat2 (3.15). openat2 is
spfs.sys.beneath's; the per-thread credential switch (setfsuid, setfsgid, setgroups) is
spfs.sys.thread_creds.
"""

from __future__ import annotations

import ctypes
import os

from spfs.sys.libc import check as _check
from spfs.sys.libc import libc as _libc



RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2



def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int) -> None:
    _check(_libc.renameat2(olddirfd, ctypes.c_char_p(oldname), newdirfd,
                           ctypes.c_char_p(newname), ctypes.c_uint(flags)), "renameat2")


MNT_DETACH = 2


def umount2(path: str, flags: int) -> None:
    _check(_libc.umount2(os.fsencode(path), flags), f"umount2 {path}")
