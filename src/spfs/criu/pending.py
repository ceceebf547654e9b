"""A container whose earlier replace is still pending: SPFS still stands in for its NFS.

CRIU cannot dump it as NFS then (the mounts are FUSE, served by a daemon outside the
container), so `criu-spfs dump` waits, bounded, until every SPFS mount of the container is
gone (the replace put NFS back), and says which mounts it waited for."""

from __future__ import annotations

import logging
import time

from spfs.sys.mountinfo import read_mountinfo

log = logging.getLogger(__name__)

SPFS_FSTYPE = "fuse.spfs"
DEFAULT_DEADLINE_S = 120.0
PROGRESS_EVERY_S = 5.0


class PendingReplace(RuntimeError):
    pass


def spfs_mounts(pid: int) -> list[str]:
    return [m.mountpoint for m in read_mountinfo(pid) if m.fstype == SPFS_FSTYPE]


def wait_for_replaces(pid: int, deadline_s: float, poll_s: float = 0.2) -> float:
    """Seconds waited until no SPFS mount is left in `pid`'s mount namespace; raises
    PendingReplace after `deadline_s`."""
    start = time.monotonic()
    last_note = None
    while True:
        left = spfs_mounts(pid)
        waited = time.monotonic() - start
        if not left:
            if waited >= poll_s:
                log.info("earlier replace done after %.1f s; dumping", waited)
            return waited
        if waited >= deadline_s:
            raise PendingReplace(f"SPFS still stands in for NFS at {', '.join(left)} after "
                                 f"{deadline_s:.0f} s: an earlier replace is pending (see "
                                 "spfs-client status); nothing was dumped")
        if last_note is None or time.monotonic() - last_note >= PROGRESS_EVERY_S:
            log.info("waiting for the pending replace of %s (%.0f s of %.0f s)",
                     ", ".join(left), waited, deadline_s)
            last_note = time.monotonic()
        time.sleep(poll_s)
