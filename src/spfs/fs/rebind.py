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
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat

from spfs.fs.handles import HandleTable
from spfs.fs.inodes import ROOT_INODE, Inode, InodeTable, ProxyObject
from spfs.fs.proxy_backend import open_beneath, reopen
from spfs.fs.target_dir import TargetDir
from spfs.sys.fds import close_quietly

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RebindResult:
    rebound: int = 0
    kept: int = 0
    stale: int = 0
    reopened: int = 0
    broken: int = 0
    rebound_inodes: set[int] = dataclasses.field(default_factory=set)


def rebind_inodes(table: InodeTable, target: TargetDir) -> RebindResult:
    result = RebindResult()
    paths = {ino: _path_for(table, table.inodes[ino]) for ino in table.inodes if ino != ROOT_INODE}
    table.by_backing.clear()
    root = table.inodes[ROOT_INODE]
    table.bind_proxy(root, ProxyObject(fd=os.dup(target.fd), dev=target.dev, ino=target.ino))
    root.stale = False
    result.rebound_inodes.add(ROOT_INODE)
    for ino, relpath in paths.items():
        inode = table.inodes[ino]
        if inode.proxy is not None and inode.open_handles > 0 and not inode.is_dir:
            table.by_backing.setdefault((inode.proxy.dev, inode.proxy.ino), ino)
            for parent, name in list(inode.names):
                table.remove_name(parent, name)
            result.kept += 1
            continue
        found: tuple[int, os.stat_result] | None = None
        if relpath:
            try:
                found = open_beneath(target.fd, relpath)
            except OSError:
                found = None
            if found is not None and stat.S_IFMT(found[1].st_mode) != inode.kind:
                os.close(found[0])
                found = None
        if found is not None:
            fd, st = found
            table.bind_proxy(inode, ProxyObject(fd=fd, dev=st.st_dev, ino=st.st_ino))
            inode.stale = False
            inode.orphan = not inode.names
            result.rebound += 1
            result.rebound_inodes.add(ino)
        else:
            if inode.proxy is not None:
                os.close(inode.proxy.fd)
                inode.proxy = None
            inode.stale = True
            result.stale += 1
    return result


def _path_for(table: InodeTable, inode: Inode) -> bytes | None:
    path = table.relative_path(inode.ino)
    if path is None and not inode.names and not inode.is_dir:
        return inode.origin
    return path


def reopen_handles(table: InodeTable, handles: HandleTable, result: RebindResult) -> None:
    for handle in handles.handles.values():
        if not handle.restore and not (handle.is_dir and handle.ino in result.rebound_inodes):
            continue
        handle.restore = False
        close_quietly(handle.fd)
        handle.fd = None
        inode = table.inodes.get(handle.ino)
        if inode is None or inode.stale or inode.proxy is None:
            handle.broken = OSError(errno.ESTALE, "no such object in the new target")
            result.broken += 1
            continue
        try:
            if handle.is_dir:
                handle.fd = os.open(inode.proxy.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            else:
                handle.fd = reopen(inode.proxy, handle.flags)
            result.reopened += 1
        except OSError as exc:
            handle.broken = exc
            result.broken += 1
            log.warning("re-opening restore handle %d of inode %d in the target failed: %s",
                        handle.fh, handle.ino, exc)


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
