"""NFS mounted from inside a lab container's netns and mntns, every version, with locks
(issue 2 items 5 and 8)."""

import pytest

from spfs.lab.ct import workload
from spfs.lab.ct.container import exec_in

VERSIONS = ["3", "4.0", "4.1", "4.2"]


def _mountinfo(ct: str) -> str:
    return exec_in(ct, ["cat", "/proc/self/mountinfo"], capture=True, timeout=30).stdout


@pytest.mark.parametrize("vers", VERSIONS)
def test_nfs_mount_and_locks_in_container(make_ct, vers: str) -> None:
    ct = make_ct(nfs=[f"{vers}:a:/mnt/nfs"])
    line = next(line for line in _mountinfo(ct.name).splitlines() if " /mnt/nfs " in line)
    fstype = line.split(" - ")[1].split()[0]
    assert fstype == ("nfs" if vers == "3" else "nfs4")
    assert f"vers={vers}" in line
    # the client lives in the container's netns: it talks from the container's address
    assert f"addr={ct.nfs_server}" in line

    holders = {k: workload.start(ct.name, k, f"/mnt/nfs/lock-{k}") for k in workload.LOCK_KINDS}
    try:
        for kind, w in holders.items():
            assert _wait_locked(ct.name, kind, w.path), f"{kind} lock not seen as held"
    finally:
        verdicts = {k: w.stop() for k, w in holders.items()}
    for kind, verdict in verdicts.items():
        assert verdict.startswith("PASS"), f"{kind}: {verdict}"
    # once the holders are gone the locks are free again
    for kind in workload.LOCK_KINDS:
        assert not workload.lock_held_by_other(ct.name, kind, f"/mnt/nfs/lock-{kind}")


def _wait_locked(ct: str, kind: str, path: str, tries: int = 50) -> bool:
    import time
    for _ in range(tries):
        if workload.lock_held_by_other(ct, kind, path):
            return True
        time.sleep(0.1)
    return False


def test_two_containers_two_versions_share_data(make_ct) -> None:
    c1 = make_ct(nfs=["3:b:/data"])
    c2 = make_ct(nfs=["4.2:b:/data"])
    exec_in(c1.name, ["sh", "-c", "echo from-c1 > /data/hello"], timeout=30, capture=True)
    out = exec_in(c2.name, ["cat", "/data/hello"], timeout=30, capture=True)
    assert out.stdout == "from-c1\n"


def test_python_workloads_run_inside(make_ct) -> None:
    ct = make_ct(nfs=["4.1:a:/mnt/nfs"], binds=["/usr:/usr:ro"])
    out = exec_in(ct.name, ["python3", "-c",
                            "import os; open('/mnt/nfs/py','w').write(str(os.getpid()))"],
                  capture=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (ct.root / "mnt/nfs").exists()
