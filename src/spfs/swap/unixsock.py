"""Unix sockets bound on the source: found with sock_diag (pyroute2), re-created on B.

A bound socket pins its mount through the socket file, and a socket cannot be re-bound,
so the task gets a new socket of the same type bound at the same path on B.  Listeners
keep accepting; datagrams queued on a bound socket are copied over (peeked, so a revert
loses nothing).  What cannot be moved: connections queued on a listener but not yet
accepted (no kernel interface moves them between listeners: the switch refuses while any
are queued), the peer of connected sockets (they keep their old peer), connections already accepted from a
listener on A (they keep A busy until they close), SCM payloads.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

from pyroute2 import DiagSocket
from pyroute2.netlink.diag import UDIAG_SHOW_NAME, UDIAG_SHOW_RQLEN, UDIAG_SHOW_VFS

from spfs.swap import sockname
from spfs.sys import namespaces
from spfs.sys.beneath import Share, Staged, chmod_chown, magic_path

T = TypeVar("T")
SO_PEEK_OFF = 42
SIOCGSKNS = 0x894C  # a socket's network namespace, as an fd
TCP_LISTEN = 10
TCP_CLOSE = 7
COPIED_OPTIONS = (socket.SO_PASSCRED, socket.SO_RCVBUF, socket.SO_SNDBUF)
SUN_PATH_MAX = 108


@dataclass(frozen=True)
class BoundSocket:
    ino: int  # socket inode (the number in "socket:[N]")
    type: int
    listening: bool
    path: str  # as bound
    backlog: int
    file_ino: int = 0  # the socket file's inode on the source (its device is the source's)


def in_netns(ns_fd: int | None, work: Callable[[], T]) -> T:
    """Run `work` in a thread that joined the network namespace `ns_fd` (sockets are made in
    their creator's netns, and sock_diag sees only its own); our other threads stay put."""
    if ns_fd is None:
        return work()
    box: dict[str, object] = {}

    def run() -> None:
        try:
            namespaces.setns(ns_fd, namespaces.CLONE_NEWNET)
            box["value"] = work()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="netns-worker")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def bound_on(dev: int, pids: Iterable[int] = ()) -> dict[int, BoundSocket]:
    """Unix sockets whose socket file is on device `dev`, in our network namespace and in
    that of each of `pids` (a container's)."""
    out: dict[int, BoundSocket] = {}
    seen = {os.stat("/proc/self/ns/net").st_ino}
    out.update(_bound_here(dev))
    for pid in pids:
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
            if ino in seen:
                continue
            seen.add(ino)
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # gone, or not ours to look at
        try:
            out.update(in_netns(fd, lambda: _bound_here(dev)))
        finally:
            os.close(fd)
    return out


def _bound_here(dev: int) -> dict[int, BoundSocket]:
    out: dict[int, BoundSocket] = {}
    with DiagSocket() as diag:
        diag.bind()
        # Listeners and unconnected (bound) datagram sockets; connections accepted from a
        # listener on A also hold the path, but a connected stream cannot be re-created.
        for msg in diag.get_sock_stats(states=(1 << TCP_LISTEN) | (1 << TCP_CLOSE),
                                       show=UDIAG_SHOW_VFS | UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN):
            vfs = msg.get_attr("UNIX_DIAG_VFS")
            if not vfs:
                continue
            kdev = vfs["udiag_vfs_dev"]
            if os.makedev(kdev >> 20, kdev & 0xFFFFF) != dev:
                continue
            rq = msg.get_attr("UNIX_DIAG_RQLEN") or {}
            listening = msg["udiag_state"] == TCP_LISTEN
            out[msg["udiag_ino"]] = BoundSocket(msg["udiag_ino"], msg["udiag_type"], listening,
                                                msg.get_attr("UNIX_DIAG_NAME") or "",
                                                rq.get("udiag_wqueue", socket.SOMAXCONN) if listening else 0,
                                                vfs["udiag_vfs_ino"])
    return out


def recreate(sock: BoundSocket, target: Share, rel: str, old_fd: int, flags: int, address: str,
             staged: dict[int, Staged]) -> int:
    """A socket like the old one, its address reading `address` (see sockname.py), its
    file made beside `rel` on the target share in a staging directory (`staged[sock.ino]`):
    in a replace the file at `rel` is the very one the old socket is bound to (the source
    proxies onto the target) and the container is still sending to it, so the new file
    takes the name only while the tasks are stopped (Staged.place, from the handover)."""
    with socket.socket(fileno=os.dup(old_fd)) as old:
        options = {opt: old.getsockopt(socket.SOL_SOCKET, opt) for opt in COPIED_OPTIONS}
    try:  # the new socket lives where the old one does (CRIU dumps a netns's sockets)
        ns_fd: int | None = fcntl.ioctl(old_fd, SIOCGSKNS)
    except OSError:
        ns_fd = None
    try:
        new = in_netns(ns_fd, lambda: socket.socket(socket.AF_UNIX, sock.type | socket.SOCK_CLOEXEC))
    finally:
        if ns_fd is not None:
            os.close(ns_fd)
    try:
        stage = target.stage(rel, kinds=(stat.S_IFSOCK,))
        staged[sock.ino] = stage
        if address.startswith("/proc/"):
            # a target reached through a magic link: no address could name its place
            # for the process anyway, and a private root cannot be built under /proc
            new.bind(_through(stage.stage_fd, stage.name))
        else:
            sockname.bind_named(new, address, stage.stage_fd, stage.name)
        for opt, value in options.items():
            new.setsockopt(socket.SOL_SOCKET, opt, value)
        if sock.listening:
            new.listen(sock.backlog)
        new.setblocking(not flags & os.O_NONBLOCK)
        return new.detach()
    except BaseException:
        new.close()
        raise


def give_file_attributes(stage: Staged, owner: os.stat_result) -> None:
    """Owner and mode of the old socket file (`owner`) given to the new one, made in its
    staging directory."""
    made_fd = stage.hold_made()
    try:
        chmod_chown(made_fd, owner.st_mode, owner.st_uid, owner.st_gid)
    finally:
        os.close(made_fd)


def _through(dir_fd: int, name: str) -> str:
    """A socket address reaching `name` in the directory `dir_fd` holds, by its magic link."""
    to = f"{magic_path(dir_fd)}/{name}"
    if len(os.fsencode(to)) >= SUN_PATH_MAX:
        raise OSError(errno.ENAMETOOLONG, f"socket file name {name!r} is too long for a socket address")
    return to


def has_queued_connections(listener_fd: int) -> bool:
    poller = select.poll()
    poller.register(listener_fd, select.POLLIN)
    return bool(poller.poll(0))


def copy_datagrams(old_fd: int, new_fd: int, stage: Staged) -> int:
    """Queue on the new socket (its file still in its staging directory: the name is the
    old socket's until placed) a copy of every datagram waiting on the old one (peeked).
    Sent through the staging directory's descriptor, so no lookup from our root can reach
    another socket."""
    to = _through(stage.stage_fd, stage.name)
    with socket.socket(fileno=os.dup(old_fd)) as old, socket.socket(fileno=os.dup(new_fd)) as new:
        previous = old.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF)
        old.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        copied = 0
        try:
            while True:
                try:
                    data = old.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                new.sendto(data, to)
                copied += 1
        finally:
            old.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, previous)
        return copied
