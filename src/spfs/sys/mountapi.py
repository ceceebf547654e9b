"""Thin ctypes wrappers for the mount syscalls Python 3.11 lacks: the new mount API, mount, umount2.

x86_64 syscall numbers; everything used exists on Linux 6.1.  Each wrapper raises OSError
with the errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import enum
import os

from spfs.sys.libc import check as _check
from spfs.sys.libc import libc as _libc


SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_FSOPEN = 430
SYS_FSCONFIG = 431
SYS_FSMOUNT = 432
SYS_MOUNT_SETATTR = 442

AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
AT_RECURSIVE = 0x8000
OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC

MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_SET_GROUP = 0x100

FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_SET_FLAG = 0
FSCONFIG_SET_STRING = 1
FSCONFIG_CMD_CREATE = 6

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_RELATIME = 0x0
MOUNT_ATTR_NOATIME = 0x10
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_SYNCHRONOUS = 16
MS_REMOUNT = 32
MS_MANDLOCK = 64
MS_DIRSYNC = 128
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_SILENT = 32768
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25

MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8



class Propagation(enum.Enum):
    """Propagation type of a mount, as mountinfo's optional fields tell it."""

    PRIVATE = MS_PRIVATE
    SHARED = MS_SHARED
    SLAVE = MS_SLAVE
    UNBINDABLE = MS_UNBINDABLE


class MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]



def _path(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def fsopen(fstype: str) -> int:
    return _check(_libc.syscall(SYS_FSOPEN, _path(fstype), FSOPEN_CLOEXEC), f"fsopen({fstype})")


def fsconfig_string(fs_fd: int, key: str, value: str) -> None:
    _check(_libc.syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_SET_STRING, _path(key), _path(value), 0),
           f"fsconfig({key}={value})")


def fsconfig_flag(fs_fd: int, key: str) -> None:
    _check(_libc.syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_SET_FLAG, _path(key), None, 0),
           f"fsconfig({key})")


def fsconfig_create(fs_fd: int) -> None:
    _check(_libc.syscall(SYS_FSCONFIG, fs_fd, FSCONFIG_CMD_CREATE, None, None, 0),
           "fsconfig(create)")


def fsmount(fs_fd: int, attr_flags: int) -> int:
    return _check(_libc.syscall(SYS_FSMOUNT, fs_fd, FSMOUNT_CLOEXEC, ctypes.c_uint(attr_flags)),
                  "fsmount")


def open_tree(dirfd: int, path: str, flags: int) -> int:
    return _check(_libc.syscall(SYS_OPEN_TREE, dirfd, _path(path), ctypes.c_uint(flags)),
                  f"open_tree({path})")


def clone_tree(path: str, dirfd: int = AT_FDCWD) -> int:
    """A detached copy of the mount at `path` (its sub-root kept), close-on-exec; a symlink
    at `path` itself is not followed."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | (AT_EMPTY_PATH if not path else AT_SYMLINK_NOFOLLOW)
    return open_tree(dirfd, path, flags)


def move_mount(from_fd: int, to_path: str, flags: int = MOVE_MOUNT_F_EMPTY_PATH,
               from_path: str = "", to_dirfd: int = AT_FDCWD) -> None:
    _check(_libc.syscall(SYS_MOVE_MOUNT, from_fd, _path(from_path), to_dirfd, _path(to_path),
                         ctypes.c_uint(flags)), f"move_mount(-> {to_path})")


def mount_setattr(fd: int, attr_set: int, attr_clr: int, propagation: int = 0,
                  path: str = "", flags: int = AT_EMPTY_PATH) -> None:
    attr = MountAttr(attr_set, attr_clr, propagation, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, fd, _path(path), ctypes.c_uint(flags),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           "mount_setattr")


def mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(_libc.mount(_path(source), _path(target), _path(fstype), ctypes.c_ulong(flags),
                       _path(data)), f"mount({source} on {target})")


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_path(target), flags), f"umount2({target})")


# mount(2) flags -> mount attributes of the new API.  Superblock flags go to fsconfig instead.
_MS_TO_ATTR = (
    (MS_RDONLY, MOUNT_ATTR_RDONLY),
    (MS_NOSUID, MOUNT_ATTR_NOSUID),
    (MS_NODEV, MOUNT_ATTR_NODEV),
    (MS_NOEXEC, MOUNT_ATTR_NOEXEC),
    (MS_NODIRATIME, MOUNT_ATTR_NODIRATIME),
    (MS_NOSYMFOLLOW, MOUNT_ATTR_NOSYMFOLLOW),
)
_MS_TO_SB_FLAG = (
    (MS_RDONLY, "ro"),
    (MS_SYNCHRONOUS, "sync"),
    (MS_DIRSYNC, "dirsync"),
    (MS_LAZYTIME, "lazytime"),
    (MS_SILENT, "silent"),
)


def mount_attr_from_ms(flags: int) -> int:
    attr = 0
    for ms, bit in _MS_TO_ATTR:
        if flags & ms:
            attr |= bit
    if flags & MS_NOATIME:
        attr |= MOUNT_ATTR_NOATIME
    elif flags & MS_STRICTATIME:
        attr |= MOUNT_ATTR_STRICTATIME
    return attr


def sb_flags_from_ms(flags: int) -> list[str]:
    return [name for ms, name in _MS_TO_SB_FLAG if flags & ms]
