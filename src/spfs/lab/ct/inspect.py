"""What a test or the demo checks after a migration: which filesystems the container's
mountpoints are on, and whether any spfs or spfs-manager process is left."""

from __future__ import annotations

import os
from pathlib import Path

from spfs.lab.ct.spec import CtState
from spfs.standby.protocol import PROGRAMS
from spfs.sys.mountinfo import parse_mountinfo

HELPER_MODULES = tuple(PROGRAMS.values())  # spfs.fs.cli, spfs.manager.cli


def fstypes_at(state: CtState) -> dict[str, tuple[str, str]]:
    """mountpoint -> (fstype, major:minor) of what the container's init sees on top."""
    out: dict[str, tuple[str, str]] = {}
    for m in parse_mountinfo(Path(f"/proc/{state.init_pid}/mountinfo").read_text()):
        out[m.mountpoint] = (m.fstype, m.dev)
    return out


def _forked_by_standby(pid: str, cmd: str) -> bool:
    """spfs-standby's children keep its command line and take the program's name."""
    if "spfs.standby" not in cmd:
        return False
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() in PROGRAMS
    except OSError:
        return False


def spfs_helpers_running() -> list[str]:
    """Command lines of spfs daemons and managers still alive anywhere in the guest."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if any(m in cmd for m in HELPER_MODULES) or _forked_by_standby(pid, cmd):
            found.append(f"{pid}: {cmd.strip()}")
    return found
