"""Re-binding every known inode and open handle to a new proxy target at a mode switch.

Mapping:
* A non-directory with handles opened in proxy mode keeps its old object, and so its
  handles keep working on the very file they opened (by identity: renames and unlinks do
  not matter). Its names are dropped, so the next lookup of the same name gets a new inode
  bound to the new target; one FUSE inode never mixes two files in the page cache.
* Every other inode goes to the object at its relative path *at switch time* (its first
  known name, walked up to the root) in the new target, resolved with openat2
  RESOLVE_BENEATH and O_NOFOLLOW, if the file type matches; otherwise it is stale (ESTALE).
  A file with no name left (CRIU unlinked a silly-renamed file it re-opened) goes to the
  manifest path it was made from, link_remap.N, and keeps reporting no links.
* Handles opened in restore mode, and open directory handles of re-bound directories, are
  re-opened on the inode's new object with their original flags (minus O_CREAT/O_EXCL/
  O_TRUNC); if that fails the handle is broken and answers EIO.

In three steps, so that the one openat2 per inode (an NFS round trip each) runs in a
worker thread while the trio loop goes on serving the control socket, FORGET and RELEASE:
plan() takes a snapshot of the tables (loop), open_all() opens everything on the new
target (worker, cancellable, progress logged), apply() changes the tables (loop). FORGET
and RELEASE may run between the steps; apply() lets go of what they made unneeded.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import threading
import time
from typing import Callable

from spfs.fs.handles import HandleTable
from spfs.fs.inodes import ROOT_INODE, Inode, InodeTable, ProxyObject
from spfs.fs.proxy_backend import open_beneath, reopen
from spfs.fs.target_dir import TargetDir
from spfs.sys.fds import close_quietly

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 2.0


@dataclasses.dataclass
class RebindResult:
    rebound: int = 0
    kept: int = 0
    stale: int = 0
    reopened: int = 0
    broken: int = 0
    rebound_inodes: set[int] = dataclasses.field(default_factory=set)


@dataclasses.dataclass(frozen=True)
class _HandleItem:
    fh: int
    ino: int
    flags: int
    is_dir: bool
    restore: bool


@dataclasses.dataclass
class RebindPlan:
    target_fd: int
    to_open: list[tuple[int, bytes | None, int]]   # (ino, relative path, kind)
    kept: list[int]                                 # inodes keeping their old object
    handles: list[_HandleItem]                      # restore and directory handles


@dataclasses.dataclass
class Opened:
    """What open_all found: per inode an O_PATH descriptor and its stat (None: stale),
    per handle a new descriptor or the error re-opening it."""
    inodes: dict[int, tuple[int, os.stat_result] | None]
    handles: dict[int, int | OSError]

    def close(self) -> None:
        for found in self.inodes.values():
            if found is not None:
                close_quietly(found[0])
        for fd in self.handles.values():
            if isinstance(fd, int):
                close_quietly(fd)


class Progress:
    """Shared between the worker running open_all and the loop waiting for it: the
    count done (for the stall bound), and a cancel that makes the worker close whatever
    it opened rather than hand it to nobody."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._cancelled = False
        self._result: Opened | None = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            result, self._result = self._result, None
        if result is not None:
            result.close()

    def deliver(self, opened: Opened) -> Opened | None:
        with self._lock:
            if not self._cancelled:
                self._result = opened
                return opened
        opened.close()
        return None

    @property
    def cancelled(self) -> bool:
        return self._cancelled


def plan(table: InodeTable, handles: HandleTable, target: TargetDir) -> RebindPlan:
    """Loop side, first step: which inodes move to which path, which handles re-open."""
    to_open: list[tuple[int, bytes | None, int]] = []
    kept: list[int] = []
    for ino, inode in table.inodes.items():
        if ino == ROOT_INODE:
            continue
        if inode.proxy is not None and inode.open_handles > 0 and not inode.is_dir:
            kept.append(ino)
        else:
            to_open.append((ino, _path_for(table, inode), inode.kind))
    items = [_HandleItem(h.fh, h.ino, h.flags, h.is_dir, h.restore)
             for h in handles.handles.values() if h.restore or h.is_dir]
    return RebindPlan(target.fd, to_open, kept, items)


def open_all(rebind: RebindPlan, progress: Progress) -> Opened | None:
    """Worker side: open every planned inode and handle on the new target. Returns None
    (having closed everything) if the loop cancelled meanwhile."""
    opened = Opened({}, {})
    start = last_log = time.monotonic()
    for ino, relpath, kind in rebind.to_open:
        if progress.cancelled:
            opened.close()
            return None
        found: tuple[int, os.stat_result] | None = None
        if relpath:
            try:
                found = open_beneath(rebind.target_fd, relpath)
            except OSError:
                found = None
            if found is not None and stat.S_IFMT(found[1].st_mode) != kind:
                os.close(found[0])
                found = None
        opened.inodes[ino] = found
        progress.done += 1
        now = time.monotonic()
        if now - last_log >= _PROGRESS_EVERY_S:
            last_log = now
            log.info("re-binding: %d of %d inodes looked up on the new target (%.1f s)",
                     progress.done, progress.total, now - start)
    for item in rebind.handles:
        if item.ino == ROOT_INODE:
            path_fd: int | None = rebind.target_fd
        else:
            found = opened.inodes.get(item.ino)
            path_fd = found[0] if found is not None else None
        if path_fd is None or not (item.restore or item.is_dir):
            continue  # stale (apply() marks it broken) or a handle that keeps its file
        try:
            obj = ProxyObject(fd=path_fd, dev=0, ino=0)
            if item.is_dir:
                opened.handles[item.fh] = os.open(
                    obj.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                opened.handles[item.fh] = reopen(obj, item.flags)
        except OSError as exc:
            opened.handles[item.fh] = exc
        progress.done += 1
    return progress.deliver(opened)


def apply(table: InodeTable, handles: HandleTable, target: TargetDir, rebind: RebindPlan,
          opened: Opened, close_soon: Callable[[int | None], None]) -> RebindResult:
    """Loop side, last step: bind what open_all found. The old descriptors go through
    table.close_fd (calls of the old backend may still be running)."""
    result = RebindResult()
    table.by_backing.clear()
    root = table.inodes[ROOT_INODE]
    table.bind_proxy(root, ProxyObject(fd=os.dup(target.fd), dev=target.dev, ino=target.ino))
    root.stale = False
    result.rebound_inodes.add(ROOT_INODE)
    for ino in rebind.kept:
        inode = table.inodes.get(ino)
        if inode is None or inode.proxy is None:
            continue  # forgotten while open_all ran
        table.by_backing.setdefault((inode.proxy.dev, inode.proxy.ino), ino)
        for parent, name in list(inode.names):
            table.remove_name(parent, name)
        result.kept += 1
    for ino, found in opened.inodes.items():
        inode = table.inodes.get(ino)
        if inode is None:  # forgotten while open_all ran
            if found is not None:
                os.close(found[0])
            continue
        if found is not None:
            fd, st = found
            table.bind_proxy(inode, ProxyObject(fd=fd, dev=st.st_dev, ino=st.st_ino))
            inode.stale = False
            inode.orphan = not inode.names
            result.rebound += 1
            result.rebound_inodes.add(ino)
        else:
            _unbind(table, inode)
            inode.stale = True
            result.stale += 1
    _apply_handles(table, handles, rebind, opened, result, close_soon)
    return result


def _unbind(table: InodeTable, inode: Inode) -> None:
    if inode.proxy is not None:
        table.close_fd(inode.proxy.fd)
        inode.proxy = None


def _apply_handles(table: InodeTable, handles: HandleTable, rebind: RebindPlan,
                   opened: Opened, result: RebindResult,
                   close_soon: Callable[[int | None], None]) -> None:
    for item in rebind.handles:
        new_fd = opened.handles.pop(item.fh, None)
        handle = handles.handles.get(item.fh)
        if handle is None:  # released while open_all ran
            if isinstance(new_fd, int):
                close_soon(new_fd)
            continue
        if not handle.restore and not (handle.is_dir and handle.ino in result.rebound_inodes):
            if isinstance(new_fd, int):
                close_soon(new_fd)
            continue
        handle.restore = False
        if handle.fd is not None:
            table.close_fd(handle.fd)   # a directory's: a readdir may still be using it
        handle.fd = None
        inode = table.inodes.get(handle.ino)
        if inode is None or inode.stale or inode.proxy is None or new_fd is None:
            handle.broken = OSError(errno.ESTALE, "no such object in the new target")
            result.broken += 1
            if isinstance(new_fd, int):
                close_soon(new_fd)
            continue
        if isinstance(new_fd, OSError):
            handle.broken = new_fd
            result.broken += 1
            log.warning("re-opening restore handle %d of inode %d in the target failed: %s",
                        handle.fh, handle.ino, new_fd)
            continue
        handle.fd = new_fd
        result.reopened += 1


def _path_for(table: InodeTable, inode: Inode) -> bytes | None:
    path = table.relative_path(inode.ino)
    if path is None and not inode.names and not inode.is_dir:
        return inode.origin
    return path


def drop_restore_nodes(table: InodeTable) -> None:
    """Restore content is never needed again once the target is in place."""
    for inode in list(table.inodes.values()):
        node = inode.restore
        if node is None:
            continue
        inode.restore = None
        if node.content is not None:
            node.content.close()
        table.maybe_drop(inode)
