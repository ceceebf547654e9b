"""Opening the proxy target directory, optionally inside another process's mount namespace.

setns(CLONE_NEWNS) is refused to multithreaded processes (and the daemon has threads), so
a worker of the fork server (spfs.sys.forkserver, started before the daemon's threads) joins
the namespace, opens the directory and hands the descriptor back.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat

from spfs.sys import forkserver, namespaces
from spfs.sys.forkserver import Job, JobResult

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


def _open_in(ns_fd: int, path: str) -> JobResult:
    namespaces.setns(ns_fd, namespaces.CLONE_NEWNS)
    return JobResult(None, [os.open(path, O_PATH_DIR)])


def _open_in_namespace(path: str, ns_pid: int) -> int:
    ns_fd = os.open(f"/proc/{ns_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        result = forkserver.call(Job(_open_in, (ns_fd, path), fds=(ns_fd,),
                                     name="proxy directory"), _CHILD_TIMEOUT_S)
    except OSError as exc:
        raise TargetError(exc.errno or errno.EIO, f"cannot open {path} in the mount namespace "
                                                  f"of pid {ns_pid}: {exc.strerror or exc}") from None
    finally:
        os.close(ns_fd)
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
