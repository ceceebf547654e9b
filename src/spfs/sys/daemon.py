"""Going into the background: the one way every spfs daemon does it."""

from __future__ import annotations

import os
from typing import Callable


def stdio_to_devnull() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def detach(before_parent_exits: Callable[[int], None] | None = None) -> None:
    """Fork; the parent runs *before_parent_exits(child_pid)* (a pid file, so it exists when
    our caller goes on) and exits 0; the child returns in a new session, stdio on
    /dev/null."""
    child = os.fork()
    if child > 0:
        if before_parent_exits is not None:
            before_parent_exits(child)
        os._exit(0)
    os.setsid()
    stdio_to_devnull()
