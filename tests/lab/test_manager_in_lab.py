"""spfs-manager with real NFS in a lab container (issue 5): a manager killed in the middle of
a replace must leave the container running (not frozen) and its files working through SPFS,
which keeps proxying to the real NFS it was switched to."""

from __future__ import annotations

import glob
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from spfs.lab.ct import checkpoint, workload
from spfs.lab.ct.inspect import fstypes_at
from spfs.lab.ct.spec import CtState
from spfs.lab.ct.util import wait_for
from tests.lab.migration import assert_all_pass, verdicts

PAUSED_MANAGER = Path(__file__).with_name("paused_manager.py")


def _manager_status() -> tuple[int, list[dict]] | None:
    from spfs.criu.manager_link import ManagerLink
    for pid_file in glob.glob("/run/criu-spfs/*/manager/spfs-manager.pid"):
        work = Path(pid_file).parent
        link = ManagerLink(work, work, int(Path(pid_file).read_text()))
        try:
            return link.pid, link.status()
        except OSError:
            return None
    return None


def _spfs_modes() -> set[str]:
    """The mode each SPFS of the restore reports on its own control socket."""
    from spfs.fs import control_client
    modes = set()
    for sock in glob.glob("/run/criu-spfs/*/manager/spfs-*/spfs.sock"):
        try:
            modes.add(control_client.status(sock)["mode"])
        except (OSError, ValueError, KeyError):
            modes.add("unknown")
    return modes


def _frozen(cgroup: Path) -> bool:
    state = cgroup / "freezer.state"
    if state.exists():
        return state.read_text().strip() != "THAWED"
    return (cgroup / "cgroup.freeze").read_text().strip() == "1"


def _start_loads(make_ct) -> tuple[CtState, list[workload.Workload]]:
    ct = make_ct(nfs=["4.1:a:/mnt/nfs"])
    return ct, [workload.start(ct.name, "append", "/mnt/nfs/kill.log"),
                workload.start(ct.name, "posix", "/mnt/nfs/kill.lock")]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _migrate_and_kill_manager_in(ct: CtState, images: Path, loads: list[workload.Workload],
                                 phase: str, manager_command: list[str] | None = None) -> int:
    """Suspend, resume without waiting, SIGKILL the manager once a replace is in `phase`;
    its pid."""
    workload.wait_running(loads)
    checkpoint.suspend(ct, images)
    checkpoint.resume(CtState.load(ct.name), images, wait=False,
                      manager_command=manager_command)

    killed: list[int] = []

    def reached() -> bool:
        found = _manager_status()
        if found is None:
            return False
        pid, mounts = found
        # the manager enters "proxy" before it tells SPFS: killed in between, SPFS would
        # stay a stub (nothing left to switch it), which is not the case under test
        if phase == "proxy" and _spfs_modes() != {"proxy"}:
            return False
        if any((m.get("replace") or {}).get("phase") == phase for m in mounts):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return True
        return False

    wait_for(f"the replace to reach {phase}", reached, 180, step=0.05)
    return killed[0]


def test_manager_killed_while_proxying_leaves_the_container_working(make_ct, images) -> None:
    ct, loads = _start_loads(make_ct)
    try:
        manager = _migrate_and_kill_manager_in(ct, images, loads, "proxy")
        wait_for("the killed manager to be gone", lambda: _gone(manager), 60)
        restored = CtState.load(ct.name)
        assert not _frozen(restored.cgroup_dir()), "container left frozen"
        # no replace happened: SPFS stays, proxying
        assert fstypes_at(restored)["/mnt/nfs"][0] == "fuse.spfs"
        assert workload.lock_held_by_other(ct.name, "posix", "/mnt/nfs/kill.lock")
        workload.wait_progress(loads)
        # the timeline says the replace did not complete
        wait_for("the restore watcher to give up", lambda: json.loads(
            (images / "criu-spfs-restore.json").read_text()).get("pending") is None, 60)
        assert json.loads((images / "criu-spfs-restore.json").read_text())["ok"] is False
    finally:
        results = verdicts(loads)
    assert_all_pass(results)


def _traced_or_stopped(pids: list[int]) -> list[str]:
    found = []
    for pid in pids:
        for status in glob.glob(f"/proc/{pid}/task/*/status"):
            fields = dict(line.split(":\t", 1) for line in Path(status).read_text().splitlines()
                          if ":\t" in line)
            if fields.get("State", "").split()[0] in ("t", "T") or fields.get("TracerPid", "0").strip() != "0":
                found.append(f"{status}: {fields.get('State')} tracer {fields.get('TracerPid')}")
    return found


@pytest.mark.parametrize("phase, fstype", [("swapping", "fuse.spfs"),
                                           ("mounts_moved", "nfs4"),
                                           ("thawed", "nfs4")])
def test_manager_killed_while_the_container_is_frozen(make_ct, images,
                                                      phase: str, fstype: str) -> None:
    """Killed inside the freeze: before the swap, after it, after the mounts moved. The
    thaw guard thaws, no task is left traced or stopped, the lock is held, the workloads
    pass. Killed before the swap, SPFS stays (proxying); after it, the guard first puts NFS
    in place (processes on NFS under an SPFS mountpoint would not share its locks)."""
    ct, loads = _start_loads(make_ct)
    try:
        _migrate_and_kill_manager_in(ct, images, loads, phase,
                                     [sys.executable, str(PAUSED_MANAGER), phase, "120"])
        restored = CtState.load(ct.name)
        wait_for("the thaw guard to thaw the container",
                 lambda: not _frozen(restored.cgroup_dir()), 30)
        pids = [int(p) for p in (restored.cgroup_dir() / "cgroup.procs").read_text().split()]
        assert not _traced_or_stopped(pids)
        assert fstypes_at(restored)["/mnt/nfs"][0] == fstype
        assert workload.lock_held_by_other(ct.name, "posix", "/mnt/nfs/kill.lock")
        workload.wait_progress(loads)
    finally:
        results = verdicts(loads)
    assert_all_pass(results)
