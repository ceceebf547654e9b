"""The lab guest's fixed facts (NFS shares, cgroup roots), read from guest/lab-env.sh so
the shell side and the Python side cannot disagree."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

from spfs.lab.paths import GUEST_DIR

NFS_VERSIONS = ("3", "4.0", "4.1", "4.2")


@cache
def lab_env() -> dict[str, str]:
    env = {}
    for line in (GUEST_DIR / "lab-env.sh").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = value.strip().strip('"')
    return env


def in_guest() -> bool:
    return os.environ.get("SPFS_LAB") == "1"


@dataclass(frozen=True)
class Share:
    name: str
    server_dir: str   # directory on the server (guest root netns)
    v3_path: str      # export path for vers=3
    v4_path: str      # export path for vers=4.x (relative to the fsid=0 pseudo-root)

    def export_path(self, vers: str) -> str:
        return self.v3_path if vers == "3" else self.v4_path


def shares() -> dict[str, Share]:
    env = lab_env()
    out = {}
    for name in env["SPFS_LAB_SHARES"].split():
        up = name.upper()
        out[name] = Share(name, env[f"SPFS_LAB_SHARE_{up}_DIR"], env[f"SPFS_LAB_SHARE_{up}_V3"],
                          env[f"SPFS_LAB_SHARE_{up}_V4"])
    return out


def cgroup_v2_root() -> str:
    return lab_env()["SPFS_LAB_CGROUP_V2"]


def cgroup_v1_freezer_root() -> str:
    return lab_env()["SPFS_LAB_CGROUP_V1_FREEZER"]
