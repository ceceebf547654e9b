"""pidfd_open and pidfd_getfd (Linux 5.6+), which Python 3.11's os module lacks in part."""

from __future__ import annotations

import errno
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


def getfd_if_same_file(pidfd: int, fd: int, dev: int, ino: int) -> int | None:
    """A copy of descriptor `fd` of the process behind `pidfd` if it is still open on the
    file (dev, ino); None if the process closed it, or its number now names another file
    (a program may close and open files at any moment)."""
    try:
        copy = getfd_from(pidfd, fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            return None
        raise
    st = os.fstat(copy)
    if (st.st_dev, st.st_ino) != (dev, ino):
        os.close(copy)
        return None
    return copy
