"""The manager-side part of the stop window: state that lives in open file descriptions
or kernel objects the manager shares with the tasks, moved without any injection
(offsets, FIFO content, datagram queues, inotify watches), and finding the locks the
injected tables must take (POSIX, flock and OFD: see assign_lock_takers)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from spfs.swap import inotify, procfs, tables, unixsock
from spfs.swap.model import Description, InotifyReg, ProcessPlan, ListenerBusy, SwapPlan
from spfs.sys.beneath import magic_path
from spfs.sys.libc import libc as _libc

if TYPE_CHECKING:
    from spfs.swap.prepare import Prepared

log = logging.getLogger(__name__)

SPLICE_F_NONBLOCK = 2


def find_locks(plan: SwapPlan, stopped: list[ProcessPlan]) -> None:
    """Current locks, cheaply: one F_GETLK probe per description (our reference is another
    lock owner, so any POSIX or OFD lock on the file shows up); fdinfo is read only for the
    holders of a locked file.  flock locks are not visible to F_GETLK: those seen at
    discovery are re-read here (a flock taken between discovery and the stop is missed)."""
    owner_of = {p.pid: p for p in stopped}
    probe = tables.flock_struct(procfs.Lock("POSIX", "ADVISORY", "WRITE", 0, 0, None))
    for desc in plan.descriptions:
        if desc.flags & os.O_PATH:
            continue
        try:
            found = struct.unpack("<h", fcntl.fcntl(desc.old_fd, fcntl.F_GETLK, probe)[:2])[0]
        except OSError:
            found = fcntl.F_UNLCK
        if found == fcntl.F_UNLCK and not desc.locks:
            continue
        desc.locks = []
        for pid, fd in desc.holders:
            try:
                info = procfs.fdinfo(pid, fd)
            except FileNotFoundError:
                continue
            for lock in info.locks:
                if lock.kind in ("FLOCK", "OFDLCK"):
                    if lock not in desc.locks:
                        desc.locks.append(lock)
                elif lock.kind == "POSIX":
                    p = owner_of[pid]
                    owner = owner_of.get(p.fd_table_of, p) if p.fd_table_of else p  # locks belong to the fd table
                    ref = next((r for r in owner.fds if r.fd == fd), None)
                    if ref is not None:
                        ref.posix_locks.append(lock)


def assign_lock_takers(plan: SwapPlan, units: list[ProcessPlan]) -> None:
    """Choose, for each description with flock or OFD locks, the one (process, fd) whose
    table takes them on B.  A flock records the pid of its taker as its holder (/proc/locks,
    fdinfo; CRIU's dump reads it), and so does an OFD lock on NFSv3 (the NLM client records
    it as a POSIX lock): taken by the manager they would name the manager, a dead pid once
    it exits.  The task that held the lock on A takes it when it holds the description,
    else the first one that does; taking it twice on one description would be a no-op."""
    candidates: dict[int, list[tuple[int, int, int]]] = {}  # desc index -> (unit pid, holder pid, fd)
    for p in units:
        for ref in p.fds:
            candidates.setdefault(ref.desc.index, []).append((p.pid, ref.pid, ref.fd))
    for desc in plan.descriptions:
        desc.lock_taker = None
        found = candidates.get(desc.index)
        if not desc.locks or not found:
            continue  # no task installs this description on B: a lock on it would hold nothing
        holders = {lock.pid for lock in desc.locks}
        unit, _, fd = next((c for c in found if c[0] in holders or c[1] in holders), found[0])
        desc.lock_taker = (unit, fd)


def move_description_state(plan: SwapPlan, prepared: "Prepared") -> None:
    """Offsets, FIFO and datagram contents: set on B from here; new socket files take their
    names (the tasks are stopped: nothing sends meanwhile).  Locks are the tasks' own work
    (assign_lock_takers, tables.py)."""
    copied_fifos: set[str] = set()
    for desc in plan.descriptions:
        if (stat.S_ISREG(desc.mode) or stat.S_ISDIR(desc.mode)) and not desc.flags & os.O_PATH:
            _copy_offset(desc)
        if stat.S_ISSOCK(desc.mode):
            if desc.sock.listening and unixsock.has_queued_connections(desc.old_fd):
                raise ListenerBusy(f"listening socket {desc.rel} has connections not yet accepted; they cannot "
                                   "be moved to a new listener: let the tasks run, then switch again")
            stage = prepared.staged_sockets[desc.sock.ino]
            if not desc.sock.listening:
                unixsock.copy_datagrams(desc.old_fd, desc.new_fd, stage)
            if not stage.placed:
                stage.place()
        if stat.S_ISFIFO(desc.mode) and desc.rel not in copied_fifos:
            copied_fifos.add(desc.rel)
            _copy_pipe_content(desc.old_fd, prepared.fifo_keepers[desc.rel])


def move_inotify_watches(plan: SwapPlan, processes: list[ProcessPlan], forward: bool,
                         before_move: Callable[[InotifyReg], None] | None = None) -> None:
    """Watches on A are re-added on B through our copy of the inotify fd (see inotify.py);
    backwards for a revert.  before_move(reg) runs before each forward move (the watchdog
    learns how to undo it).  Both ends are reached through the O_PATH descriptors prepare
    opened below the shares' roots, never by a path."""
    for p in processes:
        for reg in p.inotify:
            if forward:
                if before_move is not None:
                    before_move(reg)
                reg.new_wd = inotify.add_watch(reg.copy_fd, magic_path(reg.target_fd), reg.watch.mask)
                inotify.remove_watch(reg.copy_fd, reg.watch.wd)
            elif reg.new_wd >= 0:
                with contextlib.suppress(OSError):
                    inotify.add_watch(reg.copy_fd, magic_path(reg.source_fd), reg.watch.mask)
                    inotify.remove_watch(reg.copy_fd, reg.new_wd)


def _copy_offset(desc: Description) -> None:
    pos = os.lseek(desc.old_fd, 0, os.SEEK_CUR)
    if stat.S_ISDIR(desc.mode) and pos:
        log.warning("directory %s read to offset %d: directory offsets do not carry over, restarting at 0",
                    desc.rel, pos)
        pos = 0
    os.lseek(desc.new_fd, pos, os.SEEK_SET)


def _copy_pipe_content(fifo_fd: int, keeper: int) -> None:
    """Duplicate what is buffered in the source FIFO into the target FIFO (tee: non-destructive)."""
    reader = os.open(f"/proc/self/fd/{fifo_fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = fcntl.fcntl(reader, fcntl.F_GETPIPE_SZ)
        while True:
            copied = _libc.tee(reader, keeper, ctypes.c_size_t(size), SPLICE_F_NONBLOCK)
            err = ctypes.get_errno() if copied < 0 else 0
            if err != errno.EINTR:
                break
        if copied < 0 and err != errno.EAGAIN:  # EAGAIN: empty pipe
            raise OSError(err, "tee from the source FIFO")
    finally:
        os.close(reader)
