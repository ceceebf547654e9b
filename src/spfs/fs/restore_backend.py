"""Restore mode: an in-memory tree built from the manifest, modifiable like a filesystem.

CRIU opens, maps and locks the files it finds here; it also creates, links and unlinks
names (link_remap.N, ghost files) and sets xattrs. File bytes are zeros unless a content
source is given; written bytes live in a private memfd per file (restore_content.py).
"""

from __future__ import annotations

import errno
import os
import stat
import time

import pyfuse3
from pyfuse3 import FUSEError

from spfs.fs import attrs
from spfs.fs.handles import Handle, HandleTable
from spfs.fs.inodes import ROOT_INODE, Found, Inode, InodeTable, RestoreNode
from spfs.fs.manifest import Manifest, ManifestEntry, ManifestError, RootAttributes
from spfs.fs.restore_content import FileContent

_NAME_MAX = 255


def _check_name(name: bytes) -> None:
    if not name or b"/" in name or name in (b".", b".."):
        raise FUSEError(errno.EINVAL)
    if len(name) > _NAME_MAX:
        raise FUSEError(errno.ENAMETOOLONG)


class RestoreBackend:
    def __init__(self, table: InodeTable, handles: HandleTable, timeouts: attrs.CacheTimeouts):
        self.table = table
        self.handles = handles
        self.timeouts = timeouts

    # -- building the tree ---------------------------------------------------------------
    def load(self, manifest: Manifest) -> None:
        root = self.table.add(stat.S_IFDIR, ino=ROOT_INODE)
        r: RootAttributes = manifest.root
        root.restore = RestoreNode(mode=stat.S_IFDIR | r.mode, uid=r.uid, gid=r.gid,
                                   atime_ns=r.atime_ns, mtime_ns=r.mtime_ns,
                                   ctime_ns=r.ctime_ns, nlink=2, children={})
        self.add_entries(manifest.entries)

    def _resolve_dir(self, components: tuple[bytes, ...], create: bool,
                     planned: set[tuple[bytes, ...]] | None = None) -> Inode | None:
        inode = self.table.inodes[ROOT_INODE]
        for depth, part in enumerate(components):
            assert inode.restore is not None and inode.restore.children is not None
            child = inode.restore.children.get(part)
            if child is None:
                if not create:
                    return None
                now = time.time_ns()
                child_inode = self._attach(inode, part, RestoreNode(
                    mode=stat.S_IFDIR | 0o755, uid=0, gid=0, atime_ns=now, mtime_ns=now,
                    ctime_ns=now, nlink=2, children={}))
                inode = child_inode
                continue
            inode = self.table.inodes[child]
            if not inode.is_dir:
                raise ManifestError(f"{b'/'.join(components[:depth + 1]).decode(errors='replace')!r}"
                                    " exists and is not a directory")
        return inode

    def check_entries(self, entries: tuple[ManifestEntry, ...]) -> None:
        """Refuse entries that collide with the current tree, before anything changes."""
        for entry in entries:
            parts = entry.components
            parent = self._resolve_dir(parts[:-1], create=False)
            if parent is not None and parent.restore is not None \
                    and parts[-1] in (parent.restore.children or {}):
                raise ManifestError(f"entry {entry.path!r} already exists")

    def add_entries(self, entries: tuple[ManifestEntry, ...]) -> None:
        self.check_entries(entries)
        for entry in entries:
            parts = entry.components
            parent = self._resolve_dir(parts[:-1], create=True)
            assert parent is not None
            node = RestoreNode(mode=entry.file_type | entry.mode, uid=entry.uid, gid=entry.gid,
                               atime_ns=entry.atime_ns, mtime_ns=entry.mtime_ns,
                               ctime_ns=entry.ctime_ns)
            if entry.type == "dir":
                node.children, node.nlink = {}, 2
            elif entry.type == "file":
                node.content = FileContent(entry.size, entry.content_source)
            elif entry.type == "symlink":
                assert entry.target is not None
                node.target = os.fsencode(entry.target)
            self._attach(parent, parts[-1], node).origin = b"/".join(parts)

    def _attach(self, parent: Inode, name: bytes, node: RestoreNode) -> Inode:
        assert parent.restore is not None and parent.restore.children is not None
        inode = self.table.add(stat.S_IFMT(node.mode))
        inode.restore = node
        parent.restore.children[name] = inode.ino
        self.table.add_name(parent.ino, name, inode.ino)
        if node.children is not None:
            parent.restore.nlink += 1
        return inode

    # -- helpers -------------------------------------------------------------------------
    def _node(self, ino: int) -> RestoreNode:
        node = self.table.get(ino).restore
        if node is None:
            raise FUSEError(errno.ESTALE)
        return node

    def _dir(self, ino: int) -> tuple[Inode, RestoreNode, dict[bytes, int]]:
        inode = self.table.get(ino)
        node = inode.restore
        if node is None:
            raise FUSEError(errno.ESTALE)
        if node.children is None:
            raise FUSEError(errno.ENOTDIR)
        return inode, node, node.children

    def _child(self, parent_ino: int, name: bytes) -> Inode:
        _, _, children = self._dir(parent_ino)
        ino = children.get(name)
        if ino is None:
            raise FUSEError(errno.ENOENT)
        return self.table.get(ino)

    def _create(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext,
                **fields: object) -> Inode:
        _check_name(name)
        parent, pnode, children = self._dir(parent_ino)
        if name in children:
            raise FUSEError(errno.EEXIST)
        now = time.time_ns()
        gid = pnode.gid if pnode.mode & stat.S_ISGID else ctx.gid
        if stat.S_ISDIR(mode) and pnode.mode & stat.S_ISGID:
            mode |= stat.S_ISGID
        node = RestoreNode(mode=mode, uid=ctx.uid, gid=gid, atime_ns=now, mtime_ns=now,
                           ctime_ns=now, **fields)  # type: ignore[arg-type]
        pnode.mtime_ns = pnode.ctime_ns = now
        return self._attach(parent, name, node)

    def attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        if inode.restore is None:
            raise FUSEError(errno.ESTALE)
        return attrs.from_restore(inode.ino, inode.restore, self.timeouts)

    # -- operations ----------------------------------------------------------------------
    # Async only to share the proxy backend's interface: nothing here awaits, so every
    # restore-mode request is answered from memory on the loop in one piece.
    def _found(self, inode: Inode) -> Found:
        return inode, self.attributes(inode)

    async def getattr(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return self.attributes(inode)

    async def lookup_many(self, parent_ino: int, names: list[bytes]) -> list[Found | None]:
        found: list[Found | None] = []
        for name in names:
            try:
                found.append(await self.lookup(parent_ino, name, None))  # type: ignore[arg-type]
            except (OSError, FUSEError):
                found.append(None)
        return found

    async def lookup(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> Found | None:
        _, _, children = self._dir(parent_ino)
        ino = children.get(name)
        return self._found(self.table.get(ino)) if ino is not None else None

    async def setattr(self, inode: Inode, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                handle: Handle | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode.ino)
        if fields.update_size:
            if node.content is None:
                raise FUSEError(errno.EISDIR if node.children is not None else errno.EINVAL)
            node.content.truncate(attr.st_size)
            node.mtime_ns = time.time_ns()
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else time.time_ns()
        return self.attributes(inode)

    async def readlink(self, inode: Inode, ctx: pyfuse3.RequestContext) -> bytes:
        node = self._node(inode.ino)
        if node.target is None:
            raise FUSEError(errno.EINVAL)
        return node.target

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int,
              ctx: pyfuse3.RequestContext) -> Found:
        fields: dict[str, object] = {"rdev": rdev}
        if stat.S_ISREG(mode):
            fields["content"] = FileContent()
        return self._found(self._create(parent_ino, name, mode, ctx, **fields))

    async def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Found:
        return self._found(self._create(parent_ino, name, stat.S_IFDIR | stat.S_IMODE(mode), ctx,
                                        children={}, nlink=2))

    async def symlink(self, parent_ino: int, name: bytes, target: bytes,
                ctx: pyfuse3.RequestContext) -> Found:
        return self._found(self._create(parent_ino, name, stat.S_IFLNK | 0o777, ctx,
                                        target=target))

    async def link(self, inode: Inode, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> Found:
        _check_name(name)
        node = self._node(inode.ino)
        if node.children is not None:
            raise FUSEError(errno.EPERM)
        _, pnode, children = self._dir(parent_ino)
        if name in children:
            raise FUSEError(errno.EEXIST)
        children[name] = inode.ino
        self.table.add_name(parent_ino, name, inode.ino)
        node.nlink += 1
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = time.time_ns()
        return self._found(inode)

    def _drop_link(self, parent_ino: int, name: bytes, victim: Inode) -> None:
        _, pnode, children = self._dir(parent_ino)
        del children[name]
        self.table.remove_name(parent_ino, name)
        node = victim.restore
        assert node is not None
        now = time.time_ns()
        if node.children is not None:
            pnode.nlink -= 1
            node.nlink = 0
        else:
            node.nlink -= 1
        node.ctime_ns = pnode.mtime_ns = pnode.ctime_ns = now
        self.table.maybe_drop(victim)

    async def unlink(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        victim = self._child(parent_ino, name)
        if victim.is_dir:
            raise FUSEError(errno.EISDIR)
        self._drop_link(parent_ino, name, victim)

    async def rmdir(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        victim = self._child(parent_ino, name)
        node = victim.restore
        if node is None or node.children is None:
            raise FUSEError(errno.ENOTDIR)
        if node.children:
            raise FUSEError(errno.ENOTEMPTY)
        self._drop_link(parent_ino, name, victim)

    async def rename(self, parent_ino: int, name: bytes, new_parent_ino: int, new_name: bytes,
               flags: int, ctx: pyfuse3.RequestContext) -> None:
        _check_name(new_name)
        moved = self._child(parent_ino, name)
        _, _, new_children = self._dir(new_parent_ino)
        target_ino = new_children.get(new_name)
        if flags & pyfuse3.RENAME_EXCHANGE:
            if target_ino is None:
                raise FUSEError(errno.ENOENT)
            self._exchange(parent_ino, name, new_parent_ino, new_name, moved,
                           self.table.get(target_ino))
            return
        if target_ino == moved.ino:
            return  # same inode under both names: POSIX says do nothing
        if target_ino is not None:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise FUSEError(errno.EEXIST)
            target = self.table.get(target_ino)
            if moved.is_dir and not target.is_dir:
                raise FUSEError(errno.ENOTDIR)
            if target.is_dir and not moved.is_dir:
                raise FUSEError(errno.EISDIR)
            if target.restore is not None and target.restore.children:
                raise FUSEError(errno.ENOTEMPTY)
            self._drop_link(new_parent_ino, new_name, target)
        _, pnode, children = self._dir(parent_ino)
        _, new_pnode, new_children = self._dir(new_parent_ino)
        del children[name]
        new_children[new_name] = moved.ino
        self.table.rename_name(parent_ino, name, new_parent_ino, new_name)
        if moved.is_dir and parent_ino != new_parent_ino:
            pnode.nlink -= 1
            new_pnode.nlink += 1
        now = time.time_ns()
        pnode.mtime_ns = pnode.ctime_ns = new_pnode.mtime_ns = new_pnode.ctime_ns = now
        if moved.restore is not None:
            moved.restore.ctime_ns = now

    def _exchange(self, parent_ino: int, name: bytes, new_parent_ino: int, new_name: bytes,
                  first: Inode, second: Inode) -> None:
        _, pnode, children = self._dir(parent_ino)
        _, new_pnode, new_children = self._dir(new_parent_ino)
        children[name], new_children[new_name] = second.ino, first.ino
        self.table.exchange_names(parent_ino, name, new_parent_ino, new_name)
        if parent_ino != new_parent_ino and first.is_dir != second.is_dir:
            delta = 1 if first.is_dir else -1
            pnode.nlink -= delta
            new_pnode.nlink += delta

    async def open(self, inode: Inode, flags: int, ctx: pyfuse3.RequestContext) -> Handle:
        node = self._node(inode.ino)
        if node.content is None:
            raise FUSEError(errno.EISDIR if node.children is not None else errno.EINVAL)
        return self.handles.add(inode.ino, flags, restore=True)

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[Handle, Found]:
        inode = self._create(parent_ino, name, stat.S_IFREG | stat.S_IMODE(mode), ctx,
                             content=FileContent())
        return self.handles.add(inode.ino, flags, restore=True), self._found(inode)

    def _content(self, handle: Handle) -> FileContent:
        content = self._node(handle.ino).content
        if content is None:
            raise FUSEError(errno.EISDIR)
        return content

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        return self._content(handle).read(offset, size)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        node = self._node(handle.ino)
        written = self._content(handle).write(offset, data)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return written

    async def flush(self, handle: Handle) -> None:
        pass

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        pass

    async def opendir(self, inode: Inode, ctx: pyfuse3.RequestContext) -> Handle:
        self._dir(inode.ino)
        return self.handles.add(inode.ino, os.O_RDONLY, is_dir=True, restore=True)

    async def list_dir(self, handle: Handle) -> list[bytes]:
        return list(self._dir(handle.ino)[2])

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = 4096
        data.f_blocks = data.f_bfree = data.f_bavail = 1 << 30
        data.f_files = data.f_ffree = data.f_favail = 1 << 30
        data.f_namemax = _NAME_MAX
        return data

    async def setxattr(self, inode: Inode, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._node(inode.ino).xattrs[name] = value

    async def getxattr(self, inode: Inode, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return self._node(inode.ino).xattrs[name]
        except KeyError:
            raise FUSEError(pyfuse3.ENOATTR) from None

    async def listxattr(self, inode: Inode, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return list(self._node(inode.ino).xattrs)

    async def removexattr(self, inode: Inode, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._node(inode.ino).xattrs.pop(name, None) is None:
            raise FUSEError(pyfuse3.ENOATTR)
