"""pidfd_open and pidfd_getfd (Linux 5.6+), which Python 3.11's os module lacks in part."""

from __future__ import annotations

import os

from spfs.sys.libc import check, libc

SYS_PIDFD_GETFD = 438  # x86_64


def getfd_from(pidfd: int, fd: int) -> int:
    """A copy, in this process, of descriptor `fd` of the process behind `pidfd` (the same
    open file description; close-on-exec, as pidfd_getfd makes it)."""
    return check(libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0), f"pidfd_getfd({fd})")


def getfd(pid: int, fd: int) -> int:
    """The same, by pid."""
    pidfd = os.pidfd_open(pid)
    try:
        return getfd_from(pidfd, fd)
    finally:
        os.close(pidfd)
