"""Run a criu command with a bound, and turn a failure into an error carrying its log tail."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


class CriuError(RuntimeError):
    pass


def log_tail(log_path: Path, lines: int = 25) -> str:
    if not log_path.exists():
        return "(no log)"
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])


def run_criu(argv: list[str], log_path: Path, timeout: float,
             env: dict[str, str] | None = None) -> float:
    """Run criu; return its wall time in seconds."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=env if env is not None else dict(os.environ))
    except subprocess.TimeoutExpired:
        raise CriuError(f"criu {argv[1]} did not finish in {timeout:.0f} s; "
                        f"log: {log_path}") from None
    if proc.returncode != 0:
        raise CriuError(f"criu {argv[1]} failed ({proc.returncode}): {proc.stderr.strip()}\n"
                        f"--- {log_path} (tail) ---\n{log_tail(log_path)}")
    return time.monotonic() - t0
