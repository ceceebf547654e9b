"""Run a criu command with a bound, and turn a failure into an error carrying its log tail."""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from spfs.sys.children import describe_stuck, kill_and_reap

log = logging.getLogger(__name__)

KILL_GRACE = 10.0  # for a killed criu to be reaped; past it, it is reported and left
PROGRESS_EVERY = 30.0  # a log line while criu runs longer than this


class CriuError(RuntimeError):
    pass


def log_tail(log_path: Path, lines: int = 25) -> str:
    if not log_path.exists():
        return "(no log)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def stage_failures(log_path: Path) -> list[str]:
    """What criu-spfs's action script said went wrong (it names the stage), from CRIU's log:
    the lines CRIU logs while it aborts can push them out of the tail."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if "criu-spfs action:" in line][-5:]


def _last_line(log_path: Path) -> str:
    try:
        return log_tail(log_path, 1)
    except OSError:
        return "(no log)"


def run_criu(argv: list[str], log_path: Path, timeout: float,
             env: dict[str, str] | None = None) -> float:
    """Run criu; return its wall time in seconds. Never waits for it longer than `timeout`
    plus KILL_GRACE, even for a criu that a kill cannot end (subprocess.run waits for a
    killed child without a bound); any exception while it runs (a test's timeout, ^C) kills
    it the same way. Its output goes to a file: an orphan holding a pipe cannot block us."""
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=env if env is not None else dict(os.environ))
        try:
            status = _wait(proc, argv[1], log_path, t0 + timeout)
        except BaseException:
            _end(proc, argv[1])
            raise
        if status is None:
            stuck = _end(proc, argv[1])
            raise CriuError(f"criu {argv[1]} did not finish in {timeout:.0f} s{stuck}; "
                            f"log: {log_path}\n--- {log_path} (tail) ---\n{log_tail(log_path)}")
        if status != 0:
            err.seek(0)
            stderr = err.read().decode(errors="replace").strip()
            stages = "".join(f"{line}\n" for line in stage_failures(log_path))
            raise CriuError(f"criu {argv[1]} failed ({status}): {stages}{stderr}\n"
                            f"--- {log_path} (tail) ---\n{log_tail(log_path)}")
    return time.monotonic() - t0


def _wait(proc: subprocess.Popen, what: str, log_path: Path, deadline: float) -> int | None:
    """Its exit status, or None at the deadline; a progress line now and then."""
    t0 = time.monotonic()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return proc.wait(min(left, PROGRESS_EVERY))
        except subprocess.TimeoutExpired:
            log.info("criu %s still running after %.0f s; its log ends: %s", what,
                     time.monotonic() - t0, _last_line(log_path))


def _end(proc: subprocess.Popen, what: str) -> str:
    """Kill it, bounded; what it is stuck in if it would not go ("" if it went)."""
    if kill_and_reap(proc, KILL_GRACE):
        return ""
    stuck = describe_stuck(proc.pid)
    log.error("criu %s (pid %d) did not die in %.0f s after SIGKILL; left running:\n%s",
              what, proc.pid, KILL_GRACE, stuck)
    return f" and did not die when killed (pid {proc.pid}, left running):\n{stuck}\n"
