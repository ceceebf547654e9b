"""Small helpers shared by the lab container modules."""

from __future__ import annotations

import subprocess
import time
from typing import Callable


class CtError(RuntimeError):
    pass


def wait_for(what: str, check: Callable[[], bool], timeout: float, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise CtError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def run(cmd: list[str], timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise CtError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc
