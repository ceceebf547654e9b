"""Descriptors: closing one that may already be gone, and what a freshly forked helper
keeps (nothing else)."""

from __future__ import annotations

import os
import resource
from typing import Iterable


def close_all_but(keep: Iterable[int]) -> None:
    """Close every descriptor not in *keep*: a forked helper must not hold copies of its
    parent's pipes and sockets (a copy of a write end keeps the reader from seeing EOF).
    By the list of open ones, not by range: a descriptor may lie above the current
    RLIMIT_NOFILE, and closerange(0, 0) would close them all."""
    kept = set(keep)
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in kept:
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed


def close_quietly(fd: int | None) -> None:
    """Close *fd* if there is one; one already closed is no error."""
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; returns the soft limit now in force.
    A margin only: code that needs one fd per object of unbounded count is a bug."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError):  # e.g. hard above fs.nr_open: keep what we have
            return soft
        return hard
    return soft
