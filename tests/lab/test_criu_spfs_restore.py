"""criu-spfs restore end to end (issue 6): SPFS stands in for the shares at restore, the
manager puts the real NFS back inside the container, spfs and the manager exit; workloads
check their own data afterwards."""

import json

import pytest

from spfs.lab.ct import checkpoint, workload
from spfs.lab.ct.container import alive
from spfs.lab.ct.inspect import fstypes_at, spfs_helpers_running
from spfs.lab.ct.spec import CtState


@pytest.mark.parametrize("vers", ["4.1", "3"])
def test_basic_restore_puts_nfs_back(make_ct, images, vers: str) -> None:
    ct = make_ct(nfs=[f"{vers}:a:/mnt/nfs"])
    assert workload.exec_in(ct.name, ["mkdir", "-p", "/mnt/nfs/sub"], timeout=30).returncode == 0
    loads = [workload.start(ct.name, "append", "/mnt/nfs/w.log"),
             workload.start(ct.name, "mmap", "/mnt/nfs/m.dat"),
             workload.start(ct.name, "posix", "/mnt/nfs/l.dat"),
             workload.start(ct.name, "cwd", "/mnt/nfs/sub")]
    try:
        workload.wait_running(loads)
        before = fstypes_at(ct)["/mnt/nfs"][0]
        checkpoint.suspend(ct, images)
        assert not alive(CtState.load(ct.name))
        checkpoint.resume(CtState.load(ct.name), images)
        restored = CtState.load(ct.name)
        assert alive(restored)
        assert spfs_helpers_running() == []
        assert fstypes_at(restored)["/mnt/nfs"][0] == before
        assert workload.lock_held_by_other(ct.name, "posix", "/mnt/nfs/l.dat")
        workload.wait_progress(loads)
    finally:
        verdicts = {w.kind: w.stop() for w in loads}
    for kind, verdict in verdicts.items():
        assert verdict.startswith("PASS"), f"{kind}: {verdict}"
    timeline = json.loads((images / "criu-spfs-restore.json").read_text())
    assert timeline["ok"] is True
    steps = [s["what"] for s in timeline["steps"]]
    assert any("stub mode" in s for s in steps) and any("replaced by" in s for s in steps)
