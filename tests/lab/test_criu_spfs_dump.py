"""criu-spfs dump (issue 6 item 1): NFS mounts of a lab container found and recorded, criu
dump run with them external and the network lock handled; works for v3 and v4.1 at once."""

import json
import subprocess
from pathlib import Path

import pycriu

from spfs.lab.ct import workload
from spfs.lab.ct.container import alive, stop_processes
from spfs.lab.ct.spec import CtState
from spfs.lab.paths import CHECKOUT

CRIU_SPFS = str(CHECKOUT / ".venv" / "bin" / "criu-spfs")


def test_dump_records_every_nfs_mount(make_ct, tmp_path: Path) -> None:
    ct = make_ct(nfs=["4.1:a:/mnt/a", "3:b:/mnt/b"], binds=["ct:/mnt/a:/srv:ro"])
    w = workload.start(ct.name, "append", "/mnt/a/dump.log")  # dirty NFS pages at dump time
    workload.wait_running([w])
    images = tmp_path / "img"
    proc = subprocess.run([CRIU_SPFS, "dump", "-t", str(ct.init_pid), "-D", str(images),
                           "--", "--freeze-cgroup", str(ct.cgroup_dir())],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not alive(CtState.load(ct.name))
    stop_processes(CtState.load(ct.name))  # lets the fixture tear down the rest

    doc = json.loads((images / "criu-spfs.json").read_text())
    sbs = {sb["fstype"]: sb for sb in doc["superblocks"]}
    assert set(sbs) == {"nfs", "nfs4"}
    v4 = sbs["nfs4"]
    assert sorted(m["mountpoint"] for m in v4["mounts"]) == ["/mnt/a", "/srv"]
    assert f"addr={ct.nfs_server}" in v4["super_options"] and "vers=4.1" in v4["super_options"]
    srv = next(m for m in v4["mounts"] if m["mountpoint"] == "/srv")
    assert srv["flags"] & 1  # ro kept
    assert sbs["nfs"]["source"].endswith("/srv/nfs4/b")
    # CRIU took every NFS mount as external, under the recorded keys
    with open(next(images.glob("mountpoints-*.img")), "rb") as f:
        mounts = pycriu.images.load(f)["entries"]
    keys = {m["mountpoint"]: m.get("ext_key") for m in mounts}
    for sb in doc["superblocks"]:
        for m in sb["mounts"]:
            assert keys[m["mountpoint"]] == sb["externals"][str(m["mnt_id"])]


def test_dump_of_a_container_whose_replace_is_pending_waits_for_it(make_ct, images) -> None:
    """Suspended again right after a resume that did not wait: SPFS still stands in for NFS
    (the replace runs in the background), so the dump waits for the replace, then dumps NFS
    as usual; the second resume works and the workload's data is whole."""
    from spfs.lab.ct import checkpoint
    from spfs.lab.ct.inspect import fstypes_at
    from tests.lab.migration import assert_all_pass, migrate, verdicts
    ct = make_ct(nfs=["4.1:a:/mnt/nfs"])
    loads = [workload.start(ct.name, "append", "/mnt/nfs/pending.log")]
    try:
        workload.wait_running(loads)
        checkpoint.suspend(ct, images)
        checkpoint.resume(CtState.load(ct.name), images, wait=False)
        assert fstypes_at(CtState.load(ct.name))["/mnt/nfs"][0] == "fuse.spfs"  # pending
        migrate(CtState.load(ct.name), images.with_name(f"{images.name}-again"))
        workload.wait_progress(loads)
    finally:
        results = verdicts(loads)
    assert_all_pass(results)
