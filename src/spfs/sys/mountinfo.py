"""/proc/PID/mountinfo, parsed once for every package (proc(5) for the format)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from spfs.sys.mountapi import Propagation


def device_number(dev: str) -> int:
    """mountinfo's "major:minor" as st_dev."""
    major, minor = dev.split(":")
    return os.makedev(int(major), int(minor))


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    dev: str                     # "major:minor" of the superblock
    root: str                    # sub-root of a bind, "/" for the filesystem's root
    mountpoint: str
    options: tuple[str, ...]     # per-mount options (rw, nosuid, ...)
    optional: tuple[str, ...]    # optional fields: shared:N, master:N, unbindable, ...
    fstype: str
    source: str
    super_options: str

    @property
    def st_dev(self) -> int:
        return device_number(self.dev)

    @property
    def propagation(self) -> Propagation:
        tags = {f.split(":", 1)[0] for f in self.optional}
        if "shared" in tags:  # "shared and slave" keeps its sharing side
            return Propagation.SHARED
        if "master" in tags:
            return Propagation.SLAVE
        if "unbindable" in tags:
            return Propagation.UNBINDABLE
        return Propagation.PRIVATE


def unescape(field: str) -> str:
    """mountinfo octal-escapes space, tab, newline and backslash (\\ooo); other bytes are
    kept as they are (surrogate-escaped if not UTF-8)."""
    if "\\" not in field:
        return field
    out, i = bytearray(), 0
    raw = field.encode("utf-8", "surrogateescape")
    while i < len(raw):
        code = raw[i + 1:i + 4]
        if raw[i] == 0x5C and len(code) == 3 and code.isdigit():
            out.append(int(code, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-")
        except ValueError:
            raise ValueError(f"bad mountinfo line: {line!r}") from None
        entries.append(MountEntry(
            mount_id=int(fields[0]), parent_id=int(fields[1]), dev=fields[2],
            root=unescape(fields[3]), mountpoint=unescape(fields[4]),
            options=tuple(fields[5].split(",")), optional=tuple(fields[6:sep]),
            fstype=fields[sep + 1], source=unescape(fields[sep + 2]),
            super_options=fields[sep + 3] if len(fields) > sep + 3 else ""))
    return entries


def read_mountinfo(pid: int | str | None = None) -> list[MountEntry]:
    with open(f"/proc/{pid or 'self'}/mountinfo", encoding="utf-8",
              errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def top_mount_at(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount visible at `path`: the last one mounted there."""
    found = None
    for entry in entries:
        if entry.mountpoint == path:
            found = entry
    return found
