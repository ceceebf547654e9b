"""Reading mountinfo (spfs.sys.mountinfo) as criu-spfs records it: NFS mounts, binds with
their sub-roots, escaped paths, flags and propagation (host test on text in the kernel's
format, plus this process's own mountinfo)."""

import os

from spfs.criu.mountinfo import MOUNT_FLAGS, NFS_TYPES, mount_flags, record_of
from spfs.sys.mountapi import Propagation
from spfs.sys.mountinfo import parse_mountinfo

SAMPLE = """\
68 45 0:40 /c1/root / rw,relatime - tmpfs ctroots rw,mode=755
71 68 0:43 / /mnt/nfs rw,nosuid,relatime shared:5 - nfs4 10.200.1.1:/a rw,vers=4.1,addr=10.200.1.1
69 68 0:43 /sub\\040dir /srv ro,relatime master:5 - nfs4 10.200.1.1:/a rw,vers=4.1,addr=10.200.1.1
72 68 0:44 / /mnt/v3 rw,relatime - nfs 10.200.1.1:/srv/nfs4/b rw,vers=3,addr=10.200.1.1
70 68 0:42 / /proc rw,relatime - proc proc rw
"""


def test_parse_nfs_mounts_binds_and_flags() -> None:
    entries = {e.mount_id: e for e in parse_mountinfo(SAMPLE)}
    assert [e.mount_id for e in entries.values() if e.fstype in NFS_TYPES] == [71, 69, 72]
    bind = entries[69]
    assert bind.root == "/sub dir" and bind.mountpoint == "/srv"
    assert bind.dev == entries[71].dev == "0:43"
    assert mount_flags(bind) & MOUNT_FLAGS["ro"]
    assert mount_flags(entries[71]) & MOUNT_FLAGS["nosuid"]
    assert not mount_flags(entries[71]) & MOUNT_FLAGS["ro"]
    assert entries[71].optional == ("shared:5",) and bind.optional == ("master:5",)
    assert entries[71].propagation is Propagation.SHARED and bind.propagation is Propagation.SLAVE
    assert "addr=10.200.1.1" in entries[72].super_options
    record = record_of(bind)
    assert (record["mnt_id"], record["options"], record["propagation"], record["root"]) == \
        (69, "ro,relatime", ["master:5"], "/sub dir")


def test_parse_own_mountinfo() -> None:
    with open(f"/proc/{os.getpid()}/mountinfo") as f:
        entries = parse_mountinfo(f.read())
    assert any(e.mountpoint == "/" for e in entries)
    assert all(e.mountpoint.startswith("/") for e in entries)
