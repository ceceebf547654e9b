"""Binding a socket in one directory under an address that names another place.

A unix socket's address is the path string given to bind(); getsockname(), /proc/net/unix
and CRIU's next dump all read that string. When the target will be mounted where the
source is (the manager's replace), the process's new socket must be bound on the target yet
keep its old address, e.g. /mnt/nfs/app.sock, which names SPFS until the mounts move.

A worker (spfs.sys.forkserver) builds a private root where the address's directory is a
magic link to the target directory (/proc/self/fd/N), chroots into it and binds there: the kernel creates the
socket file in the target directory and records the address string as given. The worker's
mount namespace dies with it; the socket keeps only the target's directory.
"""

from __future__ import annotations

import errno
import os
import posixpath
import socket

from spfs.sys import forkserver, namespaces
from spfs.sys import mountapi as m
from spfs.sys.forkserver import Job

_PRIVATE_ROOT = "/tmp"  # a tmpfs is mounted over it, in the worker's namespace only
_CHILD_TIMEOUT_S = 10.0


def bind_named(sock: socket.socket, address: str, dir_fd: int, name: str) -> None:
    """Bind `sock` so its file is made as `name` in the directory `dir_fd` holds (opened
    below a share's root: no path of ours is looked up) and its address reads `address`."""
    parent, last = posixpath.split(address)
    if not posixpath.isabs(address) or parent in ("", "/") or not last:
        raise OSError(errno.EINVAL, f"cannot bind under the address {address!r}")
    if last != name:
        raise OSError(errno.EINVAL, f"the address {address!r} does not end in the socket's name {name!r}")
    try:
        forkserver.call(Job(_bind_in_private_root, (sock.fileno(), address, parent, dir_fd),
                            fds=(sock.fileno(), dir_fd), name="socket binder"), _CHILD_TIMEOUT_S)
    except OSError as exc:
        raise OSError(exc.errno, f"binding at {address!r} in the directory opened below the "
                                 f"target: {exc.strerror or exc}") from None


def _bind_in_private_root(sock_fd: int, address: str, parent: str, dir_fd: int) -> None:
    """In a worker: its mount namespace is its own, and dies with it."""
    namespaces.unshare(namespaces.CLONE_NEWNS)
    m.mount("none", "/", None, m.MS_REC | m.MS_PRIVATE, None)
    m.mount("tmpfs", _PRIVATE_ROOT, "tmpfs", 0, "mode=0700")
    os.mkdir(f"{_PRIVATE_ROOT}/proc")
    m.mount("/proc", f"{_PRIVATE_ROOT}/proc", None, m.MS_BIND | m.MS_REC, None)
    grandparent = posixpath.dirname(parent)
    os.makedirs(_PRIVATE_ROOT + grandparent, exist_ok=True)
    os.symlink(f"/proc/self/fd/{dir_fd}", _PRIVATE_ROOT + parent)
    os.chroot(_PRIVATE_ROOT)
    os.chdir("/")
    socket.socket(fileno=sock_fd).bind(address)
