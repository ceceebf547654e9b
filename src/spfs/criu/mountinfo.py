"""The NFS mounts of a process's mount namespace, from /proc/PID/mountinfo: each mount with
its superblock (device), bind sub-root, mount flags, propagation and superblock options."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

NFS_TYPES = ("nfs", "nfs4")
# per-mount flags as mountinfo field 6 spells them, with the mount(2) bits criu-spfs records
MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16, "dirsync": 128,
               "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}


def _unescape(s: str) -> str:
    """mountinfo octal-escapes space, tab, newline and backslash."""
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) + 0 and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    mnt_id: int
    parent_id: int
    dev: str                 # "major:minor" of the superblock
    root: str                # sub-root of a bind, "/" for the filesystem root
    mountpoint: str
    options: str             # per-mount options (rw,nosuid,...)
    propagation: tuple[str, ...]
    fstype: str
    source: str
    super_options: str

    @property
    def flags(self) -> int:
        return sum(MOUNT_FLAGS.get(o, 0) for o in self.options.split(","))

    @property
    def is_nfs(self) -> bool:
        return self.fstype in NFS_TYPES


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            raise ValueError(f"bad mountinfo line: {line!r}")
        f = pre.split()
        g = post.split()
        entries.append(MountEntry(int(f[0]), int(f[1]), f[2], _unescape(f[3]), _unescape(f[4]),
                                  f[5], tuple(f[6:]), g[0], _unescape(g[1]),
                                  g[2] if len(g) > 2 else ""))
    return entries


@dataclass
class NfsSuperblock:
    """One NFS filesystem as the container mounted it, and every place it is mounted."""

    dev: str
    fstype: str
    source: str
    super_options: str
    mounts: list[MountEntry] = field(default_factory=list)

    @property
    def key(self) -> str:
        return "spfs-" + self.dev.replace(":", "-")

    @property
    def st_dev(self) -> int:
        major, minor = self.dev.split(":")
        return os.makedev(int(major), int(minor))

    @property
    def nlm(self) -> bool:
        """Its fcntl locks go to the server's lock manager (NLM: NFSv2/v3)."""
        options = self.super_options.split(",")
        return (self.fstype == "nfs" and any(o in ("vers=2", "vers=3") for o in options)
                and not {"local_lock=posix", "local_lock=all", "nolock"} & set(options))

    def to_json(self) -> dict:
        return {"dev": self.dev, "fstype": self.fstype, "source": self.source,
                "super_options": self.super_options, "key": self.key,
                "mounts": [asdict(m) | {"flags": m.flags} for m in self.mounts]}


def _nfs_sub_roots(sb: NfsSuperblock) -> None:
    """NFS shows every bind with root "/" and the bound directory in its source
    (server:/export/sub): the sub-root is what the source adds to the share's own source
    (the shortest one among its mounts)."""
    base = min((m.source for m in sb.mounts), key=len)
    sb.source = base
    fixed = []
    for m in sb.mounts:
        extra = m.source[len(base):] if m.source.startswith(base) else ""
        if m.root == "/" and extra.startswith("/"):
            m = replace(m, root=extra)
        fixed.append(m)
    sb.mounts = fixed


def nfs_superblocks(pid: int) -> list[NfsSuperblock]:
    text = Path(f"/proc/{pid}/mountinfo").read_text()
    by_dev: dict[str, NfsSuperblock] = {}
    for m in parse_mountinfo(text):
        if not m.is_nfs:
            continue
        sb = by_dev.setdefault(m.dev, NfsSuperblock(m.dev, m.fstype, m.source, m.super_options))
        sb.mounts.append(m)
    for sb in by_dev.values():
        _nfs_sub_roots(sb)
    return list(by_dev.values())


def root_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/root")
