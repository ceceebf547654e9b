"""Read files that must be regular files, from a directory nobody vouches for.

A name in such a directory may be a FIFO (an open or read that blocks until someone writes),
a device (whose driver's open() runs with side effects), or a symlink to any file of the
host. So the name is first opened O_PATH|O_NOFOLLOW, which runs no driver code, blocks on
nothing and follows nothing; the type is checked on that descriptor; only a regular file is
then reopened for reading, through its descriptor, so the file checked is the file read
even if the name is replaced meanwhile.
"""

from __future__ import annotations

import errno
import os
import stat

_TYPES = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
          (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class NotRegularFile(OSError):
    """The name is there but is not a regular file; the message says what it is."""


class FileTooLarge(OSError):
    pass


def kind_of(mode: int) -> str:
    """'a FIFO', 'a symbolic link', ... for an error message; 'a regular file' if it is one."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for check, name in _TYPES if check(mode)), f"of type {mode:o}")


def open_regular(name: str, dir_fd: int | None = None) -> int:
    """A read-only descriptor of *name* (relative to *dir_fd*), which must be a regular file
    and is not followed if it is a symlink; NotRegularFile otherwise."""
    path_fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        mode = os.fstat(path_fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, f"{name} is {kind_of(mode)}, not a regular file")
        # O_NONBLOCK although it is a regular file: a read must never wait on anything
        return os.open(f"/proc/self/fd/{path_fd}",
                       os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    finally:
        os.close(path_fd)


def read_regular(name: str, max_bytes: int, dir_fd: int | None = None) -> bytes:
    """All of regular file *name*, at most *max_bytes* of it: FileTooLarge if it is larger
    (by its size, or by what is read should it grow meanwhile)."""
    fd = open_regular(name, dir_fd)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise FileTooLarge(errno.EFBIG, f"{name} is {size} bytes, more than {max_bytes}")
        chunks: list[bytes] = []
        left = max_bytes + 1  # one more than allowed: tells a file that grew
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise FileTooLarge(errno.EFBIG, f"{name} grew past {max_bytes} bytes while read")
        return data
    finally:
        os.close(fd)
