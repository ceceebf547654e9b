"""Objects on a share, reached only below the share's root directory descriptor.

A container can rename, replace and symlink anything on its share at any moment, also
while spfs-manager (host root) is moving the container's references onto the real mount.
So no path on a share is ever resolved from the host root: every open goes through
openat2 below a descriptor of the share's root, without symlinks, magic links or mount
crossings, and every object is checked against what discovery saw (its device, inode and
kind) before anything is done with it. Operations act on descriptors (fchmod/fchown via
the descriptor's magic link, unlinkat on a parent opened here, bind through a parent
opened here), never on a path a second lookup could redirect.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import stat
from dataclasses import dataclass

from spfs.sys.libc import libc as _libc
from spfs.sys.regular import kind_of

SYS_OPENAT2 = 437  # the same number on every architecture (a new-style syscall)

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

# Below a share's root: no '..' out of it, no /proc magic link, no symlink (a symlink that
# is itself the object is opened with O_PATH|O_NOFOLLOW), no other mount.
STRICT = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV
# The source share may carry other mounts inside (binds, tmpfs on a sub-directory): its
# lookups may cross them, and the device check then refuses what is not on the share.
ACROSS_MOUNTS = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS

_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def try_openat2(dirfd: int, path: bytes, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): the new descriptor, or -errno (no exception: a missing name is an
    ordinary answer on a lookup path)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    while True:
        res = _libc.syscall(SYS_OPENAT2, dirfd, ctypes.c_char_p(path), ctypes.byref(how),
                            ctypes.sizeof(how))
        if res >= 0:
            return res
        err = ctypes.get_errno()
        if err != errno.EAGAIN:  # openat2 asks for a retry when a rename raced the walk
            return -err


def openat2(dirfd: int, path: bytes | str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open *path* relative to *dirfd* under the RESOLVE_* restrictions."""
    if isinstance(path, str):
        path = os.fsencode(path)
    res = try_openat2(dirfd, path, flags, resolve, mode)
    if res < 0:
        raise OSError(-res, os.strerror(-res), os.fsdecode(path))
    return res


class ShareChanged(OSError):
    """An object on a share is not the one discovery saw, or its path now leads off the
    share (a symlink, another mount, another device): the operation must not go on."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ESTALE, message)

    def __str__(self) -> str:
        return str(self.strerror)


def relative(path: str, what: str = "path") -> str:
    """`path` if it is a plain relative path ('' for the root itself): no leading '/',
    no '.', '..' or empty component, no NUL. Names from CRIU images and requests go
    through here before they are resolved anywhere."""
    if path == "":
        return path
    if "\0" in path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise ShareChanged(f"{what} {path[:120]!r} is not a relative path below the share's root")
    return path


def component(name: str, what: str = "name") -> str:
    """`name` if it is one path component (a link_remap name, a socket file's name)."""
    if not name or "/" in name or "\0" in name or name in (".", ".."):
        raise ShareChanged(f"{what} {name[:120]!r} is not a single file name")
    return name


def magic_path(fd: int) -> str:
    """The path through which the kernel reaches exactly the object `fd` holds."""
    return f"/proc/self/fd/{fd}"


@dataclass(frozen=True)
class Seen:
    """What discovery saw of an object on the source: its device, inode and kind."""

    dev: int
    ino: int
    mode: int


@dataclass
class Share:
    """One share (a mount's root directory), held open for the time of one operation."""

    fd: int  # O_PATH|O_DIRECTORY of the share's root
    dev: int
    label: str  # for messages: "source" / "target" and where
    resolve: int = STRICT

    @classmethod
    def open(cls, path: str, label: str, *, resolve: int = STRICT, expect_dev: int | None = None) -> "Share":
        """The share whose root is at `path`. `path` itself is trusted (an operator's
        argument, or a magic link to a descriptor we opened): only what lies below it is not."""
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            dev = os.fstat(fd).st_dev
            if expect_dev is not None and dev != expect_dev:
                raise ShareChanged(f"{label} {path} is on device {_devname(dev)}, not on "
                                   f"{_devname(expect_dev)}")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, dev, f"{label} {path}", resolve)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1

    # -- opening ---------------------------------------------------------------------
    def open_at(self, rel: str, flags: int, mode: int = 0) -> int:
        """`rel` below the root, opened with `flags`; off the share is ShareChanged."""
        relative(rel)
        res = try_openat2(self.fd, os.fsencode(rel or "."), flags | os.O_CLOEXEC, self.resolve, mode)
        if res < 0:
            err = -res
            if err in (errno.ELOOP, errno.EXDEV):
                raise ShareChanged(f"{rel!r} on the {self.label} leads off the share "
                                   f"({os.strerror(err)}: a symlink or another mount on its path)")
            raise OSError(err, f"{rel or '.'} on the {self.label}: {os.strerror(err)}")
        try:
            st = os.fstat(res)
            if st.st_dev != self.dev:
                raise ShareChanged(f"{rel!r} on the {self.label} is on device {_devname(st.st_dev)}, "
                                   f"not on the share's {_devname(self.dev)}")
        except BaseException:
            os.close(res)
            raise
        return res

    def open_kind(self, rel: str, flags: int, mode: int) -> int:
        """Like open_at, and the object must be of the kind of `mode` (S_IFMT)."""
        if stat.S_ISLNK(mode):
            flags |= os.O_PATH | os.O_NOFOLLOW  # a symlink is only ever held, never followed
        fd = self.open_at(rel, flags)
        try:
            found = os.fstat(fd).st_mode
            if stat.S_IFMT(found) != stat.S_IFMT(mode):
                raise ShareChanged(f"{rel!r} on the {self.label} is {kind_of(found)}, "
                                   f"not {kind_of(mode)} as on the source")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def hold(self, rel: str) -> int:
        """An O_PATH descriptor of the object at `rel` itself (a symlink is not followed)."""
        return self.open_at(rel, _O_PATH_NOFOLLOW)

    def check_seen(self, rel: str, seen: Seen, what: str) -> int:
        """An O_PATH descriptor of `rel`, which must still be the object discovery saw;
        otherwise (renamed, replaced, a symlink on its path) ShareChanged."""
        fd = self.hold(rel)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (seen.dev, seen.ino) or \
                    stat.S_IFMT(st.st_mode) != stat.S_IFMT(seen.mode):
                raise ShareChanged(f"{what}: {rel or '.'!r} on the {self.label} is no longer "
                                   f"{the(seen.mode)} it was at discovery (it was renamed or replaced)")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def parent(self, rel: str) -> tuple[int, str]:
        """An O_PATH descriptor of the directory holding `rel`, and the last component."""
        relative(rel)
        head, _, name = rel.rpartition("/")
        component(name)
        fd = self.open_at(head, os.O_PATH | os.O_DIRECTORY)
        return fd, name

    # -- acting on names ---------------------------------------------------------------
    def _is_of_kind(self, dir_fd: int, name: str, rel: str, kinds: tuple[int, ...], refusal: str) -> bool:
        """Whether `name` in `dir_fd` exists (not followed); ShareChanged if it is not one
        of `kinds`, saying what is done instead (`refusal`)."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if stat.S_IFMT(st.st_mode) not in kinds:
            raise ShareChanged(f"{rel!r} on the {self.label} is {kind_of(st.st_mode)}: {refusal}")
        return True

    def stage(self, rel: str, *, kinds: tuple[int, ...]) -> "Staged":
        """A hidden directory beside `rel` where its replacement (one of `kinds`) is made
        under the same name; Staged.place() then gives it the name in one rename, so that
        the name never goes missing for the programs using it meanwhile."""
        dir_fd, name = self.parent(rel)
        stage_name = f".{name[:200]}.spfs-new-{secrets.token_hex(6)}"
        try:
            os.mkdir(stage_name, 0o700, dir_fd=dir_fd)
            stage_fd = os.open(stage_name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=dir_fd)
        except BaseException:
            os.close(dir_fd)
            raise
        return Staged(self, rel, kinds, dir_fd, stage_fd, name, stage_name)

    def unlink(self, rel: str, *, kinds: tuple[int, ...] = (stat.S_IFREG,)) -> bool:
        """Remove the name `rel` if it is one of `kinds` (S_IFMT values); False if there
        is no such name. Never follows a symlink: the name itself goes."""
        dir_fd, name = self.parent(rel)
        try:
            if not self._is_of_kind(dir_fd, name, rel, kinds, "not removed"):
                return False
            os.unlink(name, dir_fd=dir_fd)
            return True
        finally:
            os.close(dir_fd)


@dataclass
class Staged:
    """A replacement for the object at `rel`, made as `name` in the hidden directory
    `stage_name` beside it. place() renames it over the name (atomic: whoever looks the name
    up finds the old object or the new one, never nothing) and keeps the object it replaces
    under a hidden hard link; settle() then drops one of the two."""

    share: Share
    rel: str
    kinds: tuple[int, ...]
    dir_fd: int  # the directory holding the name
    stage_fd: int
    name: str
    stage_name: str
    made: tuple[int, int] | None = None  # (dev, ino) of the replacement, once made
    kept: str | None = None  # the replaced object's hidden name, once placed
    placed: bool = False

    def hold_made(self) -> int:
        """An O_PATH descriptor of the replacement in the staging directory, which must be
        one of the kinds and on the share; records its identity for place()."""
        fd = os.open(self.name, _O_PATH_NOFOLLOW, dir_fd=self.stage_fd)
        try:
            st = os.fstat(fd)
            if st.st_dev != self.share.dev or stat.S_IFMT(st.st_mode) not in self.kinds:
                raise ShareChanged(f"the replacement of {self.rel!r} on the {self.share.label} is "
                                   f"{kind_of(st.st_mode)} on {_devname(st.st_dev)}")
            self.made = (st.st_dev, st.st_ino)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def place(self) -> None:
        """The replacement takes the name; the object that had it stays linked as
        `.<name>.spfs-old-*` until settle()."""
        if self.made is None:
            os.close(self.hold_made())
        st = os.stat(self.name, dir_fd=self.stage_fd, follow_symlinks=False)
        if (st.st_dev, st.st_ino) != self.made:
            raise ShareChanged(f"the replacement of {self.rel!r} on the {self.share.label} was "
                               "replaced in its staging directory")
        if self.share._is_of_kind(self.dir_fd, self.name, self.rel, self.kinds, "not replaced"):
            kept = f".{self.name[:200]}.spfs-old-{secrets.token_hex(6)}"
            try:
                os.link(self.name, kept, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                        follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # no hard links here: the name is missing between these two renames
                os.rename(self.name, kept, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
            self.kept = kept
        os.rename(self.name, self.name, src_dir_fd=self.stage_fd, dst_dir_fd=self.dir_fd)
        self.placed = True

    def settle(self, keep_new: bool) -> None:
        """Keep the replacement (drop the old object) or give it up (the old object gets
        its name back, or the name goes if there was none); the staging directory goes."""
        try:
            if self.placed and keep_new:
                if self.kept is not None:
                    os.unlink(self.kept, dir_fd=self.dir_fd)
            elif self.placed:
                if self.kept is not None:
                    os.rename(self.kept, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
                else:
                    st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) == self.made:
                        os.unlink(self.name, dir_fd=self.dir_fd)
            else:
                try:
                    os.unlink(self.name, dir_fd=self.stage_fd)
                except FileNotFoundError:
                    pass
            os.rmdir(self.stage_name, dir_fd=self.dir_fd)
        finally:
            self.close()

    def close(self) -> None:
        for fd in (self.stage_fd, self.dir_fd):
            if fd >= 0:
                os.close(fd)
        self.stage_fd = self.dir_fd = -1


def chmod_chown(fd: int, mode: int, uid: int, gid: int) -> None:
    """Owner and permission bits of the object `fd` holds (an O_PATH descriptor too)."""
    os.chown(magic_path(fd), uid, gid)
    os.chmod(magic_path(fd), stat.S_IMODE(mode))


def open_in_root(pid: int, path: str, flags: int = os.O_PATH | os.O_CLOEXEC) -> int:
    """`path` as process `pid` sees it: resolved with that process's root as '/', so
    that an absolute symlink on the way stays in the process's own tree (a path built as
    /proc/PID/root/PATH would resolve it from ours)."""
    root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return openat2(root, path.lstrip("/") or ".", flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
    finally:
        os.close(root)


def the(mode: int) -> str:
    """'the regular file', 'the FIFO', ... for a message about one object."""
    return "the " + kind_of(mode).removeprefix("a ")


def _devname(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"
