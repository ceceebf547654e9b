"""inotify watches on the source, re-added on B from the manager.

The manager holds a copy of the task's inotify fd (pidfd_getfd: same inotify instance),
so it adds the watch on B's file and removes A's itself: no injection.  The watch
descriptor changes (the kernel allocates wds cyclically and offers no way to pick one);
the task sees IN_IGNORED for the old wd, as when a watched file goes away."""

from __future__ import annotations

import ctypes
import os
import struct

from spfs.swap.procfs import InotifyWatch
from spfs.sys.libc import libc as _libc

NR_OPEN_BY_HANDLE_AT = 304


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def open_watched(mount_fd: int, watch: InotifyWatch) -> int:
    """An O_PATH descriptor of a watched inode, from the file handle in fdinfo."""
    handle = struct.pack("<Ii", len(watch.handle), watch.handle_type) + watch.handle
    buf = ctypes.create_string_buffer(handle, len(handle))
    return _check(_libc.syscall(NR_OPEN_BY_HANDLE_AT, mount_fd, buf, os.O_PATH | os.O_CLOEXEC),
                  "open_by_handle_at")


def add_watch(inotify_fd: int, path: str, mask: int) -> int:
    return _check(_libc.inotify_add_watch(inotify_fd, path.encode(), ctypes.c_uint32(mask)), f"inotify_add_watch {path}")


def remove_watch(inotify_fd: int, wd: int) -> None:
    _check(_libc.inotify_rm_watch(inotify_fd, wd), f"inotify_rm_watch {wd}")
