"""The FUSE inode table shared by all modes.

A FUSE inode number stays valid across mode changes: in restore mode it is backed by a
RestoreNode (the in-memory tree), in proxy mode by a ProxyObject (an O_PATH descriptor of
the target's file, so renames and unlinks on the target do not lose it). On a switch each
inode is re-bound to the object at its relative path in the new target (see switcher.py).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from typing import Callable

import pyfuse3

from spfs.fs.restore_content import FileContent

ROOT_INODE = pyfuse3.ROOT_INODE
_MAX_DEPTH = 4096


@dataclasses.dataclass(eq=False)
class RestoreNode:
    mode: int                 # full st_mode, file type included
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    nlink: int = 1
    children: dict[bytes, int] | None = None   # directories: name -> inode number
    target: bytes | None = None                # symlinks
    content: FileContent | None = None         # regular files
    xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        if self.content is not None:
            return self.content.size
        if self.target is not None:
            return len(self.target)
        return 4096 if self.children is not None else 0


@dataclasses.dataclass(eq=False)
class ProxyObject:
    fd: int     # O_PATH | O_NOFOLLOW descriptor of the target object
    dev: int
    ino: int

    @property
    def proc_path(self) -> str:
        # Re-opening through the magic link reaches the very inode the descriptor holds,
        # whatever happened to its name since; it never resolves a path in the target.
        return f"/proc/self/fd/{self.fd}"


@dataclasses.dataclass(eq=False)
class Inode:
    ino: int
    kind: int                                   # stat.S_IFMT bits
    lookups: int = 0                            # kernel lookup count
    open_handles: int = 0
    # Directory entries naming this inode, as (parent inode, name), oldest first. In
    # restore mode they are the tree's links; in proxy mode the names the kernel was told.
    names: dict[tuple[int, bytes], None] = dataclasses.field(default_factory=dict)
    spfs_xattrs: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    restore: RestoreNode | None = None
    proxy: ProxyObject | None = None
    stale: bool = False
    forget_asked: bool = False   # the kernel was asked to drop its entries (inode_budget.py)
    # The manifest path a restore-mode inode was made from: where it is found on a target
    # once CRIU has unlinked every name of it (link_remap.N of a silly-renamed open file).
    origin: bytes | None = None
    # Re-bound by its origin, with no name on SPFS: it reports no links, as it did.
    orphan: bool = False
    # A socket file made through SPFS by bind(): the kernel finds the bound socket by this
    # very FUSE inode, so its name must keep leading here (see ProxyBackend._resolve).
    bound_socket: bool = False
    # Proxy mode: written since its last FLUSH, which then has writing back to ask of the
    # target (a FLUSH with nothing written costs a worker trip for nothing).
    unflushed: bool = False

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR


# What the name operations of a backend answer: the inode and its attributes, taken from
# the stat the backend made anyway (a second stat per request is measurable).
Found = tuple[Inode, pyfuse3.EntryAttributes]


class InodeTable:
    def __init__(self) -> None:
        self.inodes: dict[int, Inode] = {}
        self.entries: dict[tuple[int, bytes], int] = {}   # (parent, name) -> inode number
        self.by_backing: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) -> inode number
        self._next_ino = ROOT_INODE + 1
        self.forget_asked = 0   # inodes still present whose entries the kernel was asked to drop
        # How an inode's O_PATH descriptor is let go of: the daemon defers the close until
        # no worker that may still be using the number runs (WorkerPool.close_later).
        self.close_fd: Callable[[int], None] = os.close

    def __len__(self) -> int:
        return len(self.inodes)

    def get(self, ino: int) -> Inode:
        try:
            inode = self.inodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if inode.stale:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return inode

    def add(self, kind: int, ino: int | None = None) -> Inode:
        if ino is None:
            ino = self._next_ino
            self._next_ino += 1
        inode = Inode(ino=ino, kind=kind)
        self.inodes[ino] = inode
        return inode

    # -- names ---------------------------------------------------------------------------
    def add_name(self, parent: int, name: bytes, ino: int) -> None:
        key = (parent, name)
        previous = self.entries.get(key)
        if previous is not None and previous != ino and previous in self.inodes:
            self.inodes[previous].names.pop(key, None)
        self.entries[key] = ino
        self.inodes[ino].names[key] = None

    def remove_name(self, parent: int, name: bytes) -> int | None:
        ino = self.entries.pop((parent, name), None)
        if ino is not None and ino in self.inodes:
            self.inodes[ino].names.pop((parent, name), None)
        return ino

    def rename_name(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        ino = self.remove_name(parent, name)
        victim = self.remove_name(new_parent, new_name)
        if ino is not None:
            self.add_name(new_parent, new_name, ino)
        if victim is not None and victim in self.inodes:
            self.maybe_drop(self.inodes[victim])

    def exchange_names(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        first = self.remove_name(parent, name)
        second = self.remove_name(new_parent, new_name)
        if first is not None:
            self.add_name(new_parent, new_name, first)
        if second is not None:
            self.add_name(parent, name, second)

    def relative_path(self, ino: int) -> bytes | None:
        """The inode's path below the root (b"" for the root), or None if it has no name."""
        parts: list[bytes] = []
        for _ in range(_MAX_DEPTH):
            if ino == ROOT_INODE:
                return b"/".join(reversed(parts))
            inode = self.inodes.get(ino)
            if inode is None or not inode.names:
                return None
            ino, name = next(iter(inode.names))
            parts.append(name)
        return None

    # -- backing objects -----------------------------------------------------------------
    def bind_proxy(self, inode: Inode, obj: ProxyObject) -> None:
        if inode.proxy is not None and inode.proxy.fd != obj.fd:
            self._release_proxy(inode)
        inode.proxy = obj
        self.by_backing.setdefault((obj.dev, obj.ino), inode.ino)

    def find_backing(self, st: os.stat_result) -> Inode | None:
        ino = self.by_backing.get((st.st_dev, st.st_ino))
        inode = self.inodes.get(ino) if ino is not None else None
        if inode is None or inode.stale or inode.proxy is None:
            return None
        return inode

    def _release_proxy(self, inode: Inode) -> None:
        obj = inode.proxy
        if obj is None:
            return
        if self.by_backing.get((obj.dev, obj.ino)) == inode.ino:
            del self.by_backing[(obj.dev, obj.ino)]
        self.close_fd(obj.fd)
        inode.proxy = None

    # -- lifetime ------------------------------------------------------------------------
    def forget(self, ino: int, count: int) -> None:
        inode = self.inodes.get(ino)
        if inode is None:
            return
        inode.lookups = max(0, inode.lookups - count)
        self.maybe_drop(inode)

    def maybe_drop(self, inode: Inode) -> None:
        """Free an inode nobody can reach any more: no kernel reference, no open handle,
        and (in restore mode) no directory entry."""
        if inode.ino == ROOT_INODE or inode.lookups > 0 or inode.open_handles > 0:
            return
        if inode.restore is not None and inode.names:
            return
        for key in list(inode.names):
            if self.entries.get(key) == inode.ino:
                del self.entries[key]
        self._release_proxy(inode)
        if inode.restore is not None and inode.restore.content is not None:
            inode.restore.content.close()
        if inode.forget_asked:
            self.forget_asked -= 1
        self.inodes.pop(inode.ino, None)

    def close_all(self) -> None:
        for inode in list(self.inodes.values()):
            self._release_proxy(inode)
            if inode.restore is not None and inode.restore.content is not None:
                inode.restore.content.close()
        self.inodes.clear()
        self.entries.clear()
        self.by_backing.clear()
        self.forget_asked = 0
