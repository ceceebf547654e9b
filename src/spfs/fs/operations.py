"""The pyfuse3 request handlers: gate every request on the mode, then hand it to the
backend of that mode (restore_backend.py or proxy_backend.py).

Answered at once in every mode, never parked: FORGET, FLUSH, RELEASE, RELEASEDIR,
getattr of the root (from a stat of the mountpoint taken at start while in stub) and the
emulated `*.spfs.*` xattrs. Closing a descriptor or swapping it away from a stub therefore
never hangs (feasibility §1 pitfall 4).

Proxy-mode syscalls run in worker threads (workers.py, proxy_backend.py) while the
handler's task awaits them, so handlers interleave at those awaits; the tables change on
this thread only. Restore-mode answers come from memory and never await.

Locks are deliberately not implemented: without FUSE lock operations the kernel keeps
POSIX and flock locks on the FUSE inode, where /proc/PID/fdinfo shows them and the
manager can migrate them.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from typing import Any, Awaitable, Callable, Coroutine, Sequence, TypeVar

import pyfuse3
from pyfuse3 import FUSEError

from spfs.fs import attrs
from spfs.fs.gate import ModeGate
from spfs.fs.handles import Handle, HandleTable
from spfs.fs.inodes import ROOT_INODE, Found, InodeTable
from spfs.fs.modes import Mode
from spfs.fs.proxy_backend import READDIR_BATCH, ProxyBackend
from spfs.fs.restore_backend import RestoreBackend
from spfs.fs.workers import WorkerPool

log = logging.getLogger(__name__)

T = TypeVar("T")

# Answers applications meet in normal work (a lookup of a missing name, an existing file,
# a missing xattr, ...): not logged.
EXPECTED_ERRNOS = frozenset({errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENODATA,
                             errno.ENOTDIR, errno.EISDIR, errno.EAGAIN, errno.ENOTTY,
                             errno.EACCES, errno.EPERM, errno.ERANGE, errno.EOPNOTSUPP,
                             errno.EINVAL, errno.ENAMETOOLONG, errno.ELOOP})


def is_spfs_xattr(name: bytes) -> bool:
    """`security.spfs.link_remap`, `user.spfs.x`, ...: the second component is `spfs`."""
    parts = name.split(b".")
    return len(parts) >= 2 and parts[1] == b"spfs"


Handler = Callable[..., Coroutine[Any, Any, T]]


async def _run_guarded(method: Handler[T], self: "SpfsOperations", args: tuple[Any, ...]) -> T:
    """OSErrors from the target become the caller's errno; any other exception (a bug)
    is logged and answered with EIO instead of ending pyfuse3's main loop."""
    try:
        return await method(self, *args)
    except FUSEError:
        raise
    except OSError as exc:
        if exc.errno not in EXPECTED_ERRNOS:
            # Rare and telling (a read of the target failing, a stale handle): worth a line
            # when an application later reports bad data.
            log.info("%s answered %s", method.__name__, exc)
        raise FUSEError(exc.errno or errno.EIO) from None
    except Exception:
        log.exception("%s%r failed", method.__name__, args)
        raise FUSEError(errno.EIO) from None


def served(method: Handler[T]) -> Callable[..., Awaitable[T]]:
    """Park the request while there is no mode to serve it in, then run it."""
    @functools.wraps(method)
    async def handler(self: "SpfsOperations", *args: Any) -> T:
        if self.gate.open:
            return await _run_guarded(method, self, args)
        await self.gate.wait()
        try:
            return await _run_guarded(method, self, args)
        finally:
            self.gate.note_unparked()
    return handler


def unparked(method: Handler[T]) -> Callable[..., Awaitable[T]]:
    """Answered without waiting for a mode (see the module docstring)."""
    @functools.wraps(method)
    async def handler(self: "SpfsOperations", *args: Any) -> T:
        return await _run_guarded(method, self, args)
    return handler


class SpfsOperations(pyfuse3.Operations):
    supports_dot_lookup = False      # no NFS export of the FUSE mount: never '.'/'..' lookups
    enable_writeback_cache = False   # written bytes must reach the target at once

    def __init__(self, gate: ModeGate, table: InodeTable, handles: HandleTable,
                 stub_root: os.stat_result, timeouts: attrs.CacheTimeouts,
                 pool: WorkerPool | None = None) -> None:
        super().__init__()
        self.pool = pool if pool is not None else WorkerPool()
        self.gate = gate
        self.table = table
        self.handles = handles
        self.stub_root = stub_root
        self.timeouts = timeouts
        self.restore: RestoreBackend | None = None
        self.proxy: ProxyBackend | None = None
        self.direct_io = False
        # Inodes whose page cache got bytes while a switch was invalidating (switcher.py).
        self.cache_fills: set[int] | None = None
        # Descriptors released while no mode serves: closing them could block on a
        # target that is down, so the switcher closes them later in a thread.
        self.deferred_closes: list[int] = []
        self.on_init: Callable[[], None] = lambda: None

    def init(self) -> None:
        self.on_init()

    @property
    def backend(self) -> RestoreBackend | ProxyBackend:
        backend = self.restore if self.gate.mode is Mode.RESTORE else self.proxy
        if backend is None:
            raise FUSEError(errno.EIO)
        return backend

    def _handle_backend(self, handle: Handle) -> RestoreBackend | ProxyBackend:
        backend = self.restore if handle.restore else self.proxy
        if backend is None:
            raise FUSEError(errno.EIO)
        return backend

    def _entry(self, parent: int, name: bytes, found: Found) -> pyfuse3.EntryAttributes:
        inode, attr = found
        inode.lookups += 1
        self.table.add_name(parent, name, inode.ino)
        return attr

    def _file_info(self, handle: Handle) -> pyfuse3.FileInfo:
        # keep_cache=False: every open drops the inode's page cache, so bytes cached in an
        # earlier mode or from an older target version are never served to a new open.
        return pyfuse3.FileInfo(fh=handle.fh, keep_cache=False,
                                direct_io=self.direct_io and not handle.restore)

    # -- never parked --------------------------------------------------------------------
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        try:
            for ino, count in inode_list:
                self.table.forget(ino, count)
        except Exception:
            log.exception("forget failed")

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if self.gate.open:  # the common case, without the extra coroutine of _getattr
            return await _run_guarded(SpfsOperations._getattr_now, self, (inode,))
        if inode == ROOT_INODE:
            return attrs.stub_root(self.stub_root)
        return await self._getattr(inode)

    async def _getattr_now(self, ino: int) -> pyfuse3.EntryAttributes:
        return await self.backend.getattr(self.table.get(ino))

    _getattr = served(_getattr_now)

    @unparked
    async def flush(self, fh: int) -> None:
        handle = self.handles.handles.get(fh)
        if handle is None or handle.broken is not None or not self.gate.open:
            return  # a close must never hang or fail on SPFS's account
        await self._handle_backend(handle).flush(handle)

    @unparked
    async def release(self, fh: int) -> None:
        self._release(fh)

    @unparked
    async def releasedir(self, fh: int) -> None:
        self._release(fh)

    def _release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        if handle is None:
            return
        inode = self.table.inodes.get(handle.ino)
        if inode is not None:
            inode.open_handles -= 1
            self.table.maybe_drop(inode)
        if handle.fd is not None:
            if self.gate.open:
                # Closing a file written on NFS writes it back: in a worker, and the
                # RELEASE is answered at once (the kernel waits for nobody here).
                self.pool.close_soon(handle.fd)
            else:
                self.deferred_closes.append(handle.fd)

    # -- emulated xattrs (every mode, never reach the target) ------------------------------
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        if is_spfs_xattr(name):
            self.table.get(inode).spfs_xattrs[name] = value
            return
        await self._setxattr(inode, name, value, ctx)

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if is_spfs_xattr(name):
            value = self.table.get(inode).spfs_xattrs.get(name)
            if value is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return value
        return await self._getxattr(inode, name, ctx)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if is_spfs_xattr(name):
            if self.table.get(inode).spfs_xattrs.pop(name, None) is None:
                raise FUSEError(pyfuse3.ENOATTR)
            return
        await self._removexattr(inode, name, ctx)

    @served
    async def _setxattr(self, ino: int, name: bytes, value: bytes,
                        ctx: pyfuse3.RequestContext) -> None:
        await self.backend.setxattr(self.table.get(ino), name, value, ctx)

    @served
    async def _getxattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.backend.getxattr(self.table.get(ino), name, ctx)

    @served
    async def _removexattr(self, ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.backend.removexattr(self.table.get(ino), name, ctx)

    @served
    async def listxattr(self, ino: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        # The emulated names stay unlisted (as in the C spfs) so that copies made through
        # the mount never carry them along.
        return [n for n in await self.backend.listxattr(self.table.get(ino), ctx)
                if not is_spfs_xattr(n)]

    # -- names ---------------------------------------------------------------------------
    @served
    async def lookup(self, parent: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        found = await self.backend.lookup(parent, name, ctx)
        if found is None:
            # Not remembered by the kernel (timeout 0), exactly like ENOENT, which would
            # cost an exception on each side of pyfuse3.
            return attrs.negative(0)
        return self._entry(parent, name, found)

    @served
    async def setattr(self, ino: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        inode = self.table.get(ino)
        handle = self.handles.get(fh) if fh is not None else None
        return await self.backend.setattr(inode, attr, fields, handle, ctx)

    @served
    async def readlink(self, ino: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self.backend.readlink(self.table.get(ino), ctx)

    @served
    async def mknod(self, parent: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        found = await self.backend.mknod(parent, name, mode, rdev, ctx)
        found[0].bound_socket = stat.S_ISSOCK(mode)
        return self._entry(parent, name, found)

    @served
    async def mkdir(self, parent: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(parent, name, await self.backend.mkdir(parent, name, mode, ctx))

    @served
    async def symlink(self, parent: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(parent, name, await self.backend.symlink(parent, name, target, ctx))

    @served
    async def link(self, ino: int, new_parent: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        found = await self.backend.link(self.table.get(ino), new_parent, new_name, ctx)
        return self._entry(new_parent, new_name, found)

    @served
    async def unlink(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.backend.unlink(parent, name, ctx)

    @served
    async def rmdir(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.backend.rmdir(parent, name, ctx)

    @served
    async def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes,
                     flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.backend.rename(parent, name, new_parent, new_name, flags, ctx)

    # -- files ---------------------------------------------------------------------------
    @served
    async def open(self, ino: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        inode = self.table.get(ino)
        handle = await self.backend.open(inode, flags, ctx)
        inode.open_handles += 1
        return self._file_info(handle)

    @served
    async def create(self, parent: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        handle, found = await self.backend.create(parent, name, mode, flags, ctx)
        found[0].open_handles += 1
        return self._file_info(handle), self._entry(parent, name, found)

    @served
    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handles.get(fh)
        if self.cache_fills is not None:
            self.cache_fills.add(handle.ino)
        return await self._handle_backend(handle).read(handle, offset, size)

    @served
    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handles.get(fh)
        if self.cache_fills is not None:
            self.cache_fills.add(handle.ino)
        return await self._handle_backend(handle).write(handle, offset, data)

    @served
    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles.get(fh)
        await self._handle_backend(handle).fsync(handle, datasync)

    # -- directories ---------------------------------------------------------------------
    @served
    async def opendir(self, ino: int, ctx: pyfuse3.RequestContext) -> int:
        inode = self.table.get(ino)
        handle = await self.backend.opendir(inode, ctx)
        inode.open_handles += 1
        return handle.fh

    @served
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles.get(fh)
        backend = self._handle_backend(handle)
        if start_id == 0 or handle.dir_names is None:
            handle.dir_names = await backend.list_dir(handle)
        names = handle.dir_names
        # Looked up a batch at a time (one worker trip each in proxy mode); entries of the
        # batch that no longer fit in the reply are let go again.
        for first in range(start_id, len(names), READDIR_BATCH):
            batch = names[first:first + READDIR_BATCH]
            found = await backend.lookup_many(handle.ino, batch)
            for offset, (name, entry) in enumerate(zip(batch, found)):
                if entry is None:
                    continue  # removed since the listing was taken, or unreadable
                inode, attr = entry
                if not pyfuse3.readdir_reply(token, name, attr, first + offset + 1):
                    for rest in found[offset:]:
                        if rest is not None:
                            self.table.maybe_drop(rest[0])
                    return
                inode.lookups += 1
                self.table.add_name(handle.ino, name, inode.ino)

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        pass

    @served
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        return await self.backend.statfs(ctx)

    # -- switching support ----------------------------------------------------------------
    def take_deferred_closes(self) -> list[int]:
        fds, self.deferred_closes = self.deferred_closes, []
        return fds
