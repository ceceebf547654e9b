"""Opening the proxy target directory, optionally inside another process's mount namespace.

setns(CLONE_NEWNS) is refused to multithreaded processes (and the daemon has threads), so
a forked single-threaded child joins the namespace, opens the directory and passes the
descriptor back over a socketpair with SCM_RIGHTS.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat

from spfs.sys import namespaces

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


def _open_in_namespace(path: str, ns_pid: int) -> int:
    ns_fd = os.open(f"/proc/{ns_pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
        if pid == 0:  # child: only raw syscalls, then _exit, whatever happens
            status = 1
            try:
                parent_sock.close()
                namespaces.setns(ns_fd, namespaces.CLONE_NEWNS)
                fd = os.open(path, O_PATH_DIR)
                socket.send_fds(child_sock, [b"ok"], [fd])
                status = 0
            except OSError as exc:
                try:
                    child_sock.send(f"{exc.errno}:{exc.strerror}".encode())
                except OSError:
                    pass
            finally:
                os._exit(status)
        child_sock.close()
        parent_sock.settimeout(_CHILD_TIMEOUT_S)
        try:
            message, fds, _flags, _addr = socket.recv_fds(parent_sock, 256, 1)
        except socket.timeout:
            os.kill(pid, 9)
            raise TargetError(110, f"opening {path} in the mount namespace of pid {ns_pid} "
                                   f"timed out") from None
        finally:
            os.waitpid(pid, 0)
        if fds:
            return fds[0]
        code, _, text = message.decode(errors="replace").partition(":")
        raise TargetError(int(code) if code.isdigit() else 5,
                          f"cannot open {path} in the mount namespace of pid {ns_pid}: {text}")
    finally:
        parent_sock.close()
        child_sock.close()
        os.close(ns_fd)


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
