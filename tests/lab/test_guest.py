"""What the lab promises every command before it starts (spfs-lab run, issue 2 item 4)."""

import os
import subprocess
from pathlib import Path

from spfs.lab.env import cgroup_v1_freezer_root, cgroup_v2_root, shares


def test_nfs_server_exports_independent_tmpfs_shares() -> None:
    exports = subprocess.run(["exportfs", "-v"], capture_output=True, text=True,
                             check=True).stdout
    devs = set()
    for share in shares().values():
        assert share.server_dir in exports
        assert os.environ[f"SPFS_LAB_SHARE_{share.name.upper()}_DIR"] == share.server_dir
        fstype = subprocess.run(["stat", "-f", "-c", "%T", share.server_dir],
                                capture_output=True, text=True, check=True).stdout.strip()
        assert fstype == "tmpfs"
        devs.add(os.stat(share.server_dir).st_dev)
    assert len(devs) == len(shares()) >= 2
    versions = Path("/proc/fs/nfsd/versions").read_text()
    for v in ("+3", "+4", "+4.1", "+4.2"):
        assert v in versions


def test_cgroups_and_modules() -> None:
    assert Path(cgroup_v2_root(), "cgroup.procs").exists()
    assert Path(cgroup_v1_freezer_root(), "freezer.state").exists() is False  # root has none
    assert Path(cgroup_v1_freezer_root(), "cgroup.procs").exists()
    modules = Path("/proc/modules").read_text()
    for m in ("nfsd", "nfsv4", "nfsv3", "fuse", "veth", "tun"):
        assert f"{m} " in modules, m


def test_guest_has_no_network_interface_but_loopback() -> None:
    links = sorted(os.listdir("/sys/class/net"))
    assert links == ["lo"], links


def test_criu_check_passes() -> None:
    out = subprocess.run(["criu", "check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
