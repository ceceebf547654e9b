"""Proxy mode: every operation forwarded to the target directory.

Each known inode holds an O_PATH descriptor of its target object; names are resolved one
component at a time below the parent's descriptor with openat2(RESOLVE_BENEATH |
RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS) and O_NOFOLLOW, so neither '..' nor a symlink
planted in the target can make the daemon (root) touch anything outside it. Symlinks are
only ever read (readlink), never followed by the daemon: the kernel resolves them in the
caller's own namespace, as on NFS. Operations that change the target run with the caller's
fsuid/fsgid/groups (creds.py), so the target does the permission checks and new objects
are owned by the caller.
"""

from __future__ import annotations

import errno
import os
import stat

import pyfuse3
from pyfuse3 import FUSEError

from spfs.fs import attrs, syscalls
from spfs.sys import beneath
from spfs.fs.creds import CallerCredentials
from spfs.fs.handles import Handle, HandleTable
from spfs.fs.inode_budget import InodeBudget
from spfs.fs.inodes import Found, Inode, InodeTable, ProxyObject
from spfs.sys.fds import close_quietly

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


class ProxyBackend:
    def __init__(self, table: InodeTable, handles: HandleTable, timeouts: attrs.CacheTimeouts,
                 creds: CallerCredentials, root_fd: int, root_label: str,
                 budget: InodeBudget | None = None):
        self.table = table
        self.budget = budget
        self.handles = handles
        self.timeouts = timeouts
        self.creds = creds
        self.root_fd = root_fd        # O_PATH descriptor of the target directory
        self.root_label = root_label  # for logs and status only; never used to resolve

    # -- helpers -------------------------------------------------------------------------
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

    def _resolve(self, parent_ino: int, name: bytes) -> Found | None:
        """The object *name* in the parent directory, or None if there is none.

        A name that leads to an object we already hold (the usual case: the kernel's entry
        expired, or a hard link) costs one fstatat: a single checked component with
        AT_SYMLINK_NOFOLLOW cannot leave the directory. The held object is recognised by
        (st_dev, st_ino), the identity hard links already share an inode by (a local
        filesystem cannot reuse the number of an object we hold open).
        """
        _check_name(name)
        dirfd = self._dirfd(parent_ino)
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        known = self.table.find_backing(st)
        if stat.S_ISSOCK(st.st_mode):
            known = self._bound_socket(parent_ino, name) or known
        if known is not None and known.kind == stat.S_IFMT(st.st_mode):
            return known, attrs.from_stat(known.ino, st, self.timeouts)
        fd = beneath.try_openat2(dirfd, name, _O_PATH_FLAGS, _LOOKUP_RESOLVE)
        if fd == -errno.ENOENT:
            return None  # removed since the fstatat
        if fd < 0:
            raise OSError(-fd, os.strerror(-fd), os.fsdecode(name))
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._bind(fd, st)

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

    def _created(self, parent_ino: int, name: bytes) -> Found:
        """The object this daemon has just created under *name*."""
        found = self._resolve(parent_ino, name)
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

    def attributes(self, inode: Inode) -> pyfuse3.EntryAttributes:
        attr = attrs.from_stat(inode.ino, os.fstat(self._obj(inode).fd), self.timeouts)
        if inode.orphan:
            attr.st_nlink = 0
        return attr

    # -- operations ----------------------------------------------------------------------
    def lookup(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> Found | None:
        with self.creds.of(ctx):
            return self._resolve(parent_ino, name)

    def setattr(self, inode: Inode, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                handle: Handle | None, ctx: pyfuse3.RequestContext) -> None:
        obj = self._obj(inode)
        is_link = inode.kind == stat.S_IFLNK
        with self.creds.of(ctx):
            if fields.update_size:
                if handle is not None and handle.fd is not None:
                    os.ftruncate(handle.fd, attr.st_size)
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
                if is_link:
                    dirfd, name = self._name_of(inode)
                    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
                else:
                    os.chown(obj.proc_path, uid, gid)
            if fields.update_atime or fields.update_mtime:
                current = os.fstat(obj.fd)
                times = (attr.st_atime_ns if fields.update_atime else current.st_atime_ns,
                         attr.st_mtime_ns if fields.update_mtime else current.st_mtime_ns)
                if is_link:
                    dirfd, name = self._name_of(inode)
                    os.utime(name, ns=times, dir_fd=dirfd, follow_symlinks=False)
                else:
                    os.utime(obj.proc_path, ns=times)

    def readlink(self, inode: Inode, ctx: pyfuse3.RequestContext) -> bytes:
        if inode.kind != stat.S_IFLNK:
            raise FUSEError(errno.EINVAL)
        with self.creds.of(ctx):
            return os.readlink(b"", dir_fd=self._obj(inode).fd)

    def mknod(self, parent_ino: int, name: bytes, mode: int, rdev: int,
              ctx: pyfuse3.RequestContext) -> Found:
        _check_name(name)
        with self.creds.of(ctx):
            os.mknod(name, mode, rdev, dir_fd=self._dirfd(parent_ino))
            return self._created(parent_ino, name)

    def mkdir(self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Found:
        _check_name(name)
        with self.creds.of(ctx):
            os.mkdir(name, mode, dir_fd=self._dirfd(parent_ino))
            return self._created(parent_ino, name)

    def symlink(self, parent_ino: int, name: bytes, target: bytes,
                ctx: pyfuse3.RequestContext) -> Found:
        _check_name(name)
        with self.creds.of(ctx):
            # The target string is stored verbatim (the C spfs mangled it, §1.10 #2).
            os.symlink(target, name, dir_fd=self._dirfd(parent_ino))
            return self._created(parent_ino, name)

    def link(self, inode: Inode, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> Found:
        _check_name(name)
        obj = self._obj(inode)
        dirfd = self._dirfd(parent_ino)
        with self.creds.of(ctx):
            if inode.kind == stat.S_IFLNK:
                src_dirfd, src_name = self._name_of(inode)
                os.link(src_name, name, src_dir_fd=src_dirfd, dst_dir_fd=dirfd,
                        follow_symlinks=False)
            else:
                # linkat(AT_EMPTY_PATH) would need CAP_DAC_READ_SEARCH, which a non-root
                # fsuid does not have; following the magic link needs nothing.
                os.link(obj.proc_path, name, dst_dir_fd=dirfd, follow_symlinks=True)
        return inode, self.attributes(inode)

    def unlink(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        with self.creds.of(ctx):
            os.unlink(name, dir_fd=self._dirfd(parent_ino))
        self._forget_name(parent_ino, name)

    def rmdir(self, parent_ino: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        with self.creds.of(ctx):
            os.rmdir(name, dir_fd=self._dirfd(parent_ino))
        self._forget_name(parent_ino, name)

    def _forget_name(self, parent_ino: int, name: bytes) -> None:
        ino = self.table.remove_name(parent_ino, name)
        if ino is not None and ino in self.table.inodes:
            self.table.maybe_drop(self.table.inodes[ino])

    def rename(self, parent_ino: int, name: bytes, new_parent_ino: int, new_name: bytes,
               flags: int, ctx: pyfuse3.RequestContext) -> None:
        _check_name(name)
        _check_name(new_name)
        old_dirfd, new_dirfd = self._dirfd(parent_ino), self._dirfd(new_parent_ino)
        with self.creds.of(ctx):
            if flags:
                syscalls.renameat2(old_dirfd, name, new_dirfd, new_name, flags)
            else:
                os.rename(name, new_name, src_dir_fd=old_dirfd, dst_dir_fd=new_dirfd)
        if flags & pyfuse3.RENAME_EXCHANGE:
            self.table.exchange_names(parent_ino, name, new_parent_ino, new_name)
        else:
            self.table.rename_name(parent_ino, name, new_parent_ino, new_name)

    def open(self, inode: Inode, flags: int, ctx: pyfuse3.RequestContext) -> Handle:
        if inode.kind != stat.S_IFREG:
            raise FUSEError(errno.EISDIR if inode.is_dir else errno.EINVAL)
        obj = self._obj(inode)
        with self.creds.of(ctx):
            fd = reopen(obj, flags)
        return self.handles.add(inode.ino, flags, fd=fd)

    def create(self, parent_ino: int, name: bytes, mode: int, flags: int,
               ctx: pyfuse3.RequestContext) -> tuple[Handle, Found]:
        _check_name(name)
        dirfd = self._dirfd(parent_ino)
        open_flags = (flags & ~(os.O_NOCTTY | os.O_DIRECT)) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with self.creds.of(ctx):
            fd = os.open(name, open_flags, stat.S_IMODE(mode), dir_fd=dirfd)
        try:
            # The O_PATH descriptor comes from the open file itself, not from the name,
            # which someone could have replaced in the meantime.
            path_fd = os.open(f"/proc/self/fd/{fd}", _O_PATH_FLAGS & ~os.O_NOFOLLOW)
            found = self._bind(path_fd, os.fstat(path_fd))
        except BaseException:
            os.close(fd)
            raise
        return self.handles.add(found[0].ino, flags, fd=fd), found

    def read(self, handle: Handle, offset: int, size: int) -> bytes:
        assert handle.fd is not None
        return os.pread(handle.fd, size, offset)

    def write(self, handle: Handle, offset: int, data: bytes) -> int:
        assert handle.fd is not None
        return os.pwrite(handle.fd, data, offset)

    def flush(self, handle: Handle) -> None:
        # close() of a duplicate gives the target its close-to-open point (NFS writes back
        # dirty data and reports errors on close) while the handle stays open. Read-only
        # handles have nothing to write back.
        if handle.fd is not None and handle.flags & os.O_ACCMODE != os.O_RDONLY:
            os.close(os.dup(handle.fd))

    def fsync(self, handle: Handle, datasync: bool) -> None:
        if handle.fd is not None:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    def opendir(self, inode: Inode, ctx: pyfuse3.RequestContext) -> Handle:
        if not inode.is_dir:
            raise FUSEError(errno.ENOTDIR)
        obj = self._obj(inode)
        with self.creds.of(ctx):
            fd = os.open(obj.proc_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self.handles.add(inode.ino, os.O_RDONLY, is_dir=True, fd=fd)

    def list_dir(self, handle: Handle) -> list[bytes]:
        assert handle.fd is not None
        os.lseek(handle.fd, 0, os.SEEK_SET)
        return [os.fsencode(n) for n in os.listdir(handle.fd)]

    def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.fstatvfs(self.root_fd)
        data = pyfuse3.StatvfsData()
        for field in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                      "f_ffree", "f_favail", "f_namemax"):
            setattr(data, field, getattr(st, field))
        return data

    def _xattr_path(self, inode: Inode) -> str:
        if inode.kind == stat.S_IFLNK:
            raise FUSEError(errno.EOPNOTSUPP)
        return self._obj(inode).proc_path

    def setxattr(self, inode: Inode, name: bytes, value: bytes, ctx: pyfuse3.RequestContext) -> None:
        with self.creds.of(ctx):
            os.setxattr(self._xattr_path(inode), name, value)

    def getxattr(self, inode: Inode, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        with self.creds.of(ctx):
            return os.getxattr(self._xattr_path(inode), name)

    def listxattr(self, inode: Inode, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if inode.kind == stat.S_IFLNK:
            return []
        with self.creds.of(ctx):
            return [os.fsencode(n) for n in os.listxattr(self._xattr_path(inode))]

    def removexattr(self, inode: Inode, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        with self.creds.of(ctx):
            os.removexattr(self._xattr_path(inode), name)

    def close(self) -> None:
        close_quietly(self.root_fd)
