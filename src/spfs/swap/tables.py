"""The per-process syscall tables that install B's descriptions (commit) or A's (revert)."""

from __future__ import annotations

import fcntl
import os
import struct

from spfs.swap.arch import Nr
from spfs.swap.model import ProcessPlan
from spfs.swap.procfs import Lock
from spfs.swap.table import Addr, Entry, Load, Ref, SyscallTable

__all__ = ["SyscallTable", "build", "flock_struct"]

EPOLL_CTL_ADD = 1
F_SETLK = fcntl.F_SETLK
LOCK_TYPE = {"READ": fcntl.F_RDLCK, "WRITE": fcntl.F_WRLCK}


def flock_struct(lock: Lock) -> bytes:
    length = 0 if lock.end is None else lock.end - lock.start + 1
    return struct.pack("<hhxxxxqqixxxx", LOCK_TYPE[lock.access], os.SEEK_SET, lock.start, length, 0)


def build(process: ProcessPlan, donor_pid: int, *, forward: bool, do_fds: bool, do_dirs: bool,
          close_first: tuple[int, ...] = (), only: set[str] | None = None,
          do_maps: bool = False, scratch: int = 0, fail_after: int | None = None) -> SyscallTable:
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
    if do_maps:
        for m in process.maps:
            if only is not None and f"scratch {m.vma.start:#x}" in only and f"scratch freed {m.vma.start:#x}" not in only:
                table.call(Nr.munmap, scratch, sum(n for _, n in m.dirty), allow_fail=True,
                           what="drop scratch left by the failed step")
            if only is None or f"map {m.vma.start:#x}" in only:
                _add_mapping(table, pidfd, tmp, m, forward, scratch, process.nspid)
        if process.exe is not None and (only is None or "exe" in only):
            _add_exe(table, pidfd, process.exe, forward)
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
    if fail_after is not None:
        # Test hook: an entry that fails, placed like a real failure could happen: never
        # inside a part whose entries are all allow-fail.
        at = min(fail_after, len(table.entries))
        for lo, hi in table.critical:
            if lo <= at < hi:
                at = hi
        for name, index in table.marks.items():
            if index >= at:
                table.marks[name] = index + 1
        table.entries.insert(at, Entry(Nr.close, (-1,), None, False, "injected failure (test)"))
    table.call(Nr.close, Load(pidfd), what="close pidfd")
    return table


PROT = {"r": 1, "w": 2, "x": 4}
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS, MAP_FIXED_NOREPLACE = 0x1, 0x2, 0x10, 0x20, 0x100000
MS_SYNC = 4
IOV_MAX = 1024
# smaps VmFlags that a remap loses, and how to set them again.
ADVICE = {"rr": 1, "sr": 2, "dc": 10, "hg": 14, "nh": 15, "dd": 16, "wf": 18}
PR_SET_MM, PR_SET_MM_MAP = 35, 14


def _iovecs(table: SyscallTable, pairs: list[tuple[int, int]]) -> object:
    return table.blob(b"".join(struct.pack("<QQ", base, length) for base, length in pairs))


def _copy_within(table: SyscallTable, pid: int, dst: list[tuple[int, int]], src: list[tuple[int, int]], what: str,
                 allow_fail: bool = False) -> None:
    """The task copies its own memory (process_vm_readv on itself): no pointer into the
    table's data is needed, both sides are fixed addresses."""
    for i in range(0, len(dst), IOV_MAX):
        local, remote = dst[i:i + IOV_MAX], src[i:i + IOV_MAX]
        table.call(Nr.process_vm_readv, pid, Addr(_iovecs(table, local)), len(local),
                   Addr(_iovecs(table, remote)), len(remote), 0, allow_fail=allow_fail, what=what)


def _add_mapping(table: SyscallTable, pidfd, tmp, m, forward: bool, scratch: int, self_pid: int) -> None:
    """Replace one VMA by the same range of the other file, keeping private COW pages.

    All inside the task's table, so a tracer killed half-way never leaves a mapping without
    its data: (1) copy the private pages to a scratch area, (2) MAP_FIXED the new file over
    the range (writable while refilling), (3) copy the pages back, restore protections and
    the flags madvise/mlock can set."""
    vma = m.vma
    start, length = vma.start, vma.end - vma.start
    prot = sum(bit for ch, bit in PROT.items() if ch in vma.perms[:3])
    kind = MAP_SHARED if vma.shared else MAP_PRIVATE
    table.call(Nr.pidfd_getfd, Load(pidfd), m.new_fd if forward else m.old_fd, 0, store=tmp,
               what=f"pidfd_getfd for mapping {start:#x}")
    if vma.shared:
        table.call(Nr.msync, start, length, MS_SYNC, allow_fail=True, what=f"msync {start:#x}")
    dirty = m.dirty if not vma.shared else []
    saved = []
    if dirty:
        total = sum(n for _, n in dirty)
        table.call(Nr.mmap, scratch, total, PROT["r"] | PROT["w"], MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE,
                   -1, 0, what="scratch for private pages")
        table.mark(f"scratch {start:#x}")
        offset = 0
        for off, n in dirty:
            saved.append((scratch + offset, n))
            offset += n
        _copy_within(table, self_pid, saved, [(start + off, n) for off, n in dirty], "save private pages")
    table.call(Nr.mmap, start, length, prot | (PROT["w"] if dirty else 0), kind | MAP_FIXED, Load(tmp),
               vma.offset, what=f"mmap over {start:#x}-{vma.end:#x}")
    table.mark(f"map {start:#x}")
    # From here on nothing may stop the step half-way: failures are tolerated (and rare).
    critical_from = len(table.entries)
    if dirty:
        _copy_within(table, self_pid, [(start + off, n) for off, n in dirty], saved, "restore private pages",
                     allow_fail=True)
        if not prot & PROT["w"]:
            table.call(Nr.mprotect, start, length, prot, allow_fail=True, what=f"mprotect {start:#x}")
        table.call(Nr.munmap, scratch, sum(n for _, n in dirty), allow_fail=True, what="drop scratch")
        table.mark(f"scratch freed {start:#x}")
    for flag in m.vm_flags:
        if flag in ADVICE:
            table.call(Nr.madvise, start, length, ADVICE[flag], allow_fail=True, what=f"madvise {flag}")
        elif flag == "lo":
            table.call(Nr.mlock, start, length, allow_fail=True, what="mlock")
    table.call(Nr.close, Load(tmp), allow_fail=True, what="close temporary fd")
    table.critical.append((critical_from, len(table.entries)))


def _add_exe(table: SyscallTable, pidfd, exe, forward: bool) -> None:
    """/proc/PID/exe via PR_SET_MM_MAP (needs CAP_CHECKPOINT_RESTORE in the task; the old
    executable must not be mapped any more, so this comes after the mappings)."""
    fields = list(exe.mm_fields)
    mm_map = table.blob(struct.pack("<11QQII", *fields, 0, 0, 0xFFFFFFFF) + bytes(8))
    brk = Ref(mm_map.offset + 40)
    exe_fd = Ref(mm_map.offset + 100)  # the 8-byte store spills into the 8 spare bytes
    table.call(Nr.brk, 0, store=brk, what="brk(0)")
    table.call(Nr.pidfd_getfd, Load(pidfd), exe.new_fd if forward else exe.old_fd, 0, store=exe_fd,
               what="pidfd_getfd for exe")
    table.call(Nr.prctl, PR_SET_MM, PR_SET_MM_MAP, Addr(mm_map), 104, 0, what="prctl(PR_SET_MM_MAP) exe")
    table.mark("exe")
    table.call(Nr.close, Load(exe_fd), what="close temporary fd")
