"""The per-process syscall tables that install B's descriptions (commit) or A's (revert)."""

from __future__ import annotations

import fcntl
import os
import struct

from spfs.swap.arch import Nr
from spfs.swap.model import ProcessPlan
from spfs.swap.procfs import Lock
from spfs.swap.table import Addr, Entry, Load, SyscallTable

__all__ = ["SyscallTable", "build", "flock_struct"]

EPOLL_CTL_ADD = 1
F_SETLK = fcntl.F_SETLK
LOCK_TYPE = {"READ": fcntl.F_RDLCK, "WRITE": fcntl.F_WRLCK}


def flock_struct(lock: Lock) -> bytes:
    length = 0 if lock.end is None else lock.end - lock.start + 1
    return struct.pack("<hhxxxxqqixxxx", LOCK_TYPE[lock.access], os.SEEK_SET, lock.start, length, 0)


def build(process: ProcessPlan, donor_pid: int, *, forward: bool, do_fds: bool, do_dirs: bool,
          close_first: tuple[int, ...] = (), only: set[str] | None = None,
          fail_after: int | None = None) -> SyscallTable:
    """Install, in `process`, the B descriptions (forward) or the A ones (revert).

    Marks name what each part changes ("fd N", "root", "cwd"); `only` restricts a revert
    to the parts a failed commit had done.

    POSIX locks belong to the process and are dropped by any close of the inode, so they
    are checked on B through the temporary fd first (the switch fails before touching A if
    B's lock is taken), then taken again on the final fd right after the install.
    """
    table = SyscallTable()
    for stray in close_first:  # fds a failed run left behind (its temporaries)
        table.call(Nr.close, stray, allow_fail=True, what=f"close leftover fd {stray}")
    pidfd = table.slot()
    tmp = table.slot()
    table.call(Nr.pidfd_open, donor_pid, 0, store=pidfd, what="pidfd_open(manager)")
    relock: list[tuple[int, object]] = []
    if do_fds:
        for ref in process.fds:
            if only is not None and f"fd {ref.fd}" not in only:
                continue
            source_fd = ref.desc.new_fd if forward else ref.desc.old_fd
            table.call(Nr.pidfd_getfd, Load(pidfd), source_fd, 0, store=tmp, what=f"pidfd_getfd for fd {ref.fd}")
            locks = [table.blob(flock_struct(lock)) for lock in ref.posix_locks]
            if forward:
                for lock in locks:
                    table.call(Nr.fcntl, Load(tmp), F_SETLK, Addr(lock), what=f"lock check on B for fd {ref.fd}")
            table.call(Nr.dup3, Load(tmp), ref.fd, os.O_CLOEXEC if ref.cloexec else 0, what=f"dup3 onto fd {ref.fd}")
            table.mark(f"fd {ref.fd}")
            table.call(Nr.close, Load(tmp), what="close temporary fd")
            relock.extend((ref.fd, lock) for lock in locks)
        # Any close of an fd on an inode drops the process's POSIX locks on it (the temporary
        # fds above), so they are taken for good only after every install.
        for fd, lock in relock:
            table.call(Nr.fcntl, fd, F_SETLK, Addr(lock), allow_fail=not forward, what=f"POSIX lock on fd {fd}")
        for reg in process.epoll:
            if only is not None and f"fd {reg.target.tfd}" not in only:
                continue
            event = table.blob(struct.pack("<IQ", reg.target.events, reg.target.data))
            # On revert the A registration is still alive (we hold A's description): EEXIST is fine.
            table.call(Nr.epoll_ctl, reg.epfd, EPOLL_CTL_ADD, reg.target.tfd, Addr(event), allow_fail=not forward,
                       what=f"epoll_ctl ADD fd {reg.target.tfd} to epoll fd {reg.epfd}")
    if do_dirs:
        root = next((d for d in process.dirs if d.kind == "root"), None)
        if root is not None and (only is None or "root" in only):
            table.call(Nr.pidfd_getfd, Load(pidfd), root.new_fd if forward else root.old_fd, 0, store=tmp,
                       what="pidfd_getfd for root")
            table.call(Nr.fchdir, Load(tmp), what="fchdir to new root")
            table.call(Nr.chroot, Addr(table.blob(b".\0")), what="chroot")
            table.mark("root")
            table.call(Nr.close, Load(tmp), what="close temporary fd")
        for d in process.dirs:
            if d.kind in ("cwd", "cwd-kept") and (only is None or "cwd" in only or "root" in only):
                table.call(Nr.pidfd_getfd, Load(pidfd), d.new_fd if forward else d.old_fd, 0, store=tmp,
                           what="pidfd_getfd for cwd")
                table.call(Nr.fchdir, Load(tmp), what="fchdir to new cwd")
                table.mark("cwd")
                table.call(Nr.close, Load(tmp), what="close temporary fd")
    if fail_after is not None:  # clipped: a large value fails right after the last change
        table.entries.insert(min(fail_after, len(table.entries)), Entry(Nr.close, (-1,), None, False, "injected failure (test)"))
    table.call(Nr.close, Load(pidfd), what="close pidfd")
    return table
