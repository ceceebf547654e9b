"""Compile the lab's C test workloads (static, so they run in a busybox container root)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from spfs.lab.paths import WORKLOADS_SRC, LabPaths

log = logging.getLogger(__name__)


def ensure_workloads(paths: LabPaths) -> list[Path]:
    paths.bin_dir.mkdir(parents=True, exist_ok=True)
    built = []
    for src in sorted(WORKLOADS_SRC.glob("*.c")):
        exe = paths.bin_dir / src.stem
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            log.info("compiling %s", src.name)
            proc = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(exe),
                                   str(src)], capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {src}: {proc.stderr}")
        built.append(exe)
    return built
