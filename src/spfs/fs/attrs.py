"""Building pyfuse3 EntryAttributes from target stats and restore nodes.

These run several times per FUSE request, so the fields are assigned one by one rather
than through a table of names (a third of the cost, measured).
"""

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


def _new(ino: int, timeouts: CacheTimeouts) -> pyfuse3.EntryAttributes:
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = ino
    attr.generation = 0
    attr.entry_timeout = timeouts.entry
    attr.attr_timeout = timeouts.attr
    return attr


def from_stat(ino: int, st: os.stat_result, timeouts: CacheTimeouts) -> pyfuse3.EntryAttributes:
    attr = _new(ino, timeouts)
    attr.st_mode = st.st_mode
    attr.st_nlink = st.st_nlink
    attr.st_uid = st.st_uid
    attr.st_gid = st.st_gid
    attr.st_rdev = st.st_rdev
    attr.st_size = st.st_size
    attr.st_blksize = st.st_blksize
    attr.st_blocks = st.st_blocks
    attr.st_atime_ns = st.st_atime_ns
    attr.st_mtime_ns = st.st_mtime_ns
    attr.st_ctime_ns = st.st_ctime_ns
    return attr


def from_restore(ino: int, node: RestoreNode, timeouts: CacheTimeouts) -> pyfuse3.EntryAttributes:
    attr = _new(ino, timeouts)
    size = node.size
    attr.st_mode = node.mode
    attr.st_nlink = node.nlink
    attr.st_uid = node.uid
    attr.st_gid = node.gid
    attr.st_rdev = node.rdev
    attr.st_size = size
    attr.st_blksize = 4096
    attr.st_blocks = (size + 511) // 512 if stat.S_ISREG(node.mode) else 0
    attr.st_atime_ns = node.atime_ns
    attr.st_mtime_ns = node.mtime_ns
    attr.st_ctime_ns = node.ctime_ns
    return attr


def negative(timeout: float) -> pyfuse3.EntryAttributes:
    """A LOOKUP answer for a name that does not exist (st_ino 0), which the kernel may
    remember for *timeout* seconds; cheaper than raising ENOENT through pyfuse3."""
    attr = pyfuse3.EntryAttributes()
    attr.st_ino = 0
    attr.entry_timeout = timeout
    return attr


def stub_root(st: os.stat_result) -> pyfuse3.EntryAttributes:
    """The root as seen in stub mode: the mountpoint's own stat, never cached by the kernel."""
    return from_stat(pyfuse3.ROOT_INODE, st, CacheTimeouts(attr=0, entry=0))
