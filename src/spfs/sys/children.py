"""Waiting for a child process, bounded: the one way spfs ends its helper children."""

from __future__ import annotations

import os
import signal
import time


def reap_or_kill(pid: int, timeout: float) -> bool:
    """Reap child `pid`, giving it `timeout` seconds to exit on its own, then SIGKILL it.
    True if it exited by itself (or was already reaped elsewhere)."""
    deadline = time.monotonic() + timeout
    pause = 0.001  # children that answer exit at once; longer waits poll less often
    try:
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
    except ChildProcessError:
        pass
    return True
