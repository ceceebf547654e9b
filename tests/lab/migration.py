"""What every migration test of the seed plan does: suspend with criu-spfs, resume with
--wait (until the shares are real NFS again and spfs and spfs-manager have exited), then
check the mounts, the helpers and the workloads' own verdicts."""

from __future__ import annotations

import json
import os
from pathlib import Path

from spfs.lab.ct import checkpoint, workload
from spfs.lab.ct.container import alive
from spfs.lab.ct.inspect import fstypes_at, spfs_helpers_running
from spfs.lab.ct.spec import CtState

WORK_ROOT = "/run/criu-spfs"  # criu-spfs restore's work dirs, one per restore


def migrate(ct: CtState, images: Path) -> dict:
    """One suspend/resume cycle; returns the restore timeline (criu-spfs-restore.json)."""
    before = fstypes_at(ct)
    # what an earlier test left (a killed manager's SPFS lives until its container goes)
    # is not this restore's doing
    earlier = set(os.listdir(WORK_ROOT)) if os.path.isdir(WORK_ROOT) else set()
    nfs_points = {p: t for p, (t, _) in before.items() if t in ("nfs", "nfs4")}
    checkpoint.suspend(ct, images)
    assert not alive(CtState.load(ct.name))
    checkpoint.resume(CtState.load(ct.name), images)
    restored = CtState.load(ct.name)
    assert alive(restored)
    assert spfs_helpers_running() == [], "spfs or spfs-manager still running after --wait"
    after = fstypes_at(restored)
    for point, fstype in nfs_points.items():
        assert after[point][0] == fstype, f"{point} is {after[point][0]} after resume"
    assert not any(t == "fuse.spfs" for t, _ in after.values())
    left = [os.path.join(d, n) for d, dirs, files in os.walk(WORK_ROOT)
            for n in dirs + files if os.path.join(d, n).split("/")[3] not in earlier]
    assert not left, f"criu-spfs left {left}"
    timeline = json.loads((images / "criu-spfs-restore.json").read_text())
    assert timeline["ok"] is True, timeline
    return timeline


def verdicts(loads: list[workload.Workload]) -> dict[str, str]:
    return {f"{w.kind} {w.path}": w.stop() for w in loads}


def assert_all_pass(results: dict[str, str]) -> None:
    failed = {k: v for k, v in results.items() if not v.startswith("PASS")}
    assert not failed, failed


def migrate_with(ct: CtState, images: Path, loads: list[workload.Workload],
                 iterations: int = 5) -> dict:
    """Workloads running -> one migration -> they keep running -> all their verdicts PASS."""
    try:
        workload.wait_running(loads, iterations)
        timeline = migrate(ct, images)
        workload.wait_progress(loads, iterations)
    finally:
        results = verdicts(loads)
    assert_all_pass(results)
    return timeline
