"""The per-process syscall table of a commit: install B, park, then commit or undo.

One table per fd table / mm / fs struct, laid out as a small program (labels below):

    forward     keep a reference to every A object in the task itself (dup of the fd,
                A's file for a mapping or the exe, O_PATH of root and cwd), install B's
    PARK_OK     tgkill(marker): the live manager sees the stop, the task is parked
    CLEANUP_*   only after a failed forward step: close what it left open
    PARK_FAILED tgkill(marker) after a failure
    DECISION    read(decision pipe, 1 byte): a byte = commit; end of file = the manager
                closed the pipe (abort) or died: undo
    COMMIT      close the kept A references, add 1 to the done counter (an eventfd), end
    UNDO        put every kept A reference back where the forward part had installed
                B's (each part only if the forward part had done it), add the 1

The decision is one write of one byte per parked task into a pipe whose write end only
the manager holds: that write is the commit point.  A task parked before it reverts by
itself, with or without a live manager; a task that has not run its forward part yet was
never changed.  So a killed manager leaves every task on A, or (killed after the write)
every task on B.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass, field

from spfs.swap.arch import Nr
from spfs.swap.model import FdRef, MapRef, ProcessPlan
from spfs.swap.procfs import Lock
from spfs.swap.table import END, PARK_FAILED, PARK_OK, Addr, Entry, Late, Load, Ref, SyscallTable

__all__ = ["Pipes", "SyscallTable", "build", "flock_struct"]

EPOLL_CTL_ADD = 1
F_SETLK = fcntl.F_SETLK
F_OFD_SETLK = 37
LOCK_SH, LOCK_EX, LOCK_NB = fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_NB
F_DUPFD_CLOEXEC = 1030
AT_FDCWD = -100
O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
LOCK_TYPE = {"READ": fcntl.F_RDLCK, "WRITE": fcntl.F_WRLCK}
CLEANUP_EXE, CLEANUP_SCRATCH, CLEANUP_TMP = "cleanup exe", "cleanup scratch", "cleanup tmp"
DECISION, UNDO = "decision", "undo"


@dataclass(frozen=True)
class Pipes:
    """The manager's (and donors') fd numbers of the decision pipe's read end and the done
    eventfd: each task takes its own copy with pidfd_getfd."""

    decision: int
    done: int


def flock_struct(lock: Lock) -> bytes:
    length = 0 if lock.end is None else lock.end - lock.start + 1
    return struct.pack("<hhxxxxqqixxxx", LOCK_TYPE[lock.access], os.SEEK_SET, lock.start, length, 0)


@dataclass
class _Kept:
    """Slots holding the task's own references to A, filled by the forward part."""

    fds: list[tuple[object, Ref]] = field(default_factory=list)  # (FdRef, keep slot)
    maps: list[tuple[MapRef, Ref, Ref]] = field(default_factory=list)  # (mapping, A file, "remapped" slot)
    # One fd per distinct file, shared by all its mappings (a task may have more mappings
    # than its RLIMIT_NOFILE allows fds), by the manager's fd of that file: A's, kept for
    # an undo, and B's, mapped from.  Both stay open until the decision is carried out.
    map_sources: dict[int, Ref] = field(default_factory=dict)
    map_targets: dict[int, Ref] = field(default_factory=dict)
    exe: tuple[object, Ref, Ref] | None = None  # (prctl_mm_map for A, slot of A's file in it, "done" slot)
    exe_new: Ref | None = None  # B's exe while the forward prctl runs
    root: tuple[Ref, Ref] | None = None  # (O_PATH of the old root, "done" slot)
    cwd: Ref | None = None

    def all_slots(self) -> list[Ref]:
        out = [keep for _, keep in self.fds] + list(self.map_sources.values()) + list(self.map_targets.values())
        if self.exe is not None:
            out.append(self.exe[1])
        if self.root is not None:
            out.append(self.root[0])
        if self.cwd is not None:
            out.append(self.cwd)
        return out


def build(process: ProcessPlan, donor_pid: int, pipes: Pipes, *, do_fds: bool, do_dirs: bool,
          do_maps: bool = False, scratch: int = 0, scratch_size: int = 0,
          fail_after: int | None = None) -> SyscallTable:
    """The commit table of `process` (see the module doc).  The park entries need the late
    values "tgid", "tid" and "sig" (the marker) at serialization.

    POSIX locks belong to the process and are dropped by any close of the inode, so they
    are checked on B through the temporary fd first (the switch fails before touching A if
    B's lock is taken), then taken again on the final fd right after the install.  flock
    and OFD locks belong to the description: the table of its taker (desc.lock_taker, see
    handover.assign_lock_takers) takes them on the temporary fd, before the install; taken
    by someone else on B, the step fails and the switch reverts.
    """
    t = SyscallTable()
    pidfd, tmp, decision, done = t.slot(), t.slot(), t.slot(), t.slot()
    byte, one = t.slot(), t.blob(struct.pack("<Q", 1))  # the decision read into; what the done counter gets
    kept = _Kept()
    t.call(Nr.pidfd_open, donor_pid, 0, store=pidfd, jump=PARK_FAILED, what="pidfd_open(manager)")
    t.call(Nr.pidfd_getfd, Load(pidfd), pipes.decision, 0, store=decision, jump=PARK_FAILED,
           what="pidfd_getfd for the decision pipe")
    t.call(Nr.pidfd_getfd, Load(pidfd), pipes.done, 0, store=done, jump=PARK_FAILED,
           what="pidfd_getfd for the done counter")
    if do_fds:
        _forward_fds(t, process, pidfd, tmp, kept)
    if do_maps:
        _forward_mappings(t, pidfd, process.maps, scratch, process.nspid, kept)
        if process.exe is not None:
            _forward_exe(t, pidfd, process.exe, kept)
    if do_dirs:
        _forward_dirs(t, process, pidfd, tmp, kept)
    t.boundaries.append(len(t.entries))
    if fail_after is not None:
        _insert_test_failure(t, fail_after)

    t.label(PARK_OK)
    t.call(Nr.tgkill, Late("tgid"), Late("tid"), Late("sig"), what="park (forward part done)")
    t.skip_to(DECISION, "go to the decision")
    t.label(CLEANUP_EXE)
    if kept.exe is not None:
        t.call(Nr.close, Load(kept.exe_new), allow_fail=True, what="close B's exe after a failure")
        t.skip_to(PARK_FAILED, "go to the failed park")
    t.label(CLEANUP_SCRATCH)
    if scratch and scratch_size:
        t.call(Nr.munmap, scratch, scratch_size, allow_fail=True, what="drop scratch after a failure")
        # no temporary fd is open during a remap (the mapped files have slots of their own)
        t.skip_to(PARK_FAILED, "go to the failed park")
    t.label(CLEANUP_TMP)
    t.call(Nr.close, Load(tmp), allow_fail=True, what="close the temporary fd after a failure")
    t.label(PARK_FAILED)
    t.call(Nr.tgkill, Late("tgid"), Late("tid"), Late("sig"), what="park (forward part failed)")

    t.label(DECISION)
    t.call(Nr.read, Load(decision), Addr(byte), 1, zero_fails=True, jump=UNDO, what="read the decision")
    for slot in kept.all_slots():
        t.call(Nr.close, Load(slot), allow_fail=True, what="close a kept reference (commit)")
    _finish(t, one, pidfd, decision, done)
    t.skip_to(END, "committed: skip the undo part")

    t.label(UNDO)
    _undo(t, process, kept, scratch, process.nspid)
    _finish(t, one, pidfd, decision, done)
    return t


def _finish(t: SyscallTable, one: Ref, pidfd: Ref, decision: Ref, done: Ref) -> None:
    """Tell the manager this task no longer holds anything of the switch, close the rest."""
    t.call(Nr.write, Load(done), Addr(one), 8, allow_fail=True, what="add 1 to the done counter")
    for slot in (done, decision, pidfd):
        t.call(Nr.close, Load(slot), allow_fail=True, what="close a pipe or the pidfd")


def _forward_fds(t: SyscallTable, process: ProcessPlan, pidfd: Ref, tmp: Ref, kept: _Kept) -> None:
    relock: list[tuple[int, Ref]] = []
    for ref in process.fds:
        t.boundaries.append(len(t.entries))
        keep = t.slot()
        kept.fds.append((ref, keep))
        t.call(Nr.fcntl, ref.fd, F_DUPFD_CLOEXEC, 0, store=keep, jump=PARK_FAILED, what=f"keep fd {ref.fd} (A)")
        t.call(Nr.pidfd_getfd, Load(pidfd), ref.desc.new_fd, 0, store=tmp, jump=PARK_FAILED,
               what=f"pidfd_getfd for fd {ref.fd}")
        if ref.desc.lock_taker == (process.pid, ref.fd):
            _description_locks(t, tmp, ref)
        locks = [t.blob(flock_struct(lock)) for lock in ref.posix_locks]
        for lock in locks:
            t.call(Nr.fcntl, Load(tmp), F_SETLK, Addr(lock), jump=CLEANUP_TMP, what=f"lock check on B for fd {ref.fd}")
        t.call(Nr.dup3, Load(tmp), ref.fd, os.O_CLOEXEC if ref.cloexec else 0, jump=CLEANUP_TMP,
               what=f"dup3 onto fd {ref.fd}")
        t.call(Nr.close, Load(tmp), jump=PARK_FAILED, what="close temporary fd")
        relock.extend((ref.fd, lock) for lock in locks)
    t.boundaries.append(len(t.entries))
    # Any close of an fd on an inode drops the process's POSIX locks on it (the temporary
    # fds above), so they are taken for good only after every install.
    for fd, lock in relock:
        t.call(Nr.fcntl, fd, F_SETLK, Addr(lock), jump=PARK_FAILED, what=f"POSIX lock on fd {fd}")
    for reg in process.epoll:
        event = t.blob(struct.pack("<IQ", reg.target.events, reg.target.data))
        t.call(Nr.epoll_ctl, reg.epfd, EPOLL_CTL_ADD, reg.target.tfd, Addr(event), jump=PARK_FAILED,
               what=f"epoll_ctl ADD fd {reg.target.tfd} to epoll fd {reg.epfd}")


def _description_locks(t: SyscallTable, tmp: Ref, ref: FdRef) -> None:
    """The description's flock and OFD locks, taken by the task on B's description (held
    by `tmp`): the kernel records this task as their holder, as a CRIU restore would."""
    rel = ref.desc.rel or "."
    for lock in ref.desc.locks:
        if lock.kind == "FLOCK":
            op = LOCK_EX if lock.access == "WRITE" else LOCK_SH
            t.call(Nr.flock, Load(tmp), op | LOCK_NB, jump=CLEANUP_TMP,
                   what=f"flock({'LOCK_EX' if op == LOCK_EX else 'LOCK_SH'}) of {rel} on the target for fd {ref.fd} "
                        "(held there by someone else?)")
        elif lock.kind == "OFDLCK":
            t.call(Nr.fcntl, Load(tmp), F_OFD_SETLK, Addr(t.blob(flock_struct(lock))), jump=CLEANUP_TMP,
                   what=f"OFD {lock.access.lower()} lock of {rel} on the target for fd {ref.fd} "
                        "(held there by someone else?)")


def _forward_dirs(t: SyscallTable, process: ProcessPlan, pidfd: Ref, tmp: Ref, kept: _Kept) -> None:
    t.boundaries.append(len(t.entries))
    kept.cwd = t.slot()
    t.call(Nr.openat, AT_FDCWD, Addr(t.blob(b".\0")), O_PATH_DIR, store=kept.cwd, jump=PARK_FAILED, what="keep cwd")
    root = next((d for d in process.dirs if d.kind == "root"), None)
    if root is not None:
        kept.root = (t.slot(), t.slot())
        t.call(Nr.openat, AT_FDCWD, Addr(t.blob(b"/\0")), O_PATH_DIR, store=kept.root[0], jump=PARK_FAILED,
               what="keep root")
        t.call(Nr.pidfd_getfd, Load(pidfd), root.new_fd, 0, store=tmp, jump=PARK_FAILED, what="pidfd_getfd for root")
        t.call(Nr.fchdir, Load(tmp), jump=CLEANUP_TMP, what="fchdir to new root")
        t.call(Nr.chroot, Addr(t.blob(b".\0")), store=kept.root[1], jump=CLEANUP_TMP, what="chroot")
        t.call(Nr.close, Load(tmp), jump=PARK_FAILED, what="close temporary fd")
    for d in process.dirs:
        if d.kind in ("cwd", "cwd-kept"):
            t.call(Nr.pidfd_getfd, Load(pidfd), d.new_fd, 0, store=tmp, jump=PARK_FAILED, what="pidfd_getfd for cwd")
            t.call(Nr.fchdir, Load(tmp), jump=CLEANUP_TMP, what="fchdir to new cwd")
            t.call(Nr.close, Load(tmp), jump=PARK_FAILED, what="close temporary fd")


def _undo(t: SyscallTable, process: ProcessPlan, kept: _Kept, scratch: int, self_pid: int) -> None:
    """Everything allow-fail: a slot the forward part never filled holds -1 (EBADF)."""
    for ref, keep in kept.fds:
        t.call(Nr.dup3, Load(keep), ref.fd, os.O_CLOEXEC if ref.cloexec else 0, allow_fail=True,
               what=f"undo: A back onto fd {ref.fd}")
        t.call(Nr.close, Load(keep), allow_fail=True, what="close kept fd")
    for ref, _ in kept.fds:
        for lock in ref.posix_locks:
            t.call(Nr.fcntl, ref.fd, F_SETLK, Addr(t.blob(flock_struct(lock))), allow_fail=True,
                   what=f"undo: POSIX lock on fd {ref.fd}")
    if kept.fds:
        for reg in process.epoll:
            # A's registration is still there (the kept reference held A's description): EEXIST.
            event = t.blob(struct.pack("<IQ", reg.target.events, reg.target.data))
            t.call(Nr.epoll_ctl, reg.epfd, EPOLL_CTL_ADD, reg.target.tfd, Addr(event), allow_fail=True,
                   what=f"undo: epoll_ctl ADD fd {reg.target.tfd}")
    for index, (m, keep, remapped) in enumerate(kept.maps):
        after = f"undo map {index} done"
        _if_done(t, remapped, after)
        _remap(t, Load(keep), m, scratch, self_pid, on_fail=after, on_fail_scratch=after)
        t.label(after)
    for slot in (*kept.map_sources.values(), *kept.map_targets.values()):
        t.call(Nr.close, Load(slot), allow_fail=True, what="close a mapped file (undo)")
    if kept.exe is not None:
        mm_map, exe_fd, exe_done = kept.exe
        _if_done(t, exe_done, "undo exe done")
        t.call(Nr.brk, 0, store=Ref(mm_map.offset + 40), allow_fail=True, what="undo: brk(0)")
        t.call(Nr.prctl, PR_SET_MM, PR_SET_MM_MAP, Addr(mm_map), 104, 0, allow_fail=True, what="undo: exe")
        t.label("undo exe done")
        t.call(Nr.close, Load(exe_fd), allow_fail=True, what="close kept exe")
    if kept.root is not None:
        keep_root, root_done = kept.root
        _if_done(t, root_done, "undo root done")
        t.call(Nr.fchdir, Load(keep_root), jump="undo root done", what="undo: fchdir to the old root")
        t.call(Nr.chroot, Addr(t.blob(b".\0")), allow_fail=True, what="undo: chroot")
        t.label("undo root done")
        t.call(Nr.close, Load(keep_root), allow_fail=True, what="close kept root")
    if kept.cwd is not None:
        t.call(Nr.fchdir, Load(kept.cwd), allow_fail=True, what="undo: fchdir to the old cwd")
        t.call(Nr.close, Load(kept.cwd), allow_fail=True, what="close kept cwd")


def _if_done(t: SyscallTable, slot: Ref, otherwise: str) -> None:
    """Continue only if the forward step stored a result (0 or an address) in `slot`; still
    -1 means it never ran: skip to `otherwise`.  msync(x, 0, MS_ASYNC) succeeds for any
    page-aligned x and fails for -1: a test without side effects."""
    t.call(Nr.msync, Load(slot), 0, MS_ASYNC, jump=otherwise, what="was this step done?")


def _insert_test_failure(t: SyscallTable, fail_after: int) -> None:
    """Test hook: an entry that fails, placed where a real failure could happen: at a step
    boundary (no temporary fd open, never inside a remap that must run to its end)."""
    at = next((b for b in sorted(t.boundaries) if b >= fail_after), len(t.entries))
    t.entries.insert(at, Entry(Nr.close, (-1,), None, False, "injected failure (test)", jump=PARK_FAILED))


PROT = {"r": 1, "w": 2, "x": 4}
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x1, 0x2, 0x10, 0x20, 0x100000
MS_ASYNC, MS_SYNC = 1, 4
IOV_MAX = 1024
# smaps VmFlags that a remap loses, and how to set them again.
ADVICE = {"rr": 1, "sr": 2, "dc": 10, "hg": 14, "nh": 15, "dd": 16, "wf": 18}
PR_SET_MM, PR_SET_MM_MAP = 35, 14


def _iovecs(table: SyscallTable, pairs: list[tuple[int, int]]) -> object:
    return table.blob(b"".join(struct.pack("<QQ", base, length) for base, length in pairs))


def _copy_within(table: SyscallTable, pid: int, dst: list[tuple[int, int]], src: list[tuple[int, int]], what: str,
                 allow_fail: bool = False, jump: str | None = None) -> None:
    """The task copies its own memory (process_vm_readv on itself): no pointer into the
    table's data is needed, both sides are fixed addresses."""
    for i in range(0, len(dst), IOV_MAX):
        local, remote = dst[i:i + IOV_MAX], src[i:i + IOV_MAX]
        table.call(Nr.process_vm_readv, pid, Addr(_iovecs(table, local)), len(local),
                   Addr(_iovecs(table, remote)), len(remote), 0, allow_fail=allow_fail, jump=jump, what=what)


def _forward_mappings(t: SyscallTable, pidfd: Ref, maps: list[MapRef], scratch: int, self_pid: int,
                      kept: _Kept) -> None:
    """First one fd per distinct file (A's to keep, B's to map from: the manager opened one
    of each per file and mode), then every remap from those: the task's fd count does not
    grow with its mappings.  The slots are closed by the commit or the undo only (a slot
    closed earlier could name a reused number by then)."""
    t.boundaries.append(len(t.entries))
    for m in maps:
        for fd, slots, what in ((m.old_fd, kept.map_sources, "keep A's file"), (m.new_fd, kept.map_targets,
                                                                                   "B's file")):
            if fd not in slots:
                slots[fd] = t.slot()
                t.call(Nr.pidfd_getfd, Load(pidfd), fd, 0, store=slots[fd], jump=PARK_FAILED,
                       what=f"pidfd_getfd: {what} of mapping {m.vma.start:#x} ({m.rel})")
    for m in maps:
        t.boundaries.append(len(t.entries))
        remapped = t.slot()
        kept.maps.append((m, kept.map_sources[m.old_fd], remapped))
        _remap(t, Load(kept.map_targets[m.new_fd]), m, scratch, self_pid, on_fail=PARK_FAILED,
               on_fail_scratch=CLEANUP_SCRATCH, store=remapped)


def _remap(t: SyscallTable, file: Load, m: MapRef, scratch: int, self_pid: int, *, on_fail: str,
           on_fail_scratch: str, store: Ref | None = None) -> None:
    """Replace one VMA by the same range of `file`, keeping private COW pages:
    (1) copy the private pages to a scratch area, (2) MAP_FIXED the file over the range
    (writable while refilling), (3) copy the pages back, restore protections and the flags
    madvise/mlock can set.  From (2) on nothing may stop half-way: all allow-fail."""
    vma = m.vma
    start, length = vma.start, vma.end - vma.start
    prot = sum(bit for ch, bit in PROT.items() if ch in vma.perms[:3])
    kind = MAP_SHARED if vma.shared else MAP_PRIVATE
    if vma.shared:
        t.call(Nr.msync, start, length, MS_SYNC, allow_fail=True, what=f"msync {start:#x}")
    dirty = m.dirty if not vma.shared else []
    saved = []
    if dirty:
        total = sum(n for _, n in dirty)
        t.call(Nr.mmap, scratch, total, PROT["r"] | PROT["w"], MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
               -1, 0, jump=on_fail, what="scratch for private pages")
        offset = 0
        for off, n in dirty:
            saved.append((scratch + offset, n))
            offset += n
        _copy_within(t, self_pid, saved, [(start + off, n) for off, n in dirty], "save private pages",
                     jump=on_fail_scratch)
    t.call(Nr.mmap, start, length, prot | (PROT["w"] if dirty else 0), kind | MAP_FIXED, file,
           vma.offset, store=store, jump=on_fail_scratch if dirty else on_fail,
           what=f"mmap over {start:#x}-{vma.end:#x}")
    if dirty:
        _copy_within(t, self_pid, [(start + off, n) for off, n in dirty], saved, "restore private pages",
                     allow_fail=True)
        if not prot & PROT["w"]:
            t.call(Nr.mprotect, start, length, prot, allow_fail=True, what=f"mprotect {start:#x}")
        t.call(Nr.munmap, scratch, sum(n for _, n in dirty), allow_fail=True, what="drop scratch")
    for flag in m.vm_flags:
        if flag in ADVICE:
            t.call(Nr.madvise, start, length, ADVICE[flag], allow_fail=True, what=f"madvise {flag}")
        elif flag == "lo":
            t.call(Nr.mlock, start, length, allow_fail=True, what="mlock")


def _mm_map(t: SyscallTable, exe) -> Ref:
    fields = list(exe.mm_fields)
    return t.blob(struct.pack("<11QQII", *fields, 0, 0, 0xFFFFFFFF) + bytes(8))


def _forward_exe(t: SyscallTable, pidfd: Ref, exe, kept: _Kept) -> None:
    """/proc/PID/exe via PR_SET_MM_MAP (needs CAP_CHECKPOINT_RESTORE in the task; the old
    executable must not be mapped any more, so this comes after the mappings)."""
    t.boundaries.append(len(t.entries))
    forward_map, undo_map, done = _mm_map(t, exe), _mm_map(t, exe), t.slot()
    new_fd = Ref(forward_map.offset + 100)  # the 8-byte store spills into the 8 spare bytes
    old_fd = Ref(undo_map.offset + 100)
    kept.exe, kept.exe_new = (undo_map, old_fd, done), new_fd
    t.call(Nr.pidfd_getfd, Load(pidfd), exe.old_fd, 0, store=old_fd, jump=PARK_FAILED, what="keep A's exe")
    t.call(Nr.brk, 0, store=Ref(forward_map.offset + 40), jump=PARK_FAILED, what="brk(0)")
    t.call(Nr.pidfd_getfd, Load(pidfd), exe.new_fd, 0, store=new_fd, jump=PARK_FAILED, what="pidfd_getfd for exe")
    t.call(Nr.prctl, PR_SET_MM, PR_SET_MM_MAP, Addr(forward_map), 104, 0, store=done, jump=CLEANUP_EXE,
           what="prctl(PR_SET_MM_MAP) exe")
    t.call(Nr.close, Load(new_fd), allow_fail=True, what="close temporary fd")
