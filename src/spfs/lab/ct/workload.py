"""Start and stop the lab's self-checking workloads (workloads/nfsload.c) in a container."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from spfs.lab.ct.container import exec_in
from spfs.lab.ct.spec import CtState
from spfs.lab.ct.util import CtError, wait_for

KINDS = ("append", "mmap", "posix", "flock", "ofd", "cwd", "rw", "read", "odirect", "dirfd",
         "mmap-private", "chroot", "exe", "elf-fd", "fifo", "epoll", "unix-listen", "unix-dgram",
         "unlinked")
LOCK_KINDS = ("posix", "flock", "ofd")
_seq = itertools.count(1)


@dataclass
class Workload:
    ct: str
    kind: str
    path: str     # the file (or directory for cwd) inside the container
    result: str   # where it writes its verdict, inside the container
    pid: int      # its pid inside the container

    def result_on_guest(self) -> Path:
        return CtState.load(self.ct).root / self.result.lstrip("/")

    def stop(self, timeout: float = 30.0) -> str:
        """SIGTERM it and return its own verdict ("PASS ..." or "FAIL: ...")."""
        proc = exec_in(self.ct, ["kill", "-TERM", str(self.pid)], capture=True, timeout=30)
        if proc.returncode != 0:
            raise CtError(f"{self.kind} workload pid {self.pid} in {self.ct} is gone: "
                          f"{proc.stderr.strip()}")
        out = self.result_on_guest()
        wait_for(f"the verdict of the {self.kind} workload",
                 lambda: out.exists() and out.read_text().endswith("\n"), timeout)
        return out.read_text().strip()


def start(ct: str, kind: str, path: str, binary: str = "nfsload") -> Workload:
    """`binary`: the program to run (the `exe` kind runs a copy of nfsload kept on NFS)."""
    if kind not in KINDS:
        raise ValueError(f"unknown workload {kind}")
    result = f"/tmp/nfsload-{kind}-{next(_seq)}.result"
    proc = exec_in(ct, [binary, kind, path, result], detach=True, timeout=30)
    if proc.returncode != 0 or not proc.stdout.strip().isdigit():
        raise CtError(f"starting {kind} workload in {ct}: {proc.stdout} {proc.stderr}")
    return Workload(ct, kind, path, result, int(proc.stdout.strip()))


def lock_held_by_other(ct: str, kind: str, path: str) -> bool:
    """Ask a fresh process in the container whether it can take the lock (it must not)."""
    proc = exec_in(ct, ["nfsload", "lockcheck", kind, path], capture=True, timeout=60)
    if proc.returncode not in (0, 1):
        raise CtError(f"lockcheck {kind} {path}: {proc.stdout} {proc.stderr}")
    return proc.returncode == 0


# Exits 1 unless every pid given is a live process: a zombie (a workload that gave its
# verdict and exited, not reaped yet) answers kill -0 like a live one.
_ALIVE_CHECK = ('for p; do s=$(cat /proc/$p/stat 2>/dev/null) || exit 1; s=${s##*") "}; '
                'case $s in Z*|X*) exit 1;; esac; done')


def _all_alive(loads: list[Workload]) -> bool:
    by_ct: dict[str, list[str]] = {}
    for w in loads:
        by_ct.setdefault(w.ct, []).append(str(w.pid))
    return all(exec_in(ct, ["sh", "-c", _ALIVE_CHECK, "sh", *pids], capture=True,
                       timeout=30).returncode == 0
               for ct, pids in by_ct.items())


def progress(w: Workload) -> int | None:
    """The workload's iteration count (nfsload keeps it in RESULT.progress); None before it
    has made the file."""
    try:
        data = (w.result_on_guest().parent / (Path(w.result).name + ".progress")).read_bytes()
    except FileNotFoundError:
        return None
    return int.from_bytes(data, sys.byteorder) if len(data) == 8 else None


def _verdict_if_ended(w: Workload) -> str | None:
    out = w.result_on_guest()
    text = out.read_text().strip() if out.exists() else ""
    return text or None


def _wait_iterations(loads: list[Workload], more: int, what: str, timeout: float) -> None:
    """Until each workload has done `more` iterations past the count it had on entry (a
    workload without its progress file yet starts at 0); a workload that ends is an error."""
    start = {id(w): progress(w) or 0 for w in loads}
    waiting = list(loads)

    deadline = time.monotonic() + timeout
    while waiting:
        for w in list(waiting):
            verdict = _verdict_if_ended(w)
            if verdict is not None:
                raise CtError(f"the {w.kind} workload ended while {what}: {verdict}")
            if (progress(w) or 0) >= start[id(w)] + more:
                waiting.remove(w)
        if waiting and time.monotonic() > deadline:
            raise CtError(f"timed out after {timeout:.0f} s waiting for {what}; not moving: " +
                          ", ".join(f"{w.kind} (pid {w.pid}, at {progress(w)})" for w in waiting))
        if waiting:
            time.sleep(0.05)
    if not _all_alive(loads):
        raise CtError("a workload died: " + ", ".join(
            f"{w.kind}: {w.result_on_guest().read_text().strip()}"
            for w in loads if w.result_on_guest().exists()))


def wait_running(loads: list[Workload], iterations: int = 3, timeout: float = 180.0) -> None:
    """Until every workload has used its references `iterations` times (set up and working)."""
    _wait_iterations(loads, iterations, "the workloads start working", timeout)


def wait_progress(loads: list[Workload], iterations: int = 5, timeout: float = 180.0) -> None:
    """After a resume: until every workload has done `iterations` more rounds on the
    restored references, all still alive."""
    _wait_iterations(loads, iterations, "the workloads keep working", timeout)


def stop_quietly(loads: list[Workload]) -> None:
    """Best effort, for error paths: stop whatever is still running, ignore failures."""
    for w in loads:
        try:
            w.stop()
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
