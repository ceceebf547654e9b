"""Opening the proxy target directory, optionally inside another process's mount namespace.

setns(CLONE_NEWNS) is refused to multithreaded processes (and the daemon has threads), so
the namespace runner (spfs.sys.nsexec: a worker of the fork server, started before the
daemon's threads) joins the namespace, opens the directory and hands the descriptor back.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat

from spfs.sys.forkserver import JobResult
from spfs.sys.nsexec import Namespaces, run_in_namespaces

O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_CHILD_TIMEOUT_S = 10.0


class TargetError(OSError):
    """The proxy directory could not be opened."""


@dataclasses.dataclass(frozen=True)
class TargetDir:
    fd: int          # O_PATH descriptor of the directory
    path: str        # as given, for logs and status
    ns_pid: int | None
    dev: int
    ino: int


def _open_here(path: str) -> int:
    return os.open(path, O_PATH_DIR)


def _open_dir(path: str) -> JobResult:
    return JobResult(None, [os.open(path, O_PATH_DIR)])


def _open_in_namespace(path: str, ns_pid: int) -> int:
    try:
        result = run_in_namespaces(Namespaces(ns_pid, kinds=("mnt",)), _open_dir,
                                   _CHILD_TIMEOUT_S, args=(path,))
    except OSError as exc:
        raise TargetError(exc.errno or errno.EIO, f"cannot open {path} in the mount namespace "
                                                  f"of pid {ns_pid}: {exc.strerror or exc}") from None
    return result.fds[0]


def open_target(path: str, ns_pid: int | None = None) -> TargetDir:
    """Open *path* as the proxy target; raises TargetError with a clear message."""
    if not path:
        raise TargetError(22, "a proxy directory is required for proxy mode")
    try:
        fd = _open_in_namespace(path, ns_pid) if ns_pid else _open_here(path)
    except TargetError:
        raise
    except OSError as exc:
        where = f" in the mount namespace of pid {ns_pid}" if ns_pid else ""
        raise TargetError(exc.errno or 5, f"cannot open proxy directory {path}{where}: "
                                          f"{exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISDIR(st.st_mode):
        os.close(fd)
        raise TargetError(20, f"proxy directory {path} is not a directory")
    return TargetDir(fd=fd, path=path, ns_pid=ns_pid, dev=st.st_dev, ino=st.st_ino)
