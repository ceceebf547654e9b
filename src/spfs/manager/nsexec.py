"""Run a function inside another process's namespaces, in a forked child, with a time bound.

setns(2) into a user namespace, and into a mount namespace while sharing fs_struct with other
threads, is refused in a multi-threaded process, and a UTS/user namespace cannot be left once
joined: so the work runs in a fork.  The child must not take locks another thread may hold
(no logging); it reports back over a socketpair, with file descriptors as SCM_RIGHTS.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from spfs.sys import namespaces
from spfs.sys.children import reap_or_kill

NS_ORDER = (  # user first: it grants the capabilities needed to join the others
    ("user", namespaces.CLONE_NEWUSER),
    ("uts", namespaces.CLONE_NEWUTS),
    ("net", namespaces.CLONE_NEWNET),
    ("mnt", namespaces.CLONE_NEWNS),
)
_MAX_REPLY = 1 << 20
_MAX_FDS = 64


@dataclass(frozen=True)
class Namespaces:
    """The namespaces of `pid` to join (only those that differ from ours), then chroot."""

    pid: int
    kinds: tuple[str, ...] = ("user", "uts", "net", "mnt")
    root: str | None = None


@dataclass
class ChildResult:
    value: Any = None
    fds: list[int] | None = None


class ChildError(OSError):
    """The work failed in the child; errno and message come from there."""


def _ns_differs(pid: int, kind: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino != os.stat(f"/proc/self/ns/{kind}").st_ino


def open_namespace_fds(target: Namespaces) -> list[tuple[int, int]]:
    """Open the namespace files in the parent, so a vanished pid is a clear error here."""
    opened: list[tuple[int, int]] = []
    try:
        for kind, flag in NS_ORDER:
            if kind in target.kinds and _ns_differs(target.pid, kind):
                opened.append((os.open(f"/proc/{target.pid}/ns/{kind}", os.O_RDONLY |
                                       os.O_CLOEXEC), flag))
    except OSError:
        for fd, _ in opened:
            os.close(fd)
        raise
    return opened


def _enter(ns_fds: list[tuple[int, int]], root: str | None) -> None:
    for fd, flag in ns_fds:
        if flag == namespaces.CLONE_NEWNS:
            # joining a mount ns needs a private fs_struct; harmless when already private
            namespaces.unshare(namespaces.CLONE_FS)
        namespaces.setns(fd, flag)
    if root is not None:
        os.chroot(root)
        os.chdir("/")


def _child(sock: socket.socket, ns_fds: list[tuple[int, int]], root: str | None,
           work: Callable[[], ChildResult]) -> None:
    code = 1
    try:
        try:
            _enter(ns_fds, root)
            result = work()
            payload = json.dumps({"ok": True, "value": result.value}).encode()
            socket.send_fds(sock, [payload], result.fds or [])
            code = 0
        except OSError as exc:
            message = json.dumps({"ok": False, "errno": exc.errno or errno.EIO,
                                  "message": str(exc)})
            sock.sendall(message.encode())
        except BaseException as exc:  # report anything: the parent must never hang
            message = json.dumps({"ok": False, "errno": errno.EIO,
                                  "message": f"{type(exc).__name__}: {exc}",
                                  "trace": traceback.format_exc()[-2000:]})
            sock.sendall(message.encode())
    finally:
        os._exit(code)


def run_in_namespaces(target: Namespaces | None, work: Callable[[], ChildResult],
                      timeout: float) -> ChildResult:
    """Fork, join `target`'s namespaces, run `work`; kill the child after `timeout` s."""
    ns_fds = open_namespace_fds(target) if target else []
    try:
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with parent_sock:
            with child_sock:
                pid = os.fork()
                if pid == 0:
                    parent_sock.close()
                    _child(child_sock, ns_fds, target.root if target else None, work)
            return _collect(pid, parent_sock, timeout)
    finally:
        for fd, _ in ns_fds:
            os.close(fd)


def _collect(pid: int, sock: socket.socket, timeout: float) -> ChildResult:
    deadline = time.monotonic() + timeout
    try:
        sock.settimeout(timeout)
        try:
            payload, fds, _, _ = socket.recv_fds(sock, _MAX_REPLY, _MAX_FDS)
        except socket.timeout:
            os.kill(pid, signal.SIGKILL)
            raise OSError(errno.ETIMEDOUT, f"namespace worker gave no answer in {timeout} s")
    finally:
        # it exits right after answering; bound the wait anyway
        reap_or_kill(pid, max(0.0, deadline - time.monotonic()))
    if not payload:
        raise ChildError(errno.EIO, "namespace worker died without an answer")
    reply = json.loads(payload)
    if not reply["ok"]:
        for fd in fds:
            os.close(fd)
        raise ChildError(reply["errno"], reply["message"])
    return ChildResult(reply["value"], fds)
