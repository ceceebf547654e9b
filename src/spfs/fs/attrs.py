"""Building pyfuse3 EntryAttributes from target stats and restore nodes."""

from __future__ import annotations

import dataclasses
import os
import stat

import pyfuse3

from spfs.fs.inodes import RestoreNode


@dataclasses.dataclass
class CacheTimeouts:
    """Kernel attribute/entry cache lifetime (seconds) for replies in restore/proxy mode.

    The stub never relies on them: every switch invalidates the kernel caches instead.
    """
    attr: float = 1.0
    entry: float = 1.0


_STAT_FIELDS = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")


def _attributes(ino: int, timeouts: CacheTimeouts, values: dict[str, int]) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.generation = 0
    attr.entry_timeout = timeouts.entry
    attr.attr_timeout = timeouts.attr
    for field in _STAT_FIELDS:
        setattr(attr, field, values[field])
    return attr


def from_stat(ino: int, st: os.stat_result, timeouts: CacheTimeouts) -> pyfuse3.EntryAttributes:
    return _attributes(ino, timeouts, {field: getattr(st, field) for field in _STAT_FIELDS})


def from_restore(ino: int, node: RestoreNode, timeouts: CacheTimeouts) -> pyfuse3.EntryAttributes:
    size = node.size
    return _attributes(ino, timeouts, {
        "st_mode": node.mode, "st_nlink": node.nlink, "st_uid": node.uid, "st_gid": node.gid,
        "st_rdev": node.rdev, "st_size": size, "st_blksize": 4096,
        "st_blocks": (size + 511) // 512 if stat.S_ISREG(node.mode) else 0,
        "st_atime_ns": node.atime_ns, "st_mtime_ns": node.mtime_ns, "st_ctime_ns": node.ctime_ns})


def stub_root(st: os.stat_result) -> pyfuse3.EntryAttributes:
    """The root as seen in stub mode: the mountpoint's own stat, never cached by the kernel."""
    return from_stat(pyfuse3.ROOT_INODE, st, CacheTimeouts(attr=0, entry=0))
