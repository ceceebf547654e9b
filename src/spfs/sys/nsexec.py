"""Run a function inside another process's namespaces, in a worker, with a time bound.

setns(2) into a user namespace, and into a mount namespace while sharing fs_struct with other
threads, is refused in a multi-threaded process, and a UTS/user namespace cannot be left once
joined: so the work runs in a worker of the fork server (spfs.sys.forkserver), a clean
single-threaded child that sees only the descriptors the work names. The work is a
module-level function (it travels by name) and answers with a ChildResult.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from spfs.sys import forkserver, namespaces
from spfs.sys.forkserver import Job

NS_ORDER = (  # user first: it grants the capabilities needed to join the others
    ("user", namespaces.CLONE_NEWUSER),
    ("uts", namespaces.CLONE_NEWUTS),
    ("net", namespaces.CLONE_NEWNET),
    ("mnt", namespaces.CLONE_NEWNS),
)


@dataclass(frozen=True)
class Namespaces:
    """The namespaces of `pid` to join (only those that differ from ours), then chroot."""

    pid: int
    kinds: tuple[str, ...] = ("user", "uts", "net", "mnt")
    root: str | None = None


ChildResult = forkserver.JobResult
ChildError = forkserver.JobError  # the work failed in the worker; errno and message from there


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


def _in_namespaces(ns_fds: list[tuple[int, int]], root: str | None, work: Callable[..., Any],
                   args: tuple[Any, ...]) -> Any:
    _enter(ns_fds, root)
    for fd, _ in ns_fds:
        os.close(fd)
    return work(*args)


def run_in_namespaces(target: Namespaces | None, work: Callable[..., Any], timeout: float, *,
                      args: tuple[Any, ...] = (), fds: tuple[int, ...] = ()) -> ChildResult:
    """Join `target`'s namespaces in a worker and run `work(*args)` there (`fds`: the
    descriptors it uses, under the same numbers); the worker is killed after `timeout` s."""
    ns_fds = open_namespace_fds(target) if target else []
    try:
        job = Job(_in_namespaces, (ns_fds, target.root if target else None, work, args),
                  fds=(*(fd for fd, _ in ns_fds), *fds), name=getattr(work, "__name__", ""))
        return forkserver.call(job, timeout)
    finally:
        for fd, _ in ns_fds:
            os.close(fd)
