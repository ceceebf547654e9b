"""pidfd_open and pidfd_getfd (Linux 5.6+), which Python 3.11's os module lacks in part."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_PIDFD_GETFD = 438  # x86_64


def getfd(pid: int, fd: int) -> int:
    """A copy, in this process, of descriptor `fd` of process `pid` (same open file)."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        os.set_inheritable(new, False)
        return new
    finally:
        os.close(pidfd)
