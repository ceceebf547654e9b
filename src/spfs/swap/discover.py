"""Discovery: every task, and every reference it holds on the source mount, read from /proc
without stopping anything.  Shared fd tables, fs structs and open file descriptions are
deduplicated with kcmp (sorted with kcmp as the comparator: O(n log n) calls)."""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from spfs.swap import procfs, unixsock
from spfs.swap.model import (Description, DirRef, EpollReg, ExeRef, FdRef, InotifyReg, Location, MapRef,
                             ProcessPlan, SwapPlan, Unmovable)
from spfs.swap.ptrace import KCMP_FILE, KCMP_FILES, KCMP_FS, KCMP_VM, kcmp
from spfs.sys import beneath
from spfs.sys.pidfd import getfd_if_same_file

log = logging.getLogger(__name__)

DELETED = " (deleted)"


def resolve_location(path: str) -> Location:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        st = os.fstat(fd)
        mnt_id = procfs.fdinfo(os.getpid(), fd).mnt_id
    finally:
        os.close(fd)
    mounts = procfs.mountinfo()
    mount = mounts.get(mnt_id)
    sb_path = "/"
    if mount is not None:
        real = os.path.realpath(path)
        inside = os.path.relpath(real, mount.mountpoint)
        sb_path = os.path.normpath(os.path.join(mount.root, "" if inside == "." else inside))
    same_sb = frozenset(m.mnt_id for m in mounts.values() if m.dev == st.st_dev) | {mnt_id}
    return Location(path=path, dev=st.st_dev, mnt_ids=same_sb, sb_path=sb_path)


def cgroup_pids(cgroup: str) -> list[int]:
    """Every process in the cgroup and its descendants (the freezer acts on the whole subtree)."""
    pids: set[int] = set()
    for dirpath, _dirs, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            pids.update(int(x) for x in Path(dirpath, "cgroup.procs").read_text().split())
    return sorted(pids)


def cgroup_tids(cgroup: str) -> list[int]:
    """Every thread of the cgroup subtree (v1 "tasks", v2 "cgroup.threads")."""
    tids: set[int] = set()
    for dirpath, _dirs, files in os.walk(cgroup):
        name = "tasks" if "tasks" in files else "cgroup.threads"
        if name in files:
            tids.update(int(x) for x in Path(dirpath, name).read_text().split())
    return sorted(tids)


def _containing_mount(mounts: dict[int, procfs.Mount], path: str, dev: int) -> procfs.Mount | None:
    """The deepest mount of device `dev` whose mount point contains `path`."""
    candidates = [m for m in mounts.values() if m.dev == dev and
                  (path == m.mountpoint or path.startswith(m.mountpoint.rstrip("/") + "/"))]
    return max(candidates, key=lambda m: len(m.mountpoint), default=None)


def _kcmp_sort(items: list, key) -> list[list]:
    """Group items whose kernel objects are identical (kcmp == 0), via sorting."""
    def compare(a, b) -> int:
        return {0: 0, 1: -1, 2: 1}.get(key(a, b), 0)

    ordered = sorted(items, key=functools.cmp_to_key(compare))
    groups: list[list] = []
    for item in ordered:
        if groups and key(groups[-1][0], item) == 0:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


@dataclass
class _FoundFd:
    pid: int
    fd: int
    info: procfs.FdInfo
    st: os.stat_result
    rel: str | None
    deleted: bool
    sock: object | None = None


class _Scanner:
    def __init__(self, source: Location, path_map: dict[str, str], sockets: dict | None = None):
        self.source = source
        self.sockets = sockets or {}
        self.path_map = path_map
        self.mountinfo_by_ns: dict[int, dict[int, procfs.Mount]] = {}
        self.own_mounts = procfs.mountinfo()
        self.unmovable: list[Unmovable] = []

    def sb_relative(self, pid: int, link: str, mnt_id: int | None) -> str | None:
        """Path of a link target relative to the source, or None when outside it.

        /proc links are printed from *our* root: a mount we can see (mount ids are global)
        maps through our mountinfo, also for a chrooted task.  A mount of another namespace
        prints relative to that namespace's root, so it maps through the task's mountinfo;
        a detached mount prints relative to its own root."""
        mount = None
        if mnt_id is not None:
            mount = self.own_mounts.get(mnt_id)
            if mount is None:
                mount = self._mounts(pid).get(mnt_id)
        else:
            mount = _containing_mount(self.own_mounts, link, self.source.dev)
            if mount is None and procfs.ns_inode(pid, "mnt") != procfs.ns_inode("self", "mnt"):
                mount = _containing_mount(self._mounts(pid), link, self.source.dev)
        if mount is not None:
            inside = os.path.relpath(link, mount.mountpoint)
            sb = os.path.normpath(os.path.join(mount.root, "" if inside == "." else inside))
        else:  # a detached mount: links read relative to its root
            sb = link
        rel = os.path.relpath(sb, self.source.sb_path)
        if rel == ".":
            return ""
        if rel.startswith(".."):
            return None
        return rel

    def _mounts(self, pid: int) -> dict[int, procfs.Mount]:
        ns = procfs.ns_inode(pid, "mnt")
        if ns not in self.mountinfo_by_ns:
            self.mountinfo_by_ns[ns] = procfs.mountinfo(pid)
        return self.mountinfo_by_ns[ns]

    def on_source(self, st: os.stat_result, mnt_id: int | None) -> bool:
        return st.st_dev == self.source.dev or (mnt_id is not None and mnt_id in self.source.mnt_ids)

    def scan_process(self, pid: int) -> tuple[ProcessPlan, list[_FoundFd], list[tuple[int, procfs.FdInfo]]]:
        status = procfs.status(pid)
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        vmas = procfs.maps(pid)
        vdso = next(((v.start, v.end) for v in vmas if v.path == "[vdso]"), None)
        numbers = procfs.fd_numbers(pid)
        plan = ProcessPlan(pid=pid, tids=procfs.threads(pid), comm=comm, sig_ignored=status.sig_ignored,
                           sig_caught=status.sig_caught, vdso=vdso, fd_numbers=numbers,
                           writable=[(v.start, v.end) for v in vmas if v.perms.startswith("rw")])
        found: list[_FoundFd] = []
        anon: list[tuple[int, procfs.FdInfo]] = []
        for fd in numbers:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("/"):
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    if st.st_dev != self.source.dev:
                        continue
                    info = procfs.fdinfo(pid, fd)
                    deleted = st.st_nlink == 0 and link.endswith(DELETED)
                    name = fd_path(pid, link, st)
                    rel = self.sb_relative(pid, name, info.mnt_id)
                    if rel is None and info.mnt_id not in self.source.mnt_ids:
                        continue
                    found.append(_FoundFd(pid, fd, info, st, rel, deleted))
                elif link in ("anon_inode:[eventpoll]", "anon_inode:inotify"):
                    anon.append((fd, procfs.fdinfo(pid, fd)))
                elif link.startswith("socket:[") and int(link[8:-1]) in self.sockets:
                    sock = self.sockets[int(link[8:-1])]
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                    rel = self.sb_relative(pid, sock.path, None) if sock.path.startswith("/") else None
                    info = procfs.fdinfo(pid, fd)
                    found.append(_FoundFd(pid, fd, info, st, rel, False, sock))
                    if rel is None:
                        self.unmovable.append(Unmovable(pid, f"fd {fd}", f"unix socket bound at {sock.path!r} "
                                                        "(relative or outside the source subtree)"))
            except FileNotFoundError:
                continue  # closed while we looked; revalidation after the stop catches the rest
        for kind in ("cwd", "root"):
            link = os.readlink(f"/proc/{pid}/{kind}")
            st = os.stat(f"/proc/{pid}/{kind}")
            if self.on_source(st, None):
                rel = self.sb_relative(pid, link, None)
                if rel is None:
                    self.unmovable.append(Unmovable(pid, kind, f"{link} is outside the source subtree"))
                else:
                    plan.dirs.append(DirRef(pid, kind, rel, st.st_dev, st.st_ino))
        plan.ranges = [(v.start, v.end) for v in vmas]
        plan.nspid = status.nspid[-1]
        self._scan_mappings(plan, vmas)
        return plan, found, anon

    def _scan_mappings(self, plan: ProcessPlan, vmas: list[procfs.Vma]) -> None:
        pid = plan.pid
        on_source = [v for v in vmas if v.dev == self.source.dev and v.ino]
        if not on_source:
            return
        flags = procfs.vm_flags(pid)
        for vma in on_source:
            name = vma.path.removesuffix(DELETED)
            rel = self.sb_relative(pid, name, None)
            mapped = False
            try:
                gone = os.stat(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}").st_nlink == 0
            except OSError:
                gone = False
            if gone:
                rel = self.path_map.get(rel or "")
                mapped = True
                if rel is None:
                    self.unmovable.append(Unmovable(pid, f"mapping {vma.start:#x}-{vma.end:#x}",
                                                    f"{name} is unlinked on the source and not in the path map"))
                    continue
            if rel is None:
                self.unmovable.append(Unmovable(pid, f"mapping {vma.start:#x}-{vma.end:#x}", "outside the source subtree"))
                continue
            plan.maps.append(MapRef(pid, vma, rel, flags.get(vma.start, ()), mapped))
        try:
            exe_st = os.stat(f"/proc/{pid}/exe")
        except (FileNotFoundError, PermissionError):
            return
        if exe_st.st_dev == self.source.dev:
            link = os.readlink(f"/proc/{pid}/exe")
            rel = self.sb_relative(pid, link.removesuffix(DELETED), None)
            if rel is None or exe_st.st_nlink == 0:
                self.unmovable.append(Unmovable(pid, f"exe {link}", "unlinked or outside the source subtree"))
            else:
                plan.exe = ExeRef(rel, procfs.mm_fields(pid), exe_st.st_dev, exe_st.st_ino)


def _own_copy(f: _FoundFd) -> int | None:
    """Our reference to the description behind f, or None if f was closed (or reused for
    another file) since the scan."""
    try:
        pidfd = os.pidfd_open(f.pid)
    except ProcessLookupError:
        return None
    try:
        return getfd_if_same_file(pidfd, f.fd, f.st.st_dev, f.st.st_ino)
    except OSError as exc:
        if exc.errno == errno.ESRCH:  # exiting meanwhile
            return None
        raise
    finally:
        os.close(pidfd)


def _split_by_description(group: list[_FoundFd], vanished: set[tuple[int, int]]) -> list[list[_FoundFd]]:
    """The fds on one inode, grouped by open file description. Compared through our own
    copies: a program may close an fd at any moment, a copy stays until we close it."""
    copies: dict[int, int] = {}
    try:
        live = []
        for f in group:
            copy = _own_copy(f)
            if copy is None:
                vanished.add((f.pid, f.fd))
            else:
                copies[id(f)] = copy
                live.append(f)
        me = os.getpid()
        return _kcmp_sort(live, lambda a, b: kcmp(me, me, KCMP_FILE, copies[id(a)], copies[id(b)]))
    finally:
        for fd in copies.values():
            os.close(fd)


def _dedupe_descriptions(found: list[_FoundFd], unmovable: list[Unmovable], path_map: dict[str, str],
                         vanished: set[tuple[int, int]]
                         ) -> tuple[list[Description], dict[tuple[int, int], Description]]:
    by_inode: dict[tuple[int, int], list[_FoundFd]] = defaultdict(list)
    for f in found:
        by_inode[(f.st.st_dev, f.st.st_ino)].append(f)
    descriptions: list[Description] = []
    owner: dict[tuple[int, int], Description] = {}
    for group in by_inode.values():
        sets = _split_by_description(group, vanished) if len(group) > 1 else [group]
        for same in sets:
            first = same[0]
            rel = first.rel
            unlinked = first.deleted
            if first.deleted:
                mapped = path_map.get(rel or "") if rel is not None else None
                if mapped is None:
                    for f in same:
                        unmovable.append(Unmovable(f.pid, f"fd {f.fd}", f"file {rel!r} is unlinked on the source "
                                                   "and no path map entry names its replacement"))
                    continue
                rel = mapped
            if rel is None:
                for f in same:
                    unmovable.append(Unmovable(f.pid, f"fd {f.fd}", "file is outside the source subtree"))
                continue
            kind = stat.S_IFMT(first.st.st_mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO, stat.S_IFSOCK):
                for f in same:
                    unmovable.append(Unmovable(f.pid, f"fd {f.fd}", f"file type {oct(kind)} is not supported"))
                continue
            desc = Description(index=len(descriptions), rel=rel, flags=first.info.flags, mode=first.st.st_mode,
                               dev=first.st.st_dev, ino=first.st.st_ino, holders=[(f.pid, f.fd) for f in same],
                               sock=first.sock, mapped=unlinked)
            desc.locks = [lk for f in same for lk in f.info.locks if lk.kind in ("FLOCK", "OFDLCK")]
            descriptions.append(desc)
            for f in same:
                owner[(f.pid, f.fd)] = desc
    return descriptions, owner


def discover(source: str, target: str, *, cgroup: str | None = None, pids: list[int] | None = None,
             path_map: dict[str, str] | None = None) -> SwapPlan:
    if (cgroup is None) == (not pids):
        raise ValueError("give exactly one of a cgroup or a list of pids")
    if not os.path.isdir(target):
        raise FileNotFoundError(f"target {target} is not a directory")
    if cgroup is not None and not os.path.exists(os.path.join(cgroup, "cgroup.procs")):
        raise ValueError(f"{cgroup} is not a cgroup directory (no cgroup.procs)")
    location = resolve_location(source)
    path_map = dict(path_map or {})
    all_pids = cgroup_pids(cgroup) if cgroup else procfs.tree_pids(pids or [])
    me = os.getpid()
    if me in all_pids:
        raise ValueError("the manager itself is inside the set of processes to switch")
    scanner = _Scanner(location, path_map, unixsock.bound_on(location.dev, all_pids))
    processes: list[ProcessPlan] = []
    found: list[_FoundFd] = []
    anon: dict[int, list[tuple[int, procfs.FdInfo]]] = {}
    for pid in all_pids:
        try:
            plan, pfound, panon = scanner.scan_process(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        if plan.vdso is None and not Path(f"/proc/{pid}/exe").exists():
            continue  # kernel thread
        processes.append(plan)
        found.extend(pfound)
        anon[pid] = panon
    unmovable = scanner.unmovable
    vanished: set[tuple[int, int]] = set()
    descriptions, owner = _dedupe_descriptions(found, unmovable, path_map, vanished)
    for p in processes:  # an fd opened again under a vanished number is a late one
        p.fd_numbers = [n for n in p.fd_numbers if (p.pid, n) not in vanished]
    by_pid = {p.pid: p for p in processes}
    for f in found:
        desc = owner.get((f.pid, f.fd))
        if desc is None:
            continue
        posix = [lk for lk in f.info.locks if lk.kind == "POSIX"]
        by_pid[f.pid].fds.append(FdRef(f.pid, f.fd, desc, cloexec=bool(f.info.flags & os.O_CLOEXEC),
                                       posix_locks=posix))
    _attach_anon(processes, anon, owner, location, unmovable)
    _mark_shared_tables(processes)
    for p in processes:
        if p.has_work and p.vdso is None:
            unmovable.append(Unmovable(p.pid, "process", "no [vdso] mapping to host the injected code"))
    log.info("discovered %d processes, %d descriptions on %s, %d unmovable", len(processes),
             len(descriptions), source, len(unmovable))
    return SwapPlan(source=location, target=target, processes=processes, descriptions=descriptions,
                    unmovable=unmovable, cgroup=cgroup, path_map=path_map)


def fd_path(pid: int, link: str, st: os.stat_result) -> str:
    """The path of an open file from its /proc link.  " (deleted)" also marks a file whose
    cached name was only dropped (SPFS invalidates its entries on a mode switch; network
    filesystems do it too) while the file still has links: then the name is the path, unless
    a file really is called that."""
    if not link.endswith(DELETED):
        return link
    if st.st_nlink == 0 or not _exists_in_root(pid, link):
        return link[: -len(DELETED)]
    return link


def _exists_in_root(pid: int, path: str) -> bool:
    """Whether `path` names something in process `pid`'s own tree (resolved there, so a
    symlink the process planted cannot send the look-up into ours)."""
    try:
        os.close(beneath.open_in_root(pid, path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC))
    except OSError:
        return False
    return True


def late_relative_path(plan: SwapPlan, pid: int, link: str, mnt_id: int, st: os.stat_result) -> str:
    """Path relative to the source of an fd found only after the stop; SwapError if unusable."""
    from spfs.swap.model import SwapChanged

    if st.st_nlink == 0 and link.endswith(DELETED):
        rel = _Scanner(plan.source, plan.path_map).sb_relative(pid, link[: -len(DELETED)], mnt_id)
        mapped = plan.path_map.get(rel or "")
        if mapped is None:
            raise SwapChanged(f"process {pid} opened {link} (unlinked) after discovery")
        return mapped
    rel = _Scanner(plan.source, plan.path_map).sb_relative(pid, fd_path(pid, link, st), mnt_id)
    if rel is None or stat.S_IFMT(st.st_mode) not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO):
        raise SwapChanged(f"process {pid} opened {link} after discovery and it cannot be moved")
    return rel


def _kernel_dev(sdev: int) -> int:
    return os.makedev(sdev >> 20, sdev & 0xFFFFF)


def _attach_anon(processes: list[ProcessPlan], anon: dict[int, list[tuple[int, procfs.FdInfo]]],
                 owner: dict[tuple[int, int], Description], source: Location,
                 unmovable: list[Unmovable]) -> None:
    regs: list[EpollReg] = []
    for p in processes:
        for fd, info in anon.get(p.pid, []):
            for target in info.epoll:
                desc = owner.get((p.pid, target.tfd))
                if desc is not None:
                    regs.append(EpollReg(p.pid, fd, target, desc))
    # An epoll instance shared by several processes (fork) holds each registration once.
    for same_epoll in _kcmp_sort(regs, lambda a, b: kcmp(a.pid, b.pid, KCMP_FILE, a.epfd, b.epfd)):
        seen: set[tuple[int, int]] = set()
        for reg in same_epoll:
            key = (reg.target.tfd, reg.desc.index)
            if key not in seen:
                seen.add(key)
                by_pid = next(p for p in processes if p.pid == reg.pid)
                by_pid.epoll.append(reg)
    for p in processes:
        for fd, info in anon.get(p.pid, []):
            for watch in info.inotify:
                if _kernel_dev(watch.sdev) == source.dev:
                    p.inotify.append(InotifyReg(p.pid, fd, watch))
    # An inotify instance shared by several processes holds each watch once.
    regs = [r for p in processes for r in p.inotify]
    for p in processes:
        p.inotify = []
    by_pid = {p.pid: p for p in processes}
    for same in _kcmp_sort(regs, lambda a, b: kcmp(a.pid, b.pid, KCMP_FILE, a.ifd, b.ifd)):
        seen: set[int] = set()
        for reg in same:
            if reg.watch.wd not in seen:
                seen.add(reg.watch.wd)
                by_pid[reg.pid].inotify.append(reg)


def _mark_shared_tables(processes: list[ProcessPlan]) -> None:
    """Processes sharing an fd table (CLONE_FILES) or fs struct (CLONE_FS) are swapped once."""
    with_fds = [p for p in processes if p.fds or p.epoll]
    for group in _kcmp_sort(with_fds, lambda a, b: kcmp(a.pid, b.pid, KCMP_FILES)):
        for p in group[1:]:
            p.fd_table_of = group[0].pid
    with_maps = [p for p in processes if p.maps or p.exe]
    for group in _kcmp_sort(with_maps, lambda a, b: kcmp(a.pid, b.pid, KCMP_VM)):
        for p in group[1:]:
            p.mm_of = group[0].pid
    with_dirs = [p for p in processes if p.dirs]
    for group in _kcmp_sort(with_dirs, lambda a, b: kcmp(a.pid, b.pid, KCMP_FS)):
        for p in group[1:]:
            p.fs_of = group[0].pid
