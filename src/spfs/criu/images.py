"""What criu-spfs needs from a CRIU image directory, read with Debian's pycriu.

Only the images that say which files on which mounts the restored processes will open, map,
execute or use as cwd/root (mountpoints-*, files, remap-fpath, fs-*, mm-*), and which fds
hold them (pstree, ids-*, fdinfo-*). Everything is
validated as it is read: an image dir is input from another host, not trusted.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pycriu

VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
MAX_IMAGE_BYTES = 256 * 1024 * 1024


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


def _load(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise ImageError(f"{path.name}: larger than {MAX_IMAGE_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            return pycriu.images.load(f)
    except Exception as e:  # pycriu raises bare Exceptions and protobuf errors alike
        raise ImageError(f"{path.name}: cannot decode: {e}") from None


def _entries(path: Path) -> Iterator[dict[str, Any]]:
    data = _load(path)
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise ImageError(f"{path.name}: no entry list")
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


def _present(path: Path) -> Path:
    if not path.is_file():
        raise ImageError(f"{path.name}: missing")
    return path


def _offset(reg: dict[str, Any], where: str) -> int | None:
    pos = reg.get("pos")
    if pos is None or pos == (1 << 64) - 1:  # CRIU's "no position" (-1 as u64)
        return None
    return _int(reg, "pos", where)


def _fd_tables(image_dir: Path) -> dict[int, list[tuple[int, int]]]:
    """One pid per fd table (threads and CLONE_FILES children share it) with its fds, from
    pstree.img, ids-PID.img and fdinfo-FILES_ID.img."""
    tables: dict[int, list[tuple[int, int]]] = {}
    seen: set[int] = set()
    for task in _entries(_present(image_dir / "pstree.img")):
        pid = _int(task, "pid", "pstree.img")
        ids = next(_entries(_present(image_dir / f"ids-{pid}.img")), None)
        if not isinstance(ids, dict):
            raise ImageError(f"ids-{pid}.img: no entry")
        files_id = _int(ids, "files_id", f"ids-{pid}.img")
        if files_id in seen:
            continue
        seen.add(files_id)
        fdinfo = _present(image_dir / f"fdinfo-{files_id}.img")
        tables[pid] = [(_int(e, "fd", fdinfo.name), _int(e, "id", fdinfo.name))
                       for e in _entries(fdinfo) if e.get("type") == "REG"]
    return tables


def load_images(image_dir: Path) -> ImageSet:
    image_dir = Path(image_dir)
    if not (image_dir / "inventory.img").exists():
        raise ImageError(f"{image_dir}: not a CRIU image directory (no inventory.img)")
    out = ImageSet()
    for img in sorted(image_dir.glob("mountpoints-*.img")):
        for m in _entries(img):
            where = f"{img.name} mnt_id {m.get('mnt_id')}"
            rec = MountRecord(_int(m, "mnt_id", where), _int(m, "root_dev", where),
                              _path(m, "root", where), _path(m, "mountpoint", where),
                              str(m.get("source", "")), str(m.get("options", "")),
                              m.get("ext_key"))
            out.mounts[rec.mnt_id] = rec
    for e in _entries(image_dir / "files.img"):
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
    remap_img = image_dir / "remap-fpath.img"
    if remap_img.exists():
        for r in _entries(remap_img):
            where = "remap-fpath.img"
            out.remaps.append(Remap(_int(r, "orig_id", where), _int(r, "remap_id", where),
                                    str(r.get("remap_type", "LINKED"))))
    for img in image_dir.glob("fs-*.img"):
        for e in _entries(img):
            out.dir_refs.update(x for x in (_int(e, "cwd_id", img.name, True),
                                            _int(e, "root_id", img.name, True)) if x is not None)
    out.fd_tables = _fd_tables(image_dir)
    for img in image_dir.glob("mm-*.img"):
        for e in _entries(img):
            exe = _int(e, "exe_file_id", img.name, optional=True)
            if exe is not None:
                out.executables.add(exe)
            for vma in e.get("vmas", []):
                if vma.get("status", 0) & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
                    out.mapped.add(_int(vma, "shmid", img.name))
    return out
