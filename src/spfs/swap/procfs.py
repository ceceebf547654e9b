"""Readers for the /proc files the engine needs (one function per file, no caching)."""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

from spfs.sys.mountinfo import read_mountinfo


@dataclass(frozen=True)
class Mount:
    mnt_id: int
    dev: int  # st_dev encoding (os.makedev)
    root: str  # path inside the filesystem that is mounted here
    mountpoint: str
    fstype: str


def mountinfo(pid: int | str = "self") -> dict[int, Mount]:
    """Mounts by id, with st_dev as an int (what stat() compares with)."""
    mounts = {}
    for e in read_mountinfo(pid):
        mounts[e.mount_id] = Mount(e.mount_id, e.st_dev, e.root, e.mountpoint, e.fstype)
    return mounts


@dataclass(frozen=True)
class Lock:
    kind: str  # POSIX, FLOCK, OFDLCK, LEASE...
    mode: str  # ADVISORY / MANDATORY
    access: str  # READ / WRITE
    pid: int
    start: int
    end: int | None  # None means EOF


@dataclass(frozen=True)
class EpollTarget:
    tfd: int
    events: int
    data: int
    ino: int
    sdev: int


@dataclass(frozen=True)
class InotifyWatch:
    wd: int
    ino: int
    sdev: int
    mask: int
    handle_type: int = 0
    handle: bytes = b""


@dataclass
class FdInfo:
    pos: int
    flags: int
    mnt_id: int
    ino: int
    locks: list[Lock] = field(default_factory=list)
    epoll: list[EpollTarget] = field(default_factory=list)
    inotify: list[InotifyWatch] = field(default_factory=list)


_LOCK = re.compile(r"lock:\s+\d+:\s+(?:->\s+)?(\S+)\s+(\S+)\s+(\S+)\s+(-?\d+)\s+\S+\s+(\d+)\s+(\S+)")
_TFD = re.compile(r"tfd:\s+(\d+)\s+events:\s+([0-9a-f]+)\s+data:\s+([0-9a-f]+)\s+pos:\d+\s+ino:([0-9a-f]+)\s+sdev:([0-9a-f]+)")
# The kernel prints every field of an inotify line in hex, wd included.
_INOTIFY = re.compile(r"inotify wd:([0-9a-f]+) ino:([0-9a-f]+) sdev:([0-9a-f]+) mask:([0-9a-f]+)"
                      r"(?: ignored_mask:[0-9a-f]+ fhandle-bytes:[0-9a-f]+ fhandle-type:([0-9a-f]+) f_handle:([0-9a-f]+))?")


def fdinfo(pid: int, fd: int) -> FdInfo:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        text = f.read()
    return parse_fdinfo(text)


def parse_fdinfo(text: str) -> FdInfo:
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("pos", "flags", "mnt_id", "ino"):
            values[key] = value.strip()
    info = FdInfo(pos=int(values.get("pos", "0")), flags=int(values.get("flags", "0"), 8),
                  mnt_id=int(values.get("mnt_id", "-1")), ino=int(values.get("ino", "0")))
    for m in _LOCK.finditer(text):
        end = None if m.group(6) == "EOF" else int(m.group(6))
        info.locks.append(Lock(m.group(1), m.group(2), m.group(3), int(m.group(4)), int(m.group(5)), end))
    for m in _TFD.finditer(text):
        info.epoll.append(EpollTarget(int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16),
                                      int(m.group(4), 16), int(m.group(5), 16)))
    for m in _INOTIFY.finditer(text):
        info.inotify.append(InotifyWatch(int(m.group(1), 16), int(m.group(2), 16), int(m.group(3), 16),
                                         int(m.group(4), 16), int(m.group(5) or "0", 16),
                                         bytes.fromhex(m.group(6) or "")))
    return info


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    dev: int
    ino: int
    path: str

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"


def maps(pid: int) -> list[Vma]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            path = parts[5].rstrip("\n") if len(parts) > 5 else ""
            out.append(Vma(start, end, parts[1], int(parts[2], 16), os.makedev(major, minor),
                           int(parts[4]), path))
    return out


@dataclass(frozen=True)
class Status:
    tgid: int
    nspid: tuple[int, ...]
    sig_ignored: int
    sig_caught: int


def status(pid: int) -> Status:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return Status(int(fields["Tgid"]), tuple(int(x) for x in fields.get("NSpid", str(pid)).split()),
                  int(fields["SigIgn"], 16), int(fields["SigCgt"], 16))


def threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def children(pid: int) -> list[int]:
    out: list[int] = []
    for tid in threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue
    return out


def tree_pids(roots: list[int]) -> list[int]:
    """`roots` and all their descendants still alive."""
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        try:
            todo.extend(children(pid))
        except FileNotFoundError:
            continue
        seen.add(pid)
    return sorted(seen)


def fd_numbers(pid: int) -> list[int]:
    return sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))


def ns_inode(pid: int | str, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


def vm_flags(pid: int) -> dict[int, tuple[str, ...]]:
    """VmFlags of every VMA, by start address (from smaps)."""
    out: dict[int, tuple[str, ...]] = {}
    start = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                start = int(line.split("-", 1)[0], 16)
            elif line.startswith("VmFlags:"):
                out[start] = tuple(line.split()[1:])
    return out


def mm_fields(pid: int) -> tuple[int, ...]:
    """The prctl_mm_map fields /proc/PID/stat gives, in struct order, brk left as 0:
    start_code, end_code, start_data, end_data, start_brk, brk, start_stack, arg_start,
    arg_end, env_start, env_end."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()  # fields[0] is field 3 (state)
    def field(n: int) -> int:
        return int(fields[n - 3])
    return (field(26), field(27), field(45), field(46), field(47), 0, field(28), field(48), field(49),
            field(50), field(51))


PAGEMAP_PRESENT = 1 << 63
PAGEMAP_SWAPPED = 1 << 62
PAGEMAP_FILE_OR_SHARED = 1 << 61


def private_anon_runs(pid: int, start: int, end: int, page: int = 4096) -> list[tuple[int, int]]:
    """(offset, length) runs of pages of [start, end) that are private anonymous copies
    (copy-on-write data, present or swapped): what a remap of the file would lose."""
    count = (end - start) // page
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // page * 8)
        raw = f.read(count * 8)
    runs: list[tuple[int, int]] = []
    for i, entry in enumerate(struct.unpack(f"<{len(raw) // 8}Q", raw)):
        anon = entry & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) and not entry & PAGEMAP_FILE_OR_SHARED
        if anon:
            if runs and runs[-1][0] + runs[-1][1] == i * page:
                runs[-1] = (runs[-1][0], runs[-1][1] + page)
            else:
                runs.append((i * page, page))
    return runs
