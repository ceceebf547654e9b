"""The NFS mounts of a process's mount namespace, from /proc/PID/mountinfo: each mount with
its superblock (device), bind sub-root, mount flags, propagation and superblock options."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from spfs.sys.mountinfo import MountEntry, device_number, read_mountinfo

NFS_TYPES = ("nfs", "nfs4")
# per-mount flags as mountinfo field 6 spells them, with the mount(2) bits criu-spfs records
MOUNT_FLAGS = {"ro": 1, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16, "dirsync": 128,
               "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}


def mount_flags(entry: MountEntry) -> int:
    """The mount(2) bits of an entry's per-mount options."""
    return sum(MOUNT_FLAGS.get(o, 0) for o in entry.options)


def record_of(entry: MountEntry) -> dict:
    """One mount as criu-spfs.json records it (record.py reads it back)."""
    return {"mnt_id": entry.mount_id, "parent_id": entry.parent_id, "dev": entry.dev,
            "root": entry.root, "mountpoint": entry.mountpoint,
            "options": ",".join(entry.options), "propagation": list(entry.optional),
            "fstype": entry.fstype, "source": entry.source,
            "super_options": entry.super_options, "flags": mount_flags(entry)}


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
        return device_number(self.dev)

    @property
    def nlm(self) -> bool:
        """Its fcntl locks go to the server's lock manager (NLM: NFSv2/v3)."""
        options = self.super_options.split(",")
        return (self.fstype == "nfs" and any(o in ("vers=2", "vers=3") for o in options)
                and not {"local_lock=posix", "local_lock=all", "nolock"} & set(options))

    def to_json(self) -> dict:
        return {"dev": self.dev, "fstype": self.fstype, "source": self.source,
                "super_options": self.super_options, "key": self.key,
                "mounts": [record_of(m) for m in self.mounts]}


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
    by_dev: dict[str, NfsSuperblock] = {}
    for m in read_mountinfo(pid):
        if m.fstype not in NFS_TYPES:
            continue
        sb = by_dev.setdefault(m.dev, NfsSuperblock(m.dev, m.fstype, m.source, m.super_options))
        sb.mounts.append(m)
    for sb in by_dev.values():
        _nfs_sub_roots(sb)
    return list(by_dev.values())


def root_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/root")
