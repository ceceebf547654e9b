"""Jobs for test_forkserver: module-level, so that they travel by name to a worker."""

from __future__ import annotations

import os
import threading
import time

from spfs.sys.forkserver import JobResult

HELD = threading.Lock()  # taken by another thread of the test while a job needs it
IMPORTING, FINISH_IMPORT = threading.Event(), threading.Event()  # see blocking_import


def open_fds(numbers: list[int]) -> dict[str, object]:
    here = {int(n) for n in os.listdir("/proc/self/fd")}
    return {"fds": sorted(here), "inodes": {n: os.fstat(n).st_ino for n in numbers}}


def take_the_held_lock() -> str:
    with HELD:
        return "took it"


def open_file(path: str) -> JobResult:
    return JobResult("opened", [os.open(path, os.O_RDONLY)])


def fail_with(code: int) -> None:
    raise OSError(code, "asked to fail")


def crash() -> None:
    raise ValueError("a bug in the job")


def sleep(seconds: float) -> None:
    time.sleep(seconds)


def write_after_reading(read_fd: int, write_fd: int) -> None:
    """Outlives its caller: waits for end of file on read_fd, then writes."""
    os.read(read_fd, 1)
    os.write(write_fd, b"still here")


def import_the_blocking_module() -> str:
    import importlib
    return importlib.import_module("tests.sys.blocking_import").__name__
