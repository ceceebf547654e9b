"""Re-binding every known inode and open handle to a new proxy target at a mode switch.

Mapping: an inode goes to the object at its relative path *at switch time* (its first
known name, walked up to the root) in the new target, resolved with openat2
RESOLVE_BENEATH and O_NOFOLLOW, and only if the file type matches. An inode that cannot
be mapped keeps its old proxy object when it has open handles (so they keep working by
identity) and is marked stale otherwise (ESTALE). Handles opened in proxy mode keep their
own descriptor; handles opened in restore mode are re-opened on the inode's new object
with their original flags (minus O_CREAT/O_EXCL/O_TRUNC); if that fails the handle is
broken and answers EIO.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat

from spfs.fs.handles import HandleTable
from spfs.fs.inodes import ROOT_INODE, InodeTable, ProxyObject
from spfs.fs.proxy_backend import open_beneath, reopen
from spfs.fs.target_dir import TargetDir

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RebindResult:
    rebound: int = 0
    kept: int = 0
    stale: int = 0
    reopened: int = 0
    broken: int = 0


def rebind_inodes(table: InodeTable, target: TargetDir) -> RebindResult:
    result = RebindResult()
    paths = {ino: table.relative_path(ino) for ino in table.inodes if ino != ROOT_INODE}
    table.by_backing.clear()
    root = table.inodes[ROOT_INODE]
    table.bind_proxy(root, ProxyObject(fd=os.dup(target.fd), dev=target.dev, ino=target.ino))
    root.stale = False
    for ino, relpath in paths.items():
        inode = table.inodes[ino]
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
            result.rebound += 1
        elif inode.proxy is not None and inode.open_handles > 0:
            table.by_backing.setdefault((inode.proxy.dev, inode.proxy.ino), ino)
            result.kept += 1
        else:
            if inode.proxy is not None:
                os.close(inode.proxy.fd)
                inode.proxy = None
            inode.stale = True
            result.stale += 1
    return result


def reopen_restore_handles(table: InodeTable, handles: HandleTable, result: RebindResult) -> None:
    for handle in handles.handles.values():
        if not handle.restore:
            continue
        handle.restore = False
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
