"""Prepare: open everything on B (and take our own reference to every A description)
before anything is stopped, so the stop window only installs what is already open."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import stat
import struct
import time
from pathlib import Path

from spfs.swap import inotify, procfs, unixsock
from spfs.swap.cgroup import Freezer, Watchdog
from spfs.swap.donor import Donor, same_pid_namespace
from spfs.swap.model import Description, DirRef, MapRef, Phase, SwapChanged, SwapError, SwapPlan
from spfs.sys.beneath import ACROSS_MOUNTS, Seen, Share, ShareChanged, Staged, magic_path
from spfs.sys.pidfd import getfd_from as pidfd_getfd, getfd_if_same_file

log = logging.getLogger(__name__)

REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY | os.O_CLOEXEC
SETFL_BITS = os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME | getattr(os, "O_ASYNC", 0o20000)
O_ASYNC = 0o20000
F_GETOWN_EX, F_SETOWN_EX, F_GETSIG, F_SETSIG = 16, 15, 11, 10


def open_on_target(plan: SwapPlan, prepared: "Prepared", desc: Description) -> int:
    """The description's counterpart on B, found below B's root; the name on A must still
    be the object discovery saw (a task may rename or replace anything meanwhile)."""
    source, target = prepared.source, prepared.target
    flags = (desc.flags & ~REOPEN_DROP) | os.O_CLOEXEC
    if stat.S_ISSOCK(desc.mode):
        sock = desc.sock
        file_fd = source.check_seen(desc.rel, Seen(source.dev, sock.file_ino, stat.S_IFSOCK), "socket file")
        try:
            owner = os.fstat(file_fd)
        finally:
            os.close(file_fd)
        address = sock.path if plan.target_replaces_source else _target_address(plan, desc.rel)
        fd = unixsock.recreate(sock, target, desc.rel, desc.old_fd, desc.flags, address,
                               prepared.staged_sockets)
        try:
            unixsock.give_file_attributes(prepared.staged_sockets[sock.ino], owner)
        except ShareChanged:
            os.close(fd)
            raise
        except OSError as exc:  # the socket works all the same, with the owner we gave it
            log.warning("socket file %s: owner and mode not copied: %s", desc.rel, exc)
        return fd
    seen = None if desc.mapped else Seen(desc.dev, desc.ino, desc.mode)
    held = prepared.counterpart(desc.rel, seen, desc.mode, "open file")
    try:
        if stat.S_ISFIFO(desc.mode):
            # Opening a FIFO blocks (or fails for a writer) without the other end: hold a
            # read-write keeper and open non-blocking, then restore the flags.
            if desc.rel not in prepared.fifo_keepers:
                prepared.fifo_keepers[desc.rel] = reopen(held, os.O_RDWR | os.O_NONBLOCK)
            fd = reopen(held, flags | os.O_NONBLOCK)
        else:
            fd = reopen(held, flags)
    finally:
        os.close(held)
    try:
        if not desc.flags & os.O_PATH:
            fcntl.fcntl(fd, fcntl.F_SETFL, desc.flags & SETFL_BITS)
        return fd
    except BaseException:
        os.close(fd)
        raise


def reopen(held: int, flags: int) -> int:
    """A new description of exactly the object `held` (an O_PATH descriptor) holds: no name
    is looked up again."""
    return os.open(magic_path(held), (flags & ~(os.O_NOFOLLOW | REOPEN_DROP)) | os.O_CLOEXEC)


def _target_address(plan: SwapPlan, rel: str) -> str:
    """The address a socket re-created on B reads when B is not mounted in A's place."""
    return os.path.join(plan.target, rel) if rel else plan.target


def _copy_owner(old_fd: int, new_fd: int) -> None:
    """F_SETOWN/F_SETSIG live in the open file description: copy them over."""
    owner = bytearray(8)
    raw = fcntl.fcntl(old_fd, F_GETOWN_EX, bytes(owner))
    kind, pid = struct.unpack("<ii", raw)
    if pid:
        fcntl.fcntl(new_fd, F_SETOWN_EX, struct.pack("<ii", kind, pid))
    sig = fcntl.fcntl(old_fd, F_GETSIG)
    if sig:
        fcntl.fcntl(new_fd, F_SETSIG, sig)


class Prepared:
    """Manager-side fds of one switch; close() releases them all."""

    def __init__(self, source: Share, target: Share) -> None:
        # Both shares are reached only below these roots (see spfs.sys.beneath).
        self.source, self.target = source, target
        self.fds: list[int] = []
        self.pidfds: dict[int, int] = {}
        self.fifo_keepers: dict[str, int] = {}
        self.watchdog: Watchdog | None = None
        self.opened: dict[tuple[str, int], int] = {}
        # A's mapped files, one fd per (dev, ino, open mode) whatever the number of mappings
        self.mapped_sources: dict[tuple[int, int, int], int] = {}
        self.donors: list[Donor] = []
        self.inotify_copies: dict[tuple[int, int], int] = {}
        self.donor_of: dict[int, int] = {}  # pid -> pid of its fd donor, as seen by that pid
        # new sockets' files, by old socket inode: made in staging directories on B, given
        # their names in the stop window; the old files are dropped once committed, else
        # get their names back
        self.staged_sockets: dict[int, Staged] = {}
        self.committed = False
        # The decision pipe (tables.py): only we may hold its write end, so that our death
        # is an end of file for the parked tasks.  The done counter gets 1 per finished task.
        self.decision_read, self.decision_write = os.pipe2(os.O_CLOEXEC)
        # Never block on our side; the tasks' read end must block (it is their wait).
        os.set_blocking(self.decision_write, False)
        # A counter, not a pipe or socket: no SIGPIPE for a task adding to it after our
        # death, no buffer a thousand tasks could fill.
        self.done = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.fds += [self.decision_read, self.done]

    def adopt_watchdog(self, other: "Prepared") -> bool:
        """Take over `other`'s watchdog with its decision pipe and done counter, if it can
        serve this plan too: a re-plan (inside a freeze) then does not pay for a Python
        start. Nothing was decided on that pipe: only a commit writes to it."""
        dog = other.watchdog
        if dog is None or dog.proc.poll() is not None or other.inotify_copies \
                or other.decision_write < 0:
            return False
        for fd in (self.decision_read, self.decision_write, self.done):
            os.close(fd)
        self.fds = [fd for fd in self.fds if fd not in (self.decision_read, self.done)]
        self.decision_read, self.decision_write, self.done = \
            other.decision_read, other.decision_write, other.done
        other.fds = [fd for fd in other.fds if fd not in (other.decision_read, other.done)]
        other.decision_write, other.watchdog = -1, None
        self.fds += [self.decision_read, self.done]
        self.watchdog = dog
        return True

    def close_decision(self) -> None:
        """End of file for every parked task: they undo their tables."""
        if self.decision_write >= 0:
            with contextlib.suppress(OSError):
                os.close(self.decision_write)
            self.decision_write = -1

    def read_done(self, count: int, timeout: float) -> int:
        """How many tasks reported that they finished their table (waits for count at most)."""
        return read_counter(self.done, count, timeout)

    def donor_pid(self, pid: int) -> int:
        return self.donor_of.get(pid, os.getpid())

    def open_shared(self, rel: str, flags: int, seen: Seen | None, what: str) -> int:
        """One description per (name, flags) on B for mappings and exe: they keep no offset."""
        key = (rel, flags)
        if key not in self.opened:
            held = self.counterpart(rel, seen, stat.S_IFREG, what)
            try:
                self.opened[key] = self.track(reopen(held, flags))
            finally:
                os.close(held)
        return self.opened[key]

    def counterpart(self, rel: str, seen: Seen | None, mode: int, what: str) -> int:
        """An O_PATH descriptor of B's object at `rel`, of the kind of `mode`. The name must
        lead to the object discovery saw on A (`seen`; None for a path map's name) both
        before and after B's object is opened, and B's name must still lead to the object
        opened: a task renaming things meanwhile is caught (it would have to swap names
        twice between two of our system calls to go unseen)."""
        if seen is not None:
            os.close(self.source.check_seen(rel, seen, what))
        held = self.target.open_kind(rel, os.O_PATH, mode)
        try:
            if seen is not None:
                os.close(self.source.check_seen(rel, seen, what))
            again = self.target.hold(rel)
            try:
                same = os.fstat(again).st_ino == os.fstat(held).st_ino
            finally:
                os.close(again)
            if not same:
                raise ShareChanged(f"{what}: {rel!r} on the {self.target.label} changed while it was opened")
        except BaseException:
            os.close(held)
            raise
        return held

    def pidfd(self, pid: int) -> int:
        if pid not in self.pidfds:
            self.pidfds[pid] = os.pidfd_open(pid)
        return self.pidfds[pid]

    def track(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close_keepers(self) -> None:
        for fd in self.fifo_keepers.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fifo_keepers.clear()

    def settle_staged_sockets(self) -> None:
        """The new socket files keep their names if the switch committed; otherwise the old
        ones get theirs back (the tasks still hold their old sockets, bound to exactly those
        files)."""
        for stage in reversed(self.staged_sockets.values()):
            try:
                stage.settle(keep_new=self.committed)
            except OSError as exc:
                log.warning("socket file %s on the target (staged in %s): %s", stage.rel,
                            stage.stage_name, exc)
        self.staged_sockets.clear()

    def close(self) -> None:
        self.close_decision()
        for donor in self.donors:
            donor.close()
        self.donors.clear()
        if self.watchdog is not None:
            self.watchdog.close()
            self.watchdog = None
        self.close_keepers()
        for fd in self.fds + list(self.pidfds.values()):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()
        self.settle_staged_sockets()  # after our copies of the new sockets are closed
        self.opened.clear()
        self.mapped_sources.clear()
        self.pidfds.clear()
        self.source.close()
        self.target.close()


def prepare(plan: SwapPlan, reuse: Prepared | None = None) -> Prepared:
    """Open every reference's counterpart on B; raises SwapError with nothing stopped.
    `reuse`: an abandoned earlier preparation whose watchdog this one may take over."""
    if plan.phase is not Phase.DISCOVERED:
        raise SwapError(f"prepare needs a freshly discovered plan (phase is {plan.phase.value})")
    prepared = _open_shares(plan)
    if reuse is not None and _watches(reuse, plan.cgroup) and prepared.adopt_watchdog(reuse):
        log.info("the swap watchdog %d of the earlier plan serves this one",
                 prepared.watchdog.proc.pid if prepared.watchdog else 0)
    try:
        # sockets last: re-creating one is the only step that changes the target
        for desc in sorted(plan.descriptions, key=lambda d: stat.S_ISSOCK(d.mode)):
            old_fd = _take_description(prepared, desc)
            if old_fd is None:
                _forget_description(plan, desc)
                continue
            desc.old_fd = prepared.track(old_fd)
            desc.new_fd = prepared.track(open_on_target(plan, prepared, desc))
            if desc.flags & O_ASYNC or stat.S_ISFIFO(desc.mode):
                _copy_owner(desc.old_fd, desc.new_fd)
            if stat.S_ISFIFO(desc.mode):
                with contextlib.suppress(OSError):
                    size = fcntl.fcntl(desc.old_fd, fcntl.F_GETPIPE_SZ)
                    fcntl.fcntl(desc.new_fd, fcntl.F_SETPIPE_SZ, size)
        for p in plan.processes:
            for d in p.dirs:
                _prepare_dir(plan, prepared, d)
            for m in p.maps:
                _prepare_mapping(plan, prepared, m)
            if p.inotify:
                _prepare_inotify(plan, prepared, p.inotify)
            if p.exe is not None:
                p.exe.old_fd = prepared.track(os.open(f"/proc/{p.pid}/exe", os.O_RDONLY | os.O_CLOEXEC))
                p.exe.new_fd = prepared.open_shared(p.exe.rel, os.O_RDONLY,
                                                    Seen(p.exe.dev, p.exe.ino, stat.S_IFREG),
                                                    f"executable of process {p.pid}")
            if any(d.kind == "root" for d in p.dirs) and not any(d.kind == "cwd" for d in p.dirs):
                cwd = DirRef(p.pid, "cwd-kept", "")
                cwd.old_fd = cwd.new_fd = prepared.track(os.open(f"/proc/{p.pid}/cwd", os.O_PATH | os.O_CLOEXEC))
                p.dirs.append(cwd)
    except SwapError:
        prepared.close()
        raise
    except ShareChanged as exc:
        prepared.close()
        raise SwapError(f"prepare refused: {exc}") from exc
    except OSError as exc:
        prepared.close()
        raise SwapError(f"prepare failed: {exc}") from exc
    try:
        _start_donors(plan, prepared)
    except (OSError, RuntimeError) as exc:
        prepared.close()
        raise SwapError(f"cannot start an fd donor in a task's pid namespace: {exc}") from exc
    if prepared.watchdog is not None and prepared.inotify_copies:
        prepared.watchdog.close()  # it holds no copy of these inotify fds: a new one does
        prepared.watchdog = None
    # Started now so that its interpreter start-up is over before anything is stopped.
    try:
        if prepared.watchdog is None:
            prepared.watchdog = Watchdog(Freezer(plan.cgroup) if plan.cgroup else None,
                                         prepared.decision_read,
                                         (*prepared.inotify_copies.values(),
                                          *(r.source_fd for p in plan.processes for r in p.inotify)))
    except (OSError, RuntimeError) as exc:
        prepared.close()
        raise SwapError(f"cannot start the swap watchdog (for {plan.cgroup or 'held signals'}): {exc}") from exc
    plan.advance(Phase.PREPARED)
    log.info("prepared %d descriptions on %s", len(plan.descriptions), plan.target)
    return prepared


def _take_description(prepared: Prepared, desc: Description) -> int | None:
    """Our own reference to `desc`, from the first holder that still has it; None when
    every holder closed it since discovery (a program may open and close a file at any
    moment: that is no reason to fail the switch)."""
    for pid, fd in list(desc.holders):
        copy = getfd_if_same_file(prepared.pidfd(pid), fd, desc.dev, desc.ino)
        if copy is not None:
            return copy
        # A number reused for another file meanwhile: that one is found again as a late
        # fd when the stopped tasks are re-validated.
        desc.holders.remove((pid, fd))
    return None


def _forget_description(plan: SwapPlan, desc: Description) -> None:
    """Drop a description no task holds any more. Its fd numbers leave the discovered fd
    tables too, so that a file opened again under one of them counts as opened late."""
    plan.descriptions.remove(desc)
    for p in plan.processes:
        gone = {r.fd for r in p.fds if r.desc is desc}
        if not gone:
            continue
        p.fds = [r for r in p.fds if r.desc is not desc]
        p.epoll = [e for e in p.epoll if e.desc is not desc]
        for sharer in plan.processes:  # the table's owner and every task sharing its table
            if sharer is p or sharer.fd_table_of == p.pid:
                sharer.fd_numbers = [n for n in sharer.fd_numbers if n not in gone]
    log.info("%s was closed by every task that held it since discovery: nothing to move",
             desc.rel or ".")


def _watches(prepared: Prepared, cgroup: str | None) -> bool:
    dog = prepared.watchdog
    if dog is None:
        return False
    watched = str(dog.freezer.path) if dog.freezer is not None else None
    return watched == (str(Path(cgroup)) if cgroup else None)


def _start_donors(plan: SwapPlan, prepared: Prepared) -> None:
    """Tasks outside our pid namespace get their files from a donor forked into theirs
    (after every B file is open, so the donor holds them all)."""
    by_ns: dict[int, Donor] = {}
    for p in plan.processes:
        if not p.has_work or same_pid_namespace(p.pid):
            continue
        ns = procfs.ns_inode(p.pid, "pid")
        if ns not in by_ns:
            by_ns[ns] = Donor(p.pid, prepared.fds)  # every fd a task pulls is tracked
            prepared.donors.append(by_ns[ns])
        prepared.donor_of[p.pid] = by_ns[ns].ns_pid


def _open_shares(plan: SwapPlan) -> Prepared:
    try:
        source = Share.open(plan.source.path, "source", resolve=ACROSS_MOUNTS, expect_dev=plan.source.dev)
    except OSError as exc:
        raise SwapError(f"cannot open the source {plan.source.path}: {exc}") from exc
    try:
        target = Share.open(plan.target, "target")
    except OSError as exc:
        source.close()
        raise SwapError(f"cannot open the target {plan.target}: {exc}") from exc
    return Prepared(source, target)


def _prepare_inotify(plan: SwapPlan, prepared: Prepared, regs: list) -> None:
    source = prepared.source
    source_root = os.path.realpath(plan.source.path)
    # open_by_handle_at wants a real descriptor on the mount, not an O_PATH one
    mount_fd = prepared.track(os.open(magic_path(source.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    for reg in regs:
        key = (reg.pid, reg.ifd)
        if key not in prepared.inotify_copies:
            prepared.inotify_copies[key] = prepared.track(pidfd_getfd(prepared.pidfd(reg.pid), reg.ifd))
        reg.copy_fd = prepared.inotify_copies[key]
        watched = inotify.open_watched(mount_fd, reg.watch)
        try:
            st = os.fstat(watched)
            rel = os.path.relpath(os.readlink(magic_path(watched)), source_root)
        finally:
            os.close(watched)
        if rel.startswith(".."):
            raise SwapError(f"inotify watch {reg.watch.wd} of process {reg.pid} is outside the source subtree")
        reg.rel = "" if rel == "." else rel
        # the name is only a hint: below the source root it must lead to the watched inode
        seen, what = Seen(st.st_dev, st.st_ino, st.st_mode), f"inotify watch {reg.watch.wd} of process {reg.pid}"
        reg.source_fd = prepared.track(source.check_seen(reg.rel, seen, what))
        try:
            reg.target_fd = prepared.track(prepared.counterpart(reg.rel, seen, st.st_mode, what))
        except FileNotFoundError:
            raise SwapError(f"{reg.rel or '.'} (watched by process {reg.pid}) does not exist on the target") from None


def _prepare_mapping(plan: SwapPlan, prepared: Prepared, m: MapRef) -> None:
    """Shared writable mappings need a read-write file; anything else is mapped from O_RDONLY.
    One fd per distinct file and mode on each side, shared by all its mappings (of every
    process): thousands of mappings of one file must not need thousands of fds."""
    mode = os.O_RDWR if (m.vma.shared and "w" in m.vma.perms) else os.O_RDONLY
    key = (m.vma.dev, m.vma.ino, mode)
    if key not in prepared.mapped_sources:
        fd = prepared.track(os.open(f"/proc/{m.pid}/map_files/{m.vma.start:x}-{m.vma.end:x}", mode | os.O_CLOEXEC))
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != key[:2]:  # the task mapped something else there since discovery
            raise SwapChanged(f"mapping {m.vma.start:#x} of process {m.pid} changed after discovery; "
                              "run the switch again")
        prepared.mapped_sources[key] = fd
    m.old_fd = prepared.mapped_sources[key]
    seen = None if m.mapped else Seen(m.vma.dev, m.vma.ino, stat.S_IFREG)
    m.new_fd = prepared.open_shared(m.rel, mode, seen, f"mapping {m.vma.start:#x} of process {m.pid}")


def _prepare_dir(plan: SwapPlan, prepared: Prepared, d: DirRef) -> None:
    d.old_fd = prepared.track(os.open(f"/proc/{d.pid}/{d.kind}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
    d.new_fd = prepared.track(prepared.counterpart(d.rel, Seen(d.dev, d.ino, stat.S_IFDIR), stat.S_IFDIR,
                                                   f"{d.kind} of process {d.pid}"))


def read_counter(done: int, count: int, timeout: float) -> int:
    """How much the eventfd `done` counts up within `timeout` (waits for `count` at most)."""
    got, deadline = 0, time.monotonic() + timeout
    poller = select.poll()
    poller.register(done, select.POLLIN)
    while got < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            break
        with contextlib.suppress(BlockingIOError):
            got += os.eventfd_read(done)
    return got
