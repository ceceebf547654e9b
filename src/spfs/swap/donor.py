"""Fd donors: the tasks pull B's open files with pidfd_getfd(pidfd_open(donor), fd).

A task can only name a process of its own pid namespace (or a descendant), so for tasks
in another pid namespace (containers) a donor is forked inside that namespace: a worker of
the fork server joins it for its children and forks the donor, which holds the prepared fds
under the manager's numbers and nothing else, and waits for end of file on a pipe whose
write end only the manager holds (so it also ends when the manager dies)."""

from __future__ import annotations

import contextlib
import os
import select
import signal

from spfs.swap import procfs
from spfs.sys import forkserver, namespaces
from spfs.sys.forkserver import Job, JobResult

START_TIMEOUT = 30.0
KILL_WAIT = 2.0


def _fork_donor(pid_ns: int, wait_fd: int, held: list[int]) -> JobResult:
    """In the worker: the donor is our child in the task's pid namespace; we answer with its
    pid, then stay its parent until it ends (reaped here, it leaves no zombie in the
    container for anyone to find). We let go of the files at once: once the donor is gone,
    nothing may hold them (the source is unmounted right after a switch)."""
    namespaces.setns(pid_ns, namespaces.CLONE_NEWPID)
    os.close(pid_ns)
    donor = os.fork()
    if donor == 0:
        try:
            os.read(wait_fd, 1)
        finally:
            os._exit(0)
    for fd in (wait_fd, *held):
        os.close(fd)
    return JobResult(donor, after=lambda: _reap(donor))


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


class Donor:
    """A process living in the pid namespace of `pid`, holding `fds` under their numbers."""

    def __init__(self, pid: int, fds: list[int]) -> None:
        theirs = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        try:
            result = forkserver.call(Job(_fork_donor, (theirs, read_end, list(fds)),
                                         fds=(theirs, read_end, *fds), name="fd donor"),
                                     START_TIMEOUT)
        except BaseException:
            os.close(self.write_end)
            raise
        finally:
            os.close(theirs)
            os.close(read_end)
        self.pid = int(result.value)
        self.pidfd = os.pidfd_open(self.pid)  # it cannot end before we close write_end
        self.ns_pid = procfs.status(self.pid).nspid[-1]

    def close(self, grace: float = 0.05) -> None:
        """End of file on its pipe ends it; after a short `grace` it is killed (this runs
        while the container is frozen, and it has nothing left to do), and its end, which
        lets go of the files it held, is waited for (bounded)."""
        with contextlib.suppress(OSError):
            os.close(self.write_end)
        if self.pidfd < 0:
            return
        try:
            if not select.select([self.pidfd], [], [], grace)[0]:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                select.select([self.pidfd], [], [], KILL_WAIT)
        finally:
            os.close(self.pidfd)
            self.pidfd = -1


def same_pid_namespace(pid: int) -> bool:
    return procfs.ns_inode(pid, "pid") == procfs.ns_inode("self", "pid")
