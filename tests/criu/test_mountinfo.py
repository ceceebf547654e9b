"""criu-spfs's reading of mountinfo: NFS mounts grouped by superblock, binds with their
sub-roots, escaped paths, flags and propagation (host test on text in the kernel's format,
plus this process's own mountinfo)."""

import os

from spfs.criu.mountinfo import MOUNT_FLAGS, parse_mountinfo

SAMPLE = """\
68 45 0:40 /c1/root / rw,relatime - tmpfs ctroots rw,mode=755
71 68 0:43 / /mnt/nfs rw,nosuid,relatime shared:5 - nfs4 10.200.1.1:/a rw,vers=4.1,addr=10.200.1.1
69 68 0:43 /sub\\040dir /srv ro,relatime master:5 - nfs4 10.200.1.1:/a rw,vers=4.1,addr=10.200.1.1
72 68 0:44 / /mnt/v3 rw,relatime - nfs 10.200.1.1:/srv/nfs4/b rw,vers=3,addr=10.200.1.1
70 68 0:42 / /proc rw,relatime - proc proc rw
"""


def test_parse_nfs_mounts_binds_and_flags() -> None:
    entries = {e.mnt_id: e for e in parse_mountinfo(SAMPLE)}
    assert [e.mnt_id for e in entries.values() if e.is_nfs] == [71, 69, 72]
    bind = entries[69]
    assert bind.root == "/sub dir" and bind.mountpoint == "/srv"
    assert bind.dev == entries[71].dev == "0:43"
    assert bind.flags & MOUNT_FLAGS["ro"]
    assert entries[71].flags & MOUNT_FLAGS["nosuid"] and not entries[71].flags & MOUNT_FLAGS["ro"]
    assert entries[71].propagation == ("shared:5",) and bind.propagation == ("master:5",)
    assert "addr=10.200.1.1" in entries[72].super_options


def test_parse_own_mountinfo() -> None:
    with open(f"/proc/{os.getpid()}/mountinfo") as f:
        entries = parse_mountinfo(f.read())
    assert any(e.mountpoint == "/" for e in entries)
    assert all(e.mountpoint.startswith("/") for e in entries)
