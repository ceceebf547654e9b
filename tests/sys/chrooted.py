"""A process whose root is a directory of the test's: for checks that a path is resolved in
another process's root, not in ours."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def chrooted_process(root: Path) -> Iterator[int]:
    """The pid of a child chrooted into `root`, waiting until the block ends."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the chrooted child
        try:
            os.close(read_end)
            os.chroot(root)
            os.write(write_end, b"x")
            signal.pause()
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        assert os.read(read_end, 1) == b"x", "the child did not chroot"
        yield pid
    finally:
        os.close(read_end)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
