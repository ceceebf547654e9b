"""Private directories for control sockets, and binding a socket inside one.

A control socket accepts root peers only (SO_PEERCRED), but root of a container without a
user namespace is root too: what keeps it out is that the socket's path is nowhere in its
mount namespace. So a socket directory must be the host's own: a real directory (not a
symlink), owned by us, mode 0700, below ancestors nobody else may rename things in, and not
on a network or FUSE filesystem (a share a container may mount too). The socket is bound
through a descriptor of the directory that was checked, with umask 0177, so its file is
0600 from the moment it exists and lands exactly where the check was made.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat

from spfs.sys.libc import libc

_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), with its terminating NUL

# statfs f_type of the filesystems a share is on: NFS (the shares) and FUSE (SPFS itself)
_SHARE_MAGIC = {0x6969: "NFS", 0x65735546: "FUSE"}


class UnsafeDirectory(OSError):
    """The directory exists but is not private; the message says why."""


def _fs_type(fd: int) -> int:
    # struct statfs begins with f_type (__fsword_t, a long on x86_64 and aarch64); the
    # buffer is larger than the whole struct
    buf = ctypes.create_string_buffer(512)
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fstatfs: {os.strerror(err)}")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _check_ancestors(real: str) -> None:
    """No one but root (or us) may replace the directory: each ancestor is owned by root or
    us, and writable by nobody else unless sticky (then others cannot rename our entries)."""
    me = os.geteuid()
    parent = os.path.dirname(real)
    while True:
        st = os.lstat(parent)
        if st.st_uid not in (0, me):
            raise UnsafeDirectory(errno.EPERM, f"{parent} (above {real}) is owned by uid "
                                               f"{st.st_uid}")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise UnsafeDirectory(errno.EPERM, f"{parent} (above {real}) is writable by "
                                               f"others (mode {stat.S_IMODE(st.st_mode):o})")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def _make_parents(path: str) -> None:
    """Missing ancestors made 0755 whatever the umask (os.makedirs would give them 0777
    under umask 0, which the ancestor check then refuses)."""
    missing: list[str] = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o755)
        except FileExistsError:
            pass


def open_private_dir(path: str) -> int:
    """An O_PATH descriptor of directory *path*, created mode 0700 if missing (its missing
    parents with the default mode); UnsafeDirectory if it is a symlink or not a directory,
    is not ours, is open to group or others, lies under an ancestor others may write, or is
    on NFS or FUSE."""
    _make_parents(os.path.dirname(os.path.abspath(path)))
    try:
        os.mkdir(path, 0o700)  # the umask can only narrow it
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            kind = "a symbolic link" if os.path.islink(path) else "not a directory"
            raise UnsafeDirectory(errno.EPERM, f"{path} is {kind}") from None
        raise
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise UnsafeDirectory(errno.EPERM, f"{path} is owned by uid {st.st_uid}, "
                                               f"not {os.geteuid()}")
        if st.st_mode & 0o077:
            raise UnsafeDirectory(errno.EPERM, f"{path} has mode "
                                               f"{stat.S_IMODE(st.st_mode):o}, not 700")
        kind = _SHARE_MAGIC.get(_fs_type(fd))
        if kind is not None:
            raise UnsafeDirectory(errno.EPERM, f"{path} is on {kind}, not a host directory")
        _check_ancestors(os.readlink(f"/proc/self/fd/{fd}"))
        return fd
    except BaseException:
        os.close(fd)
        raise


def ensure_private_dir(path: str) -> None:
    """open_private_dir's checks (and creation), for before anything in it is touched."""
    os.close(open_private_dir(path))


def bind_private(sock: socket.socket, path: str) -> None:
    """Bind AF_UNIX *sock* to *path*, whose directory open_private_dir makes or checks; the
    socket file is 0600 from its creation."""
    if len(os.fsencode(path)) >= _SUN_PATH_MAX:
        # the bind itself, through /proc/self/fd, would fit; the clients' connect would not
        raise OSError(errno.ENAMETOOLONG, f"{path}: AF_UNIX path too long")
    directory, name = os.path.split(os.path.abspath(path))
    fd = open_private_dir(directory)
    try:
        old_umask = os.umask(0o177)
        try:
            # through the checked directory's descriptor: a rename or symlink swapped in
            # after the check cannot move the bind elsewhere
            sock.bind(f"/proc/self/fd/{fd}/{name}")
        finally:
            os.umask(old_umask)
    finally:
        os.close(fd)
