"""Ending helper processes, bounded: the one way spfs waits for them and stops them."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass


def pid_alive(pid: int) -> bool:
    """Any process of that pid, not a zombie (a zombie child of ours counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def terminate(pid: int, timeout: float) -> bool:
    """SIGTERM a process that need not be our child, give it `timeout` seconds to go, then
    SIGKILL it. True if it went on SIGTERM (or was gone already)."""
    if not pid_alive(pid):
        return True
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            return False
        time.sleep(0.05)
    return True


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


def descendants(pid: int) -> list[int]:
    """pid's descendants, parents before children (from the ppid of every /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    order, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop(0)
        order.append(p)
        todo += children.get(p, [])
    return order


def process_state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat ("D": uninterruptible), "" if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def describe_stuck(pid: int) -> str:
    """What a process that does not go is waiting in: its state, wchan and kernel stack of
    each thread (the stack needs root; left out where unreadable)."""
    lines = []
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return f"pid {pid}: gone"
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/wchan") as f:
                wchan = f.read().strip() or "-"
        except OSError:
            continue
        lines.append(f"pid {pid} tid {tid} ({comm}) state {process_state(tid) or '?'} "
                     f"wchan {wchan}")
        try:
            with open(f"{base}/stack") as f:
                lines += ["    " + s for s in f.read().splitlines()]
        except OSError:
            pass
    return "\n".join(lines)


def kill_and_reap(proc: subprocess.Popen, timeout: float) -> bool:
    """SIGKILL a child and reap it within `timeout`. False (and it is left unreaped) when it
    does not go: a task in an uninterruptible wait only dies when that wait ends, and
    waiting for it without a bound is how a whole run hangs."""
    try:
        proc.kill()
    except OSError:
        pass
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def run_bounded(argv: list[str], timeout: float, kill_grace: float = 10.0,
                **popen: object) -> Finished:
    """subprocess.run(capture_output=True, text=True, timeout=...) without its two unbounded
    waits: for a killed child (a D-state one does not die) and for EOF on its pipes (a
    daemon it forked may hold them). Output goes through files. Raises TimeoutError, naming
    where the child is stuck when even SIGKILL did not end it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, **popen)  # type: ignore[arg-type]
        try:
            code = proc.wait(timeout)
        except BaseException as exc:
            gone = kill_and_reap(proc, kill_grace)
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            stuck = "" if gone else f"; killed but still there:\n{describe_stuck(proc.pid)}"
            raise TimeoutError(f"{argv[0]} did not finish in {timeout:g} s{stuck}") from None
        out.seek(0)
        err.seek(0)
        return Finished(code, out.read().decode(errors="replace"),
                        err.read().decode(errors="replace"))
