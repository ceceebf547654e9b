"""The C library, loaded once, and the errno convention of every wrapper in spfs."""

from __future__ import annotations

import ctypes
import os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long  # syscall(2) returns a long: fds, pids, -1


def check(result: int, what: str) -> int:
    """`result` of a libc call, or OSError with errno, as the os module raises it."""
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result
