"""Proxy mode: every operation forwarded to the target directory.

Each known inode holds an O_PATH descriptor of its target object; names are resolved one
component at a time below the parent's descriptor with openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) and O_NOFOLLOW, so neither '..' nor a symlink
planted in the target can make the daemon (root) touch anything outside it. Symlinks are
only ever read (readlink), never followed by the daemon: the kernel resolves them in the
caller's own namespace, as on NFS. Operations that change the target run with the caller's
fsuid/fsgid/groups (creds.py), so the target does the permission checks and new objects
are owned by the caller.

Every syscall on the target runs in a worker thread (workers.py) and the trio thread
only waits for it, so a target that hangs stalls only the requests that touch it. The
inode and handle tables change on the trio thread only, after the worker has returned:
the `_w_*` functions (worker side) make syscalls and return what they found, the async
methods (loop side) decide what it means for the tables. A worker may read the tables
as a hint (to skip opening an object already held), never write them.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from typing import Any, Callable, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from spfs.fs import attrs, syscalls
from spfs.sys import beneath
from spfs.fs.handles import Handle, HandleTable
from spfs.fs.inode_budget import InodeBudget
from spfs.fs.inodes import Found, Inode, InodeTable, ProxyObject
from spfs.fs.workers import WorkerPool

_LOOKUP_RESOLVE = (beneath.RESOLVE_BENEATH | beneath.RESOLVE_NO_SYMLINKS
                   | beneath.RESOLVE_NO_MAGICLINKS)
# Flags that make no sense when re-opening an existing object through its O_PATH descriptor.
_REOPEN_DROP = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_TRUNC | os.O_NOFOLLOW | os.O_DIRECT
_O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _check_name(name: bytes) -> None:
    if not name or b"/" in name or name in (b".", b".."):
        raise FUSEError(errno.ENOENT)


def open_beneath(dirfd: int, relpath: bytes) -> tuple[int, os.stat_result]:
    """O_PATH descriptor and stat of *relpath* below *dirfd*, never leaving it, and never
    through a symlink (a name known as a directory may have become one since)."""
    fd = beneath.openat2(dirfd, relpath, _O_PATH_FLAGS, _LOOKUP_RESOLVE)
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def reopen(obj: ProxyObject, flags: int) -> int:
    """A real descriptor of the object *obj* holds (never of a path)."""
    return os.open(obj.proc_path, (flags & ~_REOPEN_DROP) | os.O_CLOEXEC)


T = TypeVar("T")
# Directory entries looked up per worker call in readdir: about what one reply holds.
READDIR_BATCH = 32


@dataclasses.dataclass
class Probe:
    """What a worker found under a name: its stat, and for an object not held yet an
    O_PATH descriptor of it with that descriptor's own stat."""
    st: os.stat_result
    fd: int | None = None
    fst: os.stat_result | None = None


def _w_probe(table: InodeTable, dirfd: int, name: bytes, force_open: bool) -> Probe | None:
    """Worker side of a lookup. None if there is no such name.

    A name that leads to an object we already hold (the usual case: the kernel's entry
    expired, or a hard link) costs one fstatat: a single checked component with
    AT_SYMLINK_NOFOLLOW cannot leave the directory. Whether it is held is read from the
    table as a hint only; the loop decides (and opens after all if the hint was stale).
    """
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not force_open and (table.by_backing.get((st.st_dev, st.st_ino)) is not None
                           or stat.S_ISSOCK(st.st_mode)):
        return Probe(st)
    fd = beneath.try_openat2(dirfd, name, _O_PATH_FLAGS, _LOOKUP_RESOLVE)
    if fd == -errno.ENOENT:
        return None  # removed since the fstatat
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd), os.fsdecode(name))
    try:
        return Probe(st, fd, os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise


def _w_probe_many(table: InodeTable, dirfd: int,
                  names: list[bytes]) -> list[Probe | None]:
    found: list[Probe | None] = []
    for name in names:
        try:
            found.append(_w_probe(table, dirfd, name, False))
        except (OSError, FUSEError):
            found.append(None)   # readdir skips what it cannot look up
    return found


def _w_make(make: Callable[[], object], table: InodeTable, dirfd: int,
            name: bytes) -> Probe | None:
    """Create an object, then look it up, in one trip to the worker."""
    make()
    return _w_probe(table, dirfd, name, False)


def _w_create(dirfd: int, name: bytes, open_flags: int, mode: int) -> tuple[int, int, os.stat_result]:
    fd = os.open(name, open_flags, mode, dir_fd=dirfd)
    try:
        # The O_PATH descriptor comes from the open file itself, not from the name,
        # which someone could have replaced in the meantime.
        path_fd = os.open(f"/proc/self/fd/{fd}", _O_PATH_FLAGS & ~os.O_NOFOLLOW)
        try:
            return fd, path_fd, os.fstat(path_fd)
        except BaseException:
            os.close(path_fd)
            raise
    except BaseException:
        os.close(fd)
        raise


def _w_then_stat(action: Callable[[], object], fd: int) -> os.stat_result:
    action()
    return os.fstat(fd)


def _w_flush(fd: int) -> None:
    # close() of a duplicate gives the target its close-to-open point (NFS writes back
    # dirty data and reports errors on close) while the handle stays open.
    os.close(os.dup(fd))


def _w_list_dir(fd: int) -> list[bytes]:
    os.lseek(fd, 0, os.SEEK_SET)
    return [os.fsencode(n) for n in os.listdir(fd)]


def _w_statfs(fd: int) -> pyfuse3.StatvfsData:
    st = os.fstatvfs(fd)
    data = pyfuse3.StatvfsData()
    for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                  "f_ffree", "f_favail", "f_namemax"):
        setattr(data, field, getattr(st, field))
    return data


def _w_listxattr(path: str) -> list[bytes]:
    return [os.fsencode(n) for n in os.listxattr(path)]


class ProxyBackend:
    def __init__(self, table: InodeTable, handles: HandleTable, timeouts: attrs.CacheTimeouts,
                 pool: WorkerPool, root_fd: int, root_label: str,
                 budget: InodeBudget | None = None):
        self.table = table
        self.budget = budget
        self.handles = handles
        self.timeouts = timeouts
        self.pool = pool
        self.root_fd = root_fd        # O_PATH descriptor of the target directory
        self.root_label = root_label  # for logs and status only; never used to resolve
        # Set when a switch replaced this backend while calls of it were still running
        # (their target hung): what they find must not be bound into the tables.
        self.retired = False

    # -- helpers -------------------------------------------------------------------------
    async def _run(self, ctx: pyfuse3.RequestContext | None, fn: Callable[..., T],
                   *args: Any) -> T:
        return await self.pool.run(ctx, fn, *args)

    def _check_current(self, *path_fds: int | None) -> None:
        """After a worker returned: a backend retired meanwhile answers EIO, closing the
        O_PATH descriptors its worker opened in the old target."""
        if self.retired:
            for fd in path_fds:
                if fd is not None:
                    os.close(fd)
            raise FUSEError(errno.EIO)

    def _obj(self, inode: Inode) -> ProxyObject:
        if inode.proxy is None:
            raise FUSEError(errno.ESTALE)
        return inode.proxy

    def _dirfd(self, ino: int) -> int:
        inode = self.table.get(ino)
        if not inode.is_dir:
            raise FUSEError(errno.ENOTDIR)
        return self._obj(inode).fd

    def _bind(self, fd: int, st: os.stat_result) -> Found:
        """The inode for a freshly resolved target object (hard links share one inode),
        with attributes from *st*, the stat of *fd*."""
        inode = self.table.find_backing(st)
        if inode is not None and inode.kind == stat.S_IFMT(st.st_mode):
            os.close(fd)
        else:
            inode = self.table.add(stat.S_IFMT(st.st_mode))
            self.table.bind_proxy(inode, ProxyObject(fd=fd, dev=st.st_dev, ino=st.st_ino))
            if self.budget is not None:
                self.budget.check()
        return inode, attrs.from_stat(inode.ino, st, self.timeouts)

    def _known(self, parent_ino: int, name: bytes, st: os.stat_result) -> Inode | None:
        """The inode we already hold for the object *st* describes, if any. Held objects
        are recognised by (st_dev, st_ino), the identity hard links already share an
        inode by (a local filesystem cannot reuse the number of an object we hold open)."""
        known = self.table.find_backing(st)
        if stat.S_ISSOCK(st.st_mode):
            known = self._bound_socket(parent_ino, name) or known
        if known is not None and known.kind == stat.S_IFMT(st.st_mode):
            return known
        return None

    async def _finish(self, parent_ino: int, name: bytes, probe: Probe | None,
                      ctx: pyfuse3.RequestContext | None) -> Found | None:
        """Loop side of a lookup: the inode for what the worker found under *name*."""
        while probe is not None:
            self._check_current(probe.fd)
            known = self._known(parent_ino, name, probe.st)
            if known is not None:
                if probe.fd is not None:
                    os.close(probe.fd)  # an O_PATH descriptor: its close never waits
                return known, attrs.from_stat(known.ino, probe.st, self.timeouts)
            if probe.fd is not None:
                assert probe.fst is not None
                return self._bind(probe.fd, probe.fst)
            # The worker saw it held, but it was forgotten since: open it after all.
            probe = await self._run(ctx, _w_probe, self.table, self._dirfd(parent_ino),
                                    name, True)
        return None

    async def _resolve(self, parent_ino: int, name: bytes,
                       ctx: pyfuse3.RequestContext | None) -> Found | None:
        """The object *name* in the parent directory, or None if there is none."""
        _check_name(name)
        probe = await self._run(ctx, _w_probe, self.table, self._dirfd(parent_ino), name, False)
        return await self._finish(parent_ino, name, probe, ctx)

    def _bound_socket(self, parent_ino: int, name: bytes) -> Inode | None:
        """The inode a socket was bound on through SPFS under this name, if it still has it.

        Connecting through SPFS reaches only sockets bound on SPFS inodes (the kernel looks
        a socket up by its inode), never one bound on the target itself. So while a name
        bound here has not been unlinked through SPFS, it keeps its inode even if the
        target's socket file was replaced meanwhile (the swap engine binds the process's
        new socket there, before the processes are switched over to it)."""
        ino = self.table.entries.get((parent_ino, name))
        inode = self.table.inodes.get(ino) if ino is not None else None
        if inode is None or not inode.bound_socket or inode.stale:
            return None
        return inode

    async def _make(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext,
                    make: Callable[[int], object]) -> Found:
        """Create *name* (make(dirfd) in the worker) and return the new object's inode."""
        _check_name(name)
        dirfd = self._dirfd(parent_ino)
        probe = await self._run(ctx, _w_make, lambda: make(dirfd), self.table, dirfd, name)
        found = await self._finish(parent_ino, name, probe, ctx)
        if found is None:
            raise FUSEError(errno.ENOENT)  # removed on the target in the meantime
        return found

    def _name_of(self, inode: Inode) -> tuple[int, bytes]:
        """A (parent descriptor, name) pair for operations that must not follow a symlink."""
        for parent, name in inode.names:
            parent_inode = self.table.inodes.get(parent)
            if parent_inode is not None and parent_inode.proxy is not None:
                return parent_inode.proxy.fd, name
        raise FUSEError(errno.ESTALE)

    def _attributes(self, inode: Inode, st: os.stat_result) -> pyfuse3.EntryAttributes:
        attr = attrs.from_stat(inode.ino, st, self.timeouts)
        if inode.orphan:
            attr.st_nlink = 0
        return attr

    # -- operations ----------------------------------------------------------------------
    async def getattr(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return self._attributes(inode, await self._run(None, os.fstat, self._obj(inode).fd))

    async def lookup(self, parent_ino: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> Found | None:
        return await self._resolve(parent_ino, name, ctx)

    async def lookup_many(self, parent_ino: int, names: list[bytes]) -> list[Found | None]:
        """For readdir: each name's inode, None for names gone or failing (as the daemon:
        the listing was read with the caller's rights already)."""
        dirfd = self._dirfd(parent_ino)
        probes = await self._run(None, _w_probe_many, self.table, dirfd, names)
        found: list[Found | None] = []
        for name, probe in zip(names, probes):
            try:
                found.append(await self._finish(parent_ino, name, probe, None))
            except (OSError, FUSEError):
                found.append(None)
        return found

    async def setattr(self, inode: Inode, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, handle: Handle | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        obj = self._obj(inode)
        is_link = inode.kind == stat.S_IFLNK
        link_name = self._name_of(inode) if is_link and (
            fields.update_uid or fields.update_gid or fields.update_atime
            or fields.update_mtime) else None
        handle_fd = handle.fd if handle is not None else None

        def change() -> None:
            if fields.update_size:
                if handle_fd is not None:
                    os.ftruncate(handle_fd, attr.st_size)
                elif is_link:
                    raise FUSEError(errno.EINVAL)
                else:
                    os.truncate(obj.proc_path, attr.st_size)
            if fields.update_mode:
                if is_link:
                    raise FUSEError(errno.EOPNOTSUPP)
                os.chmod(obj.proc_path, stat.S_IMODE(attr.st_mode))
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if link_name is not None:
                    os.chown(link_name[1], uid, gid, dir_fd=link_name[0], follow_symlinks=False)
                else:
                    os.chown(obj.proc_path, uid, gid)
            if fields.update_atime or fields.update_mtime:
                current = os.fstat(obj.fd)
                times = (attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                         attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns)
                if link_name is not None:
                    os.utime(link_name[1], ns=times, dir_fd=link_name[0], follow_symlinks=False)
                else:
                    os.utime(obj.proc_path, ns=times)
        return self._attributes(inode, await self._run(ctx, _w_then_stat, change, obj.fd))

    async def readlink(self, inode: Inode, ctx: pyfuse3.RequestContext) -> bytes:
        if inode.kind != stat.S_IFLNK:
            raise FUSEError(errno.EINVAL)
        return await self._run(ctx, _readlink_fd, self._obj(inode).fd)

    async def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> Found:
        return await self._make(parent_ino, name, ctx,
                                lambda dirfd: os.mknod(name, mode, rdev, dir_fd=dirfd))

    async def mkdir(self, parent_ino: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> Found:
        return await self._make(parent_ino, name, ctx,
                                lambda dirfd: os.mkdir(name, mode, dir_fd=dirfd))

    async def symlink(self, parent_ino: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> Found:
        # The target string is stored verbatim (the C spfs mangled it, §1.10 #2).
        return await self._make(parent_ino, name, ctx,
                                lambda dirfd: os.symlink(target, name, dir_fd=dirfd))

    async def link(self, inode: Inode, parent_ino: int, name: bytes,
                   ctx: pyfuse3.RequestContext) -> Found:
        _check_name(name)
        obj = self._obj(inode)
        dirfd = self._dirfd(parent_ino)
        if inode.kind == stat.S_IFLNK:
            src_dirfd, src_name = self._name_of(inode)

            def make() -> None:
                os.link(src_name, name, src_dir_fd=src_dirfd, dst_dir_fd=dirfd,
                        follow_symlinks=False)
        else:
            def make() -> None:
                # linkat(AT_EMPTY_PATH) would need CAP_DAC_READ_SEARCH, which a non-root
                # fsuid does not have; following the magic link needs nothing.
                os.link(obj.proc_path, name, dst_dir_fd=dirfd, follow_symlinks=True)
        st = await self._run(ctx, _w_then_stat, make, obj.fd)
        return inode, self._attributes(inode, st)

    async def unlink(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        await self.pool.closes_settled()
        await self._run(ctx, _unlinkat, name, self._dirfd(parent_ino), False)
        self._forget_name(parent_ino, name)

    async def rmdir(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        await self.pool.closes_settled()
        await self._run(ctx, _unlinkat, name, self._dirfd(parent_ino), True)
        self._forget_name(parent_ino, name)

    def _forget_name(self, parent_ino: int, name: bytes) -> None:
        ino = self.table.remove_name(parent_ino, name)
        if ino is not None and ino in self.table.inodes:
            self.table.maybe_drop(self.table.inodes[ino])

    async def rename(self, parent_ino: int, name: bytes, new_parent_ino: int, new_name: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        _check_name(new_name)
        await self.pool.closes_settled()
        old_dirfd, new_dirfd = self._dirfd(parent_ino), self._dirfd(new_parent_ino)
        await self._run(ctx, _renameat, old_dirfd, name, new_dirfd, new_name, flags)
        if flags & pyfuse3.RENAME_EXCHANGE:
            self.table.exchange_names(parent_ino, name, new_parent_ino, new_name)
        else:
            self.table.rename_name(parent_ino, name, new_parent_ino, new_name)

    async def open(self, inode: Inode, flags: int, ctx: pyfuse3.RequestContext) -> Handle:
        if inode.kind != stat.S_IFREG:
            raise FUSEError(errno.EISDIR if inode.is_dir else errno.EINVAL)
        fd = await self._run(ctx, reopen, self._obj(inode), flags)
        if self.retired:
            self.pool.close_soon(fd)
            raise FUSEError(errno.EIO)
        return self.handles.add(inode.ino, flags, fd=fd)

    async def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[Handle, Found]:
        _check_name(name)
        dirfd = self._dirfd(parent_ino)
        open_flags = (flags & ~(os.O_NOCTTY | os.O_DIRECT)) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd, path_fd, st = await self._run(ctx, _w_create, dirfd, name, open_flags,
                                          stat.S_IMODE(mode))
        if self.retired:
            self.pool.close_soon(fd)
        self._check_current(path_fd)
        found = self._bind(path_fd, st)
        return self.handles.add(found[0].ino, flags, fd=fd), found

    async def read(self, handle: Handle, offset: int, size: int) -> bytes:
        assert handle.fd is not None
        return await self._run(None, os.pread, handle.fd, size, offset)

    async def write(self, handle: Handle, offset: int, data: bytes) -> int:
        assert handle.fd is not None
        inode = self.table.inodes.get(handle.ino)
        if inode is not None:
            inode.unflushed = True
        return await self._run(None, os.pwrite, handle.fd, data, offset)

    async def flush(self, handle: Handle) -> None:
        # Nothing to write back: a read-only handle, or no write to the file since the
        # last flush (whichever handle the kernel sent the writes on: NFS writes back the
        # whole file on any close).
        if handle.fd is None or handle.flags & os.O_ACCMODE == os.O_RDONLY:
            return
        inode = self.table.inodes.get(handle.ino)
        if inode is not None:
            if not inode.unflushed:
                return
            inode.unflushed = False
        await self._run(None, _w_flush, handle.fd)

    async def fsync(self, handle: Handle, datasync: bool) -> None:
        if handle.fd is not None:
            await self._run(None, os.fdatasync if datasync else os.fsync, handle.fd)

    async def opendir(self, inode: Inode, ctx: pyfuse3.RequestContext) -> Handle:
        if not inode.is_dir:
            raise FUSEError(errno.ENOTDIR)
        fd = await self._run(ctx, os.open, self._obj(inode).proc_path,
                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.retired:
            self.pool.close_soon(fd)
            raise FUSEError(errno.EIO)
        return self.handles.add(inode.ino, os.O_RDONLY, is_dir=True, fd=fd)

    async def list_dir(self, handle: Handle) -> list[bytes]:
        assert handle.fd is not None
        return await self._run(None, _w_list_dir, handle.fd)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return await self._run(None, _w_statfs, self.root_fd)

    def _xattr_path(self, inode: Inode) -> str:
        if inode.kind == stat.S_IFLNK:
            raise FUSEError(errno.EOPNOTSUPP)
        return self._obj(inode).proc_path

    async def setxattr(self, inode: Inode, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        await self._run(ctx, os.setxattr, self._xattr_path(inode), name, value)

    async def getxattr(self, inode: Inode, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._run(ctx, os.getxattr, self._xattr_path(inode), name)

    async def listxattr(self, inode: Inode, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode.kind == stat.S_IFLNK:
            return []
        return await self._run(ctx, _w_listxattr, self._xattr_path(inode))

    async def removexattr(self, inode: Inode, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._run(ctx, os.removexattr, self._xattr_path(inode), name)

    def close(self) -> None:
        self.pool.close_later(self.root_fd)


def _readlink_fd(fd: int) -> bytes:
    return os.readlink(b"", dir_fd=fd)


def _unlinkat(name: bytes, dirfd: int, is_dir: bool) -> None:
    (os.rmdir if is_dir else os.unlink)(name, dir_fd=dirfd)


def _renameat(old_dirfd: int, name: bytes, new_dirfd: int, new_name: bytes, flags: int) -> None:
    if flags:
        syscalls.renameat2(old_dirfd, name, new_dirfd, new_name, flags)
    else:
        os.rename(name, new_name, src_dir_fd=old_dirfd, dst_dir_fd=new_dirfd)
