"""Fd donors: the tasks pull B's open files with pidfd_getfd(pidfd_open(donor), fd).

A task can only name a process of its own pid namespace (or a descendant), so for tasks
in another pid namespace (containers) the manager forks a donor inside that namespace:
the child inherits every prepared fd under the same numbers and just waits for EOF on a
pipe (and dies with the manager: PR_SET_PDEATHSIG)."""

from __future__ import annotations

import contextlib
import os
import signal

from spfs.swap import procfs
from spfs.sys import namespaces
from spfs.sys.children import reap_or_kill
from spfs.sys.libc import libc

PR_SET_PDEATHSIG = 1


class Donor:
    """A child process living in the pid namespace of `pid`."""

    def __init__(self, pid: int, close_in_child: tuple[int, ...] = ()):
        own = os.open("/proc/self/ns/pid_for_children", os.O_RDONLY | os.O_CLOEXEC)
        theirs = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        read_end, self.write_end = os.pipe2(os.O_CLOEXEC)
        try:
            namespaces.setns(theirs, namespaces.CLONE_NEWPID)
            try:
                self.pid = os.fork()
                if self.pid == 0:  # the donor: no Python-level clean-up may run in here
                    try:
                        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                        os.close(self.write_end)
                        for fd in close_in_child:  # e.g. the decision pipe's write end: only the manager's
                            os.close(fd)
                        os.read(read_end, 1)
                    finally:
                        os._exit(0)
            finally:
                namespaces.setns(own, namespaces.CLONE_NEWPID)
        finally:
            os.close(own)
            os.close(theirs)
            os.close(read_end)
        self.ns_pid = procfs.status(self.pid).nspid[-1]

    def close(self, grace: float = 0.05) -> None:
        """EOF on its pipe ends it; but another child forked meanwhile (a second donor of a
        concurrent switch, a manager's helper) may hold a copy of our write end, so after a
        short grace it is killed: it has nothing left to do (every task has its fds by now).
        The grace is short: this runs while the container is frozen, and a second share's
        replace forking at the same time made each donor wait it out in full."""
        with contextlib.suppress(OSError):
            os.close(self.write_end)
        reap_or_kill(self.pid, grace)


def same_pid_namespace(pid: int) -> bool:
    return procfs.ns_inode(pid, "pid") == procfs.ns_inode("self", "pid")
