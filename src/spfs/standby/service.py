"""Starting and stopping a standby from a program (the lab's tests and benchmark, a demo)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from spfs.sys.children import terminate

START_TIMEOUT = 120.0  # the imports take seconds under emulation
STOP_TIMEOUT = 10.0


def start(socket_path: str, log: str | Path) -> int:
    """A detached standby serving at *socket_path*; returns its pid once it accepts."""
    pid_file = f"{socket_path}.pid"
    Path(pid_file).unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "spfs.standby.cli", "-d", "-s", socket_path,
                           "-l", str(log), "--pid-file", pid_file],
                          capture_output=True, text=True, timeout=START_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise RuntimeError(f"spfs-standby did not start: {proc.stderr.strip()[-2000:]}")
    deadline = time.monotonic() + STOP_TIMEOUT
    while not os.path.exists(pid_file):  # the detached child writes it right after the fork
        if time.monotonic() > deadline:
            raise RuntimeError(f"spfs-standby wrote no {pid_file}")
        time.sleep(0.02)
    return int(Path(pid_file).read_text())


def stop(pid: int) -> None:
    """SIGTERM, bounded, then SIGKILL; the programs it forked keep running."""
    terminate(pid, STOP_TIMEOUT)


@contextmanager
def running(socket_path: str, log: str | Path) -> Iterator[int]:
    pid = start(socket_path, log)
    try:
        yield pid
    finally:
        stop(pid)
