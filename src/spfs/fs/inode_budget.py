"""Keeping the number of proxy inodes (one O_PATH descriptor each) under the fd limit.

The kernel forgets an inode only when its dentry goes, which may be never for a tree it
walked once. Past the soft limit SPFS asks the kernel to drop the directory entries of the
oldest non-directory inodes that have no open file (invalidate_entry in pyfuse3's notify
thread); the kernel then sends FORGET for those not in use and SPFS closes their
descriptors. Directories are never chosen: dropping a directory's entry would also detach
any mount below it (so a tree of more directories than the limit still runs out).
"""

from __future__ import annotations

import logging
import resource

import pyfuse3

from spfs.fs.inodes import ROOT_INODE, InodeTable

log = logging.getLogger(__name__)

_RESERVED_FDS = 1000          # open files, sockets, pyfuse3 and trio internals
_LOW_WATER = 0.8              # a relief round aims at this share of the soft limit


def default_soft_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(100, int((soft - _RESERVED_FDS) * 0.8))


class InodeBudget:
    def __init__(self, table: InodeTable, soft_limit: int) -> None:
        self.table = table
        self.soft_limit = soft_limit
        self.reliefs = 0

    def check(self) -> None:
        """Called for each new proxy inode; O(1) unless over the limit."""
        table = self.table
        unasked = len(table.inodes) - table.forget_asked
        if unasked <= self.soft_limit:
            return
        wanted = unasked - int(self.soft_limit * _LOW_WATER)
        asked = 0
        for inode in list(table.inodes.values()):  # oldest first
            if asked >= wanted:
                break
            if inode.ino == ROOT_INODE or inode.is_dir or inode.open_handles \
                    or not inode.names or inode.forget_asked:
                continue
            for parent, name in list(inode.names):
                pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)
            inode.forget_asked = True
            table.forget_asked += 1
            asked += 1
        self.reliefs += 1
        log.info("%d inodes known (soft limit %d): asked the kernel to forget %d more",
                 len(table.inodes), self.soft_limit, asked)
