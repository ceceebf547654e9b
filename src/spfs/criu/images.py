"""What criu-spfs needs from a CRIU image directory, read with Debian's pycriu.

Only the images that say which files on which mounts the restored processes will open, map,
execute or use as cwd/root (mountpoints-*, files, remap-fpath, fs-*, mm-*), and which fds
hold them (pstree, ids-*, fdinfo-*). Everything is
validated as it is read: an image dir is input from another host, not trusted. Its files are
read through one descriptor of the directory, never followed if they are symlinks, only if
they are regular files (a FIFO would block the reader, a device's open runs its driver),
and under one byte budget for the whole directory (pycriu inflates every byte into dicts).
"""

from __future__ import annotations

import fnmatch
import quopri
import io
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pycriu

from spfs.sys.regular import FileTooLarge, NotRegularFile, kind_of, read_regular

VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
MAX_IMAGE_BYTES = 256 * 1024 * 1024
MAX_TOTAL_IMAGE_BYTES = 512 * 1024 * 1024  # what load_images reads, all files together
MAX_DIR_ENTRIES = 100_000
TASK_DEAD = 2  # CRIU's task_state of a zombie in core-PID.img


class ImageError(ValueError):
    """The image dir is broken or hostile; the message says which image and why."""


@dataclass(frozen=True)
class MountRecord:
    mnt_id: int
    root_dev: int
    root: str          # the bind's sub-root inside its filesystem ("/" for the fs root)
    mountpoint: str    # where it is mounted, inside the dumped mount namespace
    source: str
    options: str
    ext_key: str | None


@dataclass(frozen=True)
class RegFile:
    id: int
    name: str          # absolute path inside the dumped mount namespace
    mnt_id: int | None
    flags: int
    mode: int | None   # full st_mode, or None where CRIU recorded none
    size: int | None   # None for O_WRONLY|O_APPEND fds: CRIU does not check their size
    pos: int | None = None   # the offset of the description at dump time
    build_id: bool = False   # CRIU recorded an ELF build-id to check the file against

    @property
    def type(self) -> str | None:
        if self.mode is None:
            return None
        for check, name in ((stat.S_ISDIR, "dir"), (stat.S_ISREG, "file"),
                            (stat.S_ISLNK, "symlink"), (stat.S_ISFIFO, "fifo"),
                            (stat.S_ISSOCK, "socket")):
            if check(self.mode):
                return name
        return "other"


@dataclass(frozen=True)
class Remap:
    orig_id: int
    remap_id: int
    kind: str          # LINKED (link_remap.N), GHOST, PROCFS...


@dataclass
class ImageSet:
    mounts: dict[int, MountRecord] = field(default_factory=dict)
    files: dict[int, RegFile] = field(default_factory=dict)
    remaps: list[Remap] = field(default_factory=list)
    dir_refs: set[int] = field(default_factory=set)     # cwd and root file ids
    mapped: set[int] = field(default_factory=set)       # file ids of file mappings
    executables: set[int] = field(default_factory=set)  # /proc/PID/exe file ids
    # fd tables: a pid of each (in the dumped pid namespace) -> its (fd, file id) pairs
    fd_tables: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # unix sockets bound at a path: (mnt_id, path); CRIU binds them again on restore
    socket_names: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ImageLimits:
    file_bytes: int = MAX_IMAGE_BYTES
    total_bytes: int = MAX_TOTAL_IMAGE_BYTES
    dir_entries: int = MAX_DIR_ENTRIES


def check_image_dir(image_dir: Path, limits: ImageLimits = ImageLimits()) -> None:
    """By type only, without opening any file: every name in the image dir is a regular
    file or a directory of regular files (spfs-manager's logs), so that neither CRIU nor
    we block on a FIFO, open a device or follow a symlink out of it. criu-spfs restore
    runs this before it starts or mounts anything."""
    try:
        top = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ImageError(f"{image_dir}: {e.strerror}") from None
    try:
        subdirs = _check_names(top, "", limits.dir_entries)
        for name in subdirs:
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=top)
            except OSError as e:
                raise ImageError(f"{name}: {e.strerror}") from None
            try:
                if _check_names(sub, name + "/", limits.dir_entries):
                    raise ImageError(f"{name}: has a directory in it")
            finally:
                os.close(sub)
    finally:
        os.close(top)


def _check_names(dir_fd: int, prefix: str, most: int) -> list[str]:
    """The directories among the names of *dir_fd*; ImageError for anything else that is
    not a regular file."""
    subdirs: list[str] = []
    with os.scandir(dir_fd) as it:
        for count, entry in enumerate(it, 1):
            if count > most:
                raise ImageError(f"{prefix or 'image dir'}: more than {most} names")
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as e:
                raise ImageError(f"{prefix}{entry.name}: {e.strerror}") from None
            if stat.S_ISDIR(mode):
                subdirs.append(entry.name)
            elif not stat.S_ISREG(mode):
                raise ImageError(f"{prefix}{entry.name}: {kind_of(mode)}, not a regular file")
    return subdirs


class _ImageDir:
    """The image dir, open once: every image is read by name relative to it (so the
    directory cannot be swapped under us), with one budget for all of them."""

    def __init__(self, image_dir: Path, limits: ImageLimits) -> None:
        self.path = image_dir
        self.limits = limits
        self.left = limits.total_bytes
        try:
            self.fd = os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            names = os.listdir(self.fd)
        except OSError as e:
            raise ImageError(f"{image_dir}: {e.strerror}") from None
        if len(names) > limits.dir_entries:
            os.close(self.fd)
            raise ImageError(f"{image_dir}: more than {limits.dir_entries} names")
        self.names = set(names)

    def close(self) -> None:
        os.close(self.fd)

    def has(self, name: str) -> bool:
        return name in self.names

    def glob(self, pattern: str) -> list[str]:
        return sorted(fnmatch.filter(self.names, pattern))

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise ImageError(f"{name}: missing")
        cap = min(self.limits.file_bytes, self.left)
        try:
            data = read_regular(name, cap, self.fd)
        except FileTooLarge:
            if cap < self.limits.file_bytes:
                raise ImageError(f"{name}: the images read add up to more than "
                                 f"{self.limits.total_bytes} bytes") from None
            raise ImageError(f"{name}: larger than {self.limits.file_bytes} bytes") from None
        except NotRegularFile as e:
            raise ImageError(f"{e.strerror}") from None
        except OSError as e:
            raise ImageError(f"{name}: {e.strerror}") from None
        self.left -= len(data)
        return data

    def entries(self, name: str) -> Iterator[dict[str, Any]]:
        data = self.read(name)
        try:
            image = pycriu.images.load(io.BytesIO(data))
        except Exception as e:  # pycriu raises bare Exceptions and protobuf errors alike
            raise ImageError(f"{name}: cannot decode: {e}") from None
        entries = image.get("entries")
        if not isinstance(entries, list):
            raise ImageError(f"{name}: no entry list")
        yield from entries


def _int(d: dict[str, Any], key: str, where: str, optional: bool = False) -> int | None:
    v = d.get(key)
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ImageError(f"{where}: {key} must be a non-negative integer, got {v!r}")
    return v


def _path(d: dict[str, Any], key: str, where: str) -> str:
    v = d.get(key)
    if not isinstance(v, str) or not v.startswith("/") or "\0" in v:
        raise ImageError(f"{where}: {key} must be an absolute path, got {v!r}")
    return v


def _offset(reg: dict[str, Any], where: str) -> int | None:
    pos = reg.get("pos")
    if pos is None or pos == (1 << 64) - 1:  # CRIU's "no position" (-1 as u64)
        return None
    return _int(reg, "pos", where)


def _socket_name(usk: dict[str, Any]) -> tuple[int, str] | None:
    """(mnt_id, path) of a socket bound at an absolute path on a known mount; pycriu gives
    the name quoted-printable, with the address's trailing NUL."""
    raw, mnt_id = usk.get("name"), usk.get("mnt_id")
    if not isinstance(raw, str) or not isinstance(mnt_id, int) or mnt_id < 0 or usk.get("name_dir"):
        return None  # abstract, unnamed, or relative to a directory CRIU records apart
    name = quopri.decodestring(raw.encode()).rstrip(b"\0")
    if not name.startswith(b"/") or b"\0" in name:
        return None
    return mnt_id, os.fsdecode(name)


def _fd_tables(images: _ImageDir) -> dict[int, list[tuple[int, int]]]:
    """One pid per fd table (threads and CLONE_FILES children share it) with its fds, from
    pstree.img, ids-PID.img and fdinfo-FILES_ID.img. CRIU writes no ids for a zombie (only
    its core, whose task state says so) and no fdinfo for an empty fd table (a daemon that
    closed 0-2): it reads a missing fdinfo as empty, so do we."""
    tables: dict[int, list[tuple[int, int]]] = {}
    seen: set[int] = set()
    for task in images.entries("pstree.img"):
        pid = _int(task, "pid", "pstree.img")
        if not images.has(f"ids-{pid}.img") and _is_zombie(images, pid):
            continue
        ids = next(images.entries(f"ids-{pid}.img"), None)
        if not isinstance(ids, dict):
            raise ImageError(f"ids-{pid}.img: no entry")
        files_id = _int(ids, "files_id", f"ids-{pid}.img")
        if files_id in seen:
            continue
        seen.add(files_id)
        fdinfo = f"fdinfo-{files_id}.img"
        if not images.has(fdinfo):
            tables[pid] = []
            continue
        tables[pid] = [(_int(e, "fd", fdinfo), _int(e, "id", fdinfo))
                       for e in images.entries(fdinfo) if e.get("type") == "REG"]
    return tables


def _is_zombie(images: _ImageDir, pid: int) -> bool:
    """core-PID.img says the task is dead (CRIU's TASK_DEAD: a zombie)."""
    core = f"core-{pid}.img"
    if not images.has(core):
        return False
    entry = next(images.entries(core), None)
    tc = entry.get("tc") if isinstance(entry, dict) else None
    return isinstance(tc, dict) and tc.get("task_state") == TASK_DEAD


def load_images(image_dir: Path, limits: ImageLimits = ImageLimits()) -> ImageSet:
    """ImageError naming the image and what is wrong with it, if anything is."""
    images = _ImageDir(Path(image_dir), limits)
    try:
        return _load_images(images)
    finally:
        images.close()


def _load_images(images: _ImageDir) -> ImageSet:
    if not images.has("inventory.img"):
        raise ImageError(f"{images.path}: not a CRIU image directory (no inventory.img)")
    out = ImageSet()
    for img in images.glob("mountpoints-*.img"):
        for m in images.entries(img):
            where = f"{img} mnt_id {m.get('mnt_id')}"
            rec = MountRecord(_int(m, "mnt_id", where), _int(m, "root_dev", where),
                              _path(m, "root", where), _path(m, "mountpoint", where),
                              str(m.get("source", "")), str(m.get("options", "")),
                              m.get("ext_key"))
            out.mounts[rec.mnt_id] = rec
    for e in images.entries("files.img"):
        if e.get("type") == "UNIXSK" and isinstance(e.get("usk"), dict):
            named = _socket_name(e["usk"])
            if named is not None:
                out.socket_names.append(named)
        reg = e.get("reg")
        if e.get("type") != "REG" or not isinstance(reg, dict):
            continue
        where = f"files.img id {reg.get('id')}"
        f = RegFile(_int(reg, "id", where), _path(reg, "name", where),
                    _int(reg, "mnt_id", where, optional=True), _int(reg, "flags", where) or 0,
                    _int(reg, "mode", where, optional=True),
                    _int(reg, "size", where, optional=True),
                    _offset(reg, where), bool(reg.get("build_id")))
        out.files[f.id] = f
    if images.has("remap-fpath.img"):
        for r in images.entries("remap-fpath.img"):
            where = "remap-fpath.img"
            out.remaps.append(Remap(_int(r, "orig_id", where), _int(r, "remap_id", where),
                                    str(r.get("remap_type", "LINKED"))))
    for img in images.glob("fs-*.img"):
        for e in images.entries(img):
            out.dir_refs.update(x for x in (_int(e, "cwd_id", img, True),
                                            _int(e, "root_id", img, True)) if x is not None)
    out.fd_tables = _fd_tables(images)
    for img in images.glob("mm-*.img"):
        for e in images.entries(img):
            exe = _int(e, "exe_file_id", img, optional=True)
            if exe is not None:
                out.executables.add(exe)
            for vma in e.get("vmas", []):
                if vma.get("status", 0) & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
                    out.mapped.add(_int(vma, "shmid", img))
    return out
