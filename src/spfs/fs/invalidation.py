"""Dropping kernel caches (attributes, directory entries, page cache) of SPFS inodes.

The kernel calls behind pyfuse3.invalidate_* block while a request holds the page or
directory lock they need, and such a request may be one the daemon has yet to answer, so
they always run in a worker thread while the trio loop keeps serving; the caller waits
with a bound.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import time

import pyfuse3
import trio

log = logging.getLogger(__name__)


@dataclasses.dataclass
class InvalidationBatch:
    attr_inodes: list[int] = dataclasses.field(default_factory=list)
    data_inodes: list[int] = dataclasses.field(default_factory=list)
    entries: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.attr_inodes) + len(self.data_inodes) + len(self.entries)


@dataclasses.dataclass
class InvalidationResult:
    completed: bool
    seconds: float
    errors: int = 0


def _quietly(call: object, *args: object) -> int:
    try:
        call(*args)  # type: ignore[operator]
    except OSError as exc:
        if exc.errno == errno.ENOENT:  # the kernel does not know this inode or name
            return 0
        log.warning("cache invalidation %s%r failed: %s", getattr(call, "__name__", call), args, exc)
        return 1
    return 0


def invalidate_attrs_now(inodes: list[int]) -> None:
    """Attribute-only invalidation never waits on a request: safe on the loop thread."""
    for ino in inodes:
        _quietly(pyfuse3.invalidate_inode, ino, True)


def _run(batch: InvalidationBatch) -> int:
    errors = 0
    for ino in batch.attr_inodes:
        errors += _quietly(pyfuse3.invalidate_inode, ino, True)
    for ino in batch.data_inodes:
        errors += _quietly(pyfuse3.invalidate_inode, ino, False)
    for parent, name in batch.entries:
        errors += _quietly(pyfuse3.invalidate_entry, parent, name)
    return errors


async def invalidate(batch: InvalidationBatch, timeout: float) -> InvalidationResult:
    """Run *batch* in a worker thread; give up waiting (the thread goes on) after *timeout*."""
    start = time.monotonic()
    if not len(batch):
        return InvalidationResult(True, 0.0)
    with trio.move_on_after(timeout):
        errors = await trio.to_thread.run_sync(_run, batch, abandon_on_cancel=True)
        return InvalidationResult(True, time.monotonic() - start, errors)
    log.warning("cache invalidation of %d items still blocked after %.1f s (a parked request "
                "holds a lock it needs); it continues in the background", len(batch), timeout)
    return InvalidationResult(False, time.monotonic() - start)
