"""Which freezer cgroup a restored container lives in (the manager freezes it to swap)."""

from __future__ import annotations

import os
from pathlib import Path

from spfs.sys.mountinfo import parse_mountinfo


def _mountpoint_of(fstype: str, option: str | None = None) -> str | None:
    for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text()):
        if m.fstype == fstype and (option is None or option in m.super_options.split(",")):
            return m.mountpoint
    return None


def freezer_cgroup_of(pid: int) -> str:
    """The v1 freezer cgroup directory of `pid` if a freezer hierarchy is mounted, else its
    cgroup v2 directory."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "freezer" in controllers.split(","):
            root = _mountpoint_of("cgroup", "freezer")
            if root is not None:
                return os.path.normpath(f"{root}/{path}")
    for line in lines:
        hier, controllers, path = line.split(":", 2)
        if hier == "0" and controllers == "":
            root = _mountpoint_of("cgroup2")
            if root is not None:
                return os.path.normpath(f"{root}/{path}")
    raise RuntimeError(f"no freezer or cgroup v2 directory found for pid {pid}")
