"""Baseline migration with plain upstream CRIU (issue 2 item 6): the container's NFS mounts
are declared external on dump and mapped on resume to the same shares mounted in the guest's
root netns. Workloads check their own data after resume."""

import pytest

from spfs.lab.ct import checkpoint, workload
from spfs.lab.ct.container import alive
from spfs.lab.ct.spec import CtState


@pytest.mark.parametrize("vers", ["4.1", "3"])
def test_plain_suspend_resume_keeps_workloads_correct(make_ct, tmp_path, vers: str) -> None:
    ct = make_ct(nfs=[f"{vers}:a:/mnt/nfs"])
    exec_dirs = workload.exec_in(ct.name, ["mkdir", "-p", "/mnt/nfs/sub"], timeout=30)
    assert exec_dirs.returncode == 0
    loads = [workload.start(ct.name, "append", "/mnt/nfs/w.log"),
             workload.start(ct.name, "mmap", "/mnt/nfs/m.dat"),
             workload.start(ct.name, "posix", "/mnt/nfs/l.dat"),
             workload.start(ct.name, "cwd", "/mnt/nfs/sub")]
    try:
        workload.wait_running(loads)
        checkpoint.suspend(ct, tmp_path / "img", plain=True)
        assert not alive(CtState.load(ct.name))
        checkpoint.resume(CtState.load(ct.name), tmp_path / "img", plain=True)
        assert alive(CtState.load(ct.name))
        # the POSIX lock was re-acquired on resume: another process can't take it
        assert workload.lock_held_by_other(ct.name, "posix", "/mnt/nfs/l.dat")
        workload.wait_progress(loads)
    finally:
        verdicts = {w.kind: w.stop() for w in loads}
    for kind, verdict in verdicts.items():
        assert verdict.startswith("PASS"), f"{kind}: {verdict}"


def test_v1_freezer_container_suspend_resume(make_ct, tmp_path) -> None:
    ct = make_ct(nfs=["4.2:b:/mnt/nfs"], cgroup="v1")
    assert "freezer" in str(ct.cgroup_dir())
    w = workload.start(ct.name, "append", "/mnt/nfs/v1.log")
    try:
        workload.wait_running([w])
        checkpoint.suspend(ct, tmp_path / "img")  # criu-spfs (the default)
        checkpoint.resume(CtState.load(ct.name), tmp_path / "img")
        restored = CtState.load(ct.name)
        procs = (restored.cgroup_dir() / "cgroup.procs").read_text().split()
        assert str(restored.init_pid) in procs  # back in its v1 freezer cgroup
        workload.wait_progress([w])
    finally:
        verdict = w.stop()
    assert verdict.startswith("PASS"), verdict
