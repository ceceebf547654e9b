"""Proxy mode on a real FUSE mount: every operation lands on the target as it would directly."""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest

from spfs_testlib import NOBODY, SpfsMount, run_as


def test_mount_shows_as_fuse_spfs_with_safe_options(proxy: SpfsMount) -> None:
    with open("/proc/self/mountinfo") as handle:
        line = next(l for l in handle if l.split()[4] == str(proxy.mountpoint))
    after = line.split(" - ")[1].split()
    assert after[0] == "fuse.spfs" and after[1] == "spfs"
    assert "default_permissions" in after[2] and "allow_other" in after[2]


def test_create_read_write_truncate(proxy: SpfsMount) -> None:
    m, t = proxy.mountpoint, proxy.target
    (m / "f").write_bytes(b"hello world")
    assert (t / "f").read_bytes() == b"hello world"
    (t / "g").write_bytes(b"from target")
    assert (m / "g").read_bytes() == b"from target"
    with open(m / "f", "r+b") as handle:
        handle.seek(6)
        handle.write(b"WORLD")
    assert (t / "f").read_bytes() == b"hello WORLD"
    os.truncate(m / "f", 5)
    assert (t / "f").read_bytes() == b"hello"
    with open(m / "f", "ab") as handle:
        handle.write(b"!")
    assert (t / "f").read_bytes() == b"hello!"
    big = os.urandom(3 << 20)
    (m / "big").write_bytes(big)
    assert (t / "big").read_bytes() == big and (m / "big").read_bytes() == big


def test_rename_link_symlink_and_unlink_while_open(proxy: SpfsMount) -> None:
    m, t = proxy.mountpoint, proxy.target
    (m / "a").write_bytes(b"A")
    os.rename(m / "a", m / "b")
    assert not (t / "a").exists() and (t / "b").read_bytes() == b"A"
    os.link(m / "b", m / "c")
    assert os.stat(t / "c").st_ino == os.stat(t / "b").st_ino
    assert os.stat(m / "c").st_nlink == 2 and os.stat(m / "c").st_ino == os.stat(m / "b").st_ino
    os.symlink("b", m / "s")
    assert os.readlink(m / "s") == "b" and os.readlink(t / "s") == "b"
    assert (m / "s").read_bytes() == b"A"
    with open(m / "c", "r+b") as handle:
        os.unlink(m / "c")
        os.unlink(m / "b")
        assert not (t / "b").exists() and not (t / "c").exists()
        handle.write(b"Z")
        handle.seek(0)
        assert handle.read() == b"Z"
        assert os.fstat(handle.fileno()).st_nlink == 0
    (m / "x").write_bytes(b"x")
    (m / "y").write_bytes(b"y")
    os.rename(m / "x", m / "y")  # replaces y
    assert (t / "y").read_bytes() == b"x" and not (t / "x").exists()


def test_renamed_open_file_keeps_its_identity(proxy: SpfsMount) -> None:
    m, t = proxy.mountpoint, proxy.target
    (t / "d1").mkdir()
    (t / "d1" / "f").write_bytes(b"one")
    handle = open(m / "d1" / "f", "rb")
    try:
        os.rename(t / "d1", t / "d2")  # behind SPFS's back, on the target
        assert handle.read() == b"one"
        assert (m / "d2" / "f").read_bytes() == b"one"
    finally:
        handle.close()


def test_directories_fifo_and_readdir(proxy: SpfsMount) -> None:
    m, t = proxy.mountpoint, proxy.target
    os.mkdir(m / "d", 0o750)
    assert stat.S_IMODE(os.stat(t / "d").st_mode) == 0o750
    for i in range(300):
        (m / "d" / f"f{i:03}").write_bytes(b"")
    assert sorted(os.listdir(m / "d")) == sorted(os.listdir(t / "d"))
    assert len(os.listdir(m / "d")) == 300
    with pytest.raises(OSError) as info:
        os.rmdir(m / "d")
    assert info.value.errno == errno.ENOTEMPTY
    for name in os.listdir(m / "d"):
        os.unlink(m / "d" / name)
    os.rmdir(m / "d")
    assert not (t / "d").exists()
    os.mkfifo(m / "fifo", 0o640)
    assert stat.S_ISFIFO(os.stat(t / "fifo").st_mode)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append((m / "fifo").read_bytes()))
    reader.start()
    (m / "fifo").write_bytes(b"through the fifo")
    reader.join(10)
    assert got == [b"through the fifo"]


def test_chmod_chown_utimens_statfs(proxy: SpfsMount) -> None:
    m, t = proxy.mountpoint, proxy.target
    (m / "f").write_bytes(b"data")
    os.chmod(m / "f", 0o604)
    assert stat.S_IMODE(os.stat(t / "f").st_mode) == 0o604
    os.chown(m / "f", 1234, 5678)
    assert (os.stat(t / "f").st_uid, os.stat(t / "f").st_gid) == (1234, 5678)
    os.utime(m / "f", ns=(1_000_000_000_123, 2_000_000_000_456))
    st = os.stat(t / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_123, 2_000_000_000_456)
    assert os.stat(m / "f").st_mtime_ns == 2_000_000_000_456
    direct, through = os.statvfs(t), os.statvfs(m)
    assert (through.f_blocks, through.f_bsize) == (direct.f_blocks, direct.f_bsize)


def test_xattrs_reach_the_target_except_spfs_ones(proxy: SpfsMount) -> None:
    m, t = proxy.mountpoint, proxy.target
    (m / "f").write_bytes(b"")
    os.setxattr(m / "f", "user.colour", b"blue")
    assert os.getxattr(t / "f", "user.colour") == b"blue"
    assert os.getxattr(m / "f", "user.colour") == b"blue"
    assert "user.colour" in os.listxattr(m / "f")
    os.setxattr(m / "f", "user.spfs.link_remap", b"link_remap.7")
    os.setxattr(m / "f", "security.spfs.link_remap", b"link_remap.8")
    assert os.getxattr(m / "f", "user.spfs.link_remap") == b"link_remap.7"
    assert os.getxattr(m / "f", "security.spfs.link_remap") == b"link_remap.8"
    assert os.listxattr(t / "f") == ["user.colour"]
    with pytest.raises(OSError) as info:
        os.getxattr(t / "f", "user.spfs.link_remap")
    assert info.value.errno == errno.ENODATA
    os.removexattr(m / "f", "user.colour")
    os.removexattr(m / "f", "user.spfs.link_remap")
    assert os.listxattr(t / "f") == []
    with pytest.raises(OSError) as info:
        os.getxattr(m / "f", "user.spfs.link_remap")
    assert info.value.errno == errno.ENODATA


def test_non_root_caller_gets_target_permissions_and_owns_its_files(proxy: SpfsMount) -> None:
    m, t = proxy.mountpoint, proxy.target
    (t / "rootfile").write_bytes(b"root's")
    os.chmod(t / "rootfile", 0o644)
    (t / "private").mkdir(mode=0o700)
    result = run_as(NOBODY, f"""
import errno, os
m = {str(m)!r}
assert open(m + "/rootfile", "rb").read() == b"root's"
for action in (lambda: open(m + "/rootfile", "r+b"), lambda: os.truncate(m + "/rootfile", 0),
               lambda: os.chmod(m + "/rootfile", 0o666), lambda: os.unlink(m + "/private/x"),
               lambda: open(m + "/private/new", "wb"), lambda: os.chown(m + "/rootfile", 65534, 65534)):
    try:
        action()
    except PermissionError:
        pass
    else:
        raise SystemExit("allowed: " + repr(action))
with open(m + "/mine", "wb") as f:
    f.write(b"nobody's")
os.mkdir(m + "/mydir")
os.symlink("mine", m + "/mylink")
os.mkfifo(m + "/myfifo")
os.chmod(m + "/mine", 0o600)
print("ok")
""")
    assert result.returncode == 0, result.stderr + result.stdout
    assert (t / "rootfile").read_bytes() == b"root's"
    for name in ("mine", "mydir", "mylink", "myfifo"):
        st = os.lstat(t / name)
        assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), name
    assert stat.S_IMODE(os.stat(t / "mine").st_mode) == 0o600


def test_supplementary_groups_of_the_caller_are_used(proxy: SpfsMount) -> None:
    t = proxy.target
    (t / "team").mkdir()
    os.chown(t / "team", 0, 4242)
    os.chmod(t / "team", 0o770)
    code = f"""
import os
os.setgroups([4242]); os.setgid(65534); os.setuid(65534)
open({str(proxy.mountpoint / 'team' / 'f')!r}, "wb").write(b"group member")
"""
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert (t / "team" / "f").read_bytes() == b"group member"
    assert os.stat(t / "team" / "f").st_uid == NOBODY


def test_symlinks_are_never_followed_out_of_the_target(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    # target/../secret exists; mnt/../secret does not. If SPFS (root) followed the link
    # itself, reading through it would reach the secret.
    (tmp / "deep").mkdir()
    mount = spfs_factory("proxy", "--proxy-dir", str(tmp / "target"),
                         mountpoint=tmp / "deep" / "mnt")
    m, t = mount.mountpoint, mount.target
    (tmp / "secret").mkdir()
    (tmp / "secret" / "key").write_bytes(b"daemon-side secret")
    os.symlink("../secret", t / "escape")
    (t / "dir").mkdir()
    os.symlink("../../secret/key", t / "dir" / "up")
    assert os.readlink(m / "escape") == "../secret"
    assert (t / "escape" / "key").read_bytes() == b"daemon-side secret"  # sanity
    for path in (m / "escape" / "key", m / "dir" / "up"):
        with pytest.raises(FileNotFoundError):
            path.read_bytes()
    with pytest.raises(FileNotFoundError):
        os.listdir(m / "escape")
    # Operations on a link's name act on the link itself, never on what it points to.
    os.symlink(str(tmp / "secret" / "key"), t / "abs_escape")
    os.lchown(m / "abs_escape", 1234, 1234)
    assert os.stat(tmp / "secret" / "key").st_uid == 0
    assert os.lstat(t / "abs_escape").st_uid == 1234
    os.rename(m / "abs_escape", m / "renamed")
    os.unlink(m / "renamed")
    assert (tmp / "secret" / "key").read_bytes() == b"daemon-side secret"


def test_inode_count_stays_near_the_soft_limit(spfs_factory: Callable[..., SpfsMount],
                                               tmp: Path) -> None:
    for i in range(1500):
        (tmp / "target" / f"f{i:04d}").write_bytes(b"%d" % i)
    mount = spfs_factory("proxy", "--proxy-dir", str(tmp / "target"), "--inode-soft-limit", "200")
    for i in range(1500):
        assert (mount.mountpoint / f"f{i:04d}").read_bytes() == b"%d" % i
    assert sorted(os.listdir(mount.mountpoint))[-1] == "f1499"
    from spfs_testlib import wait_for
    wait_for(lambda: mount.status()["inodes"] < 400, 10, "old inodes forgotten")
    assert (mount.mountpoint / "f0000").read_bytes() == b"0"  # forgotten ones come back


def test_locks_stay_in_the_kernel_and_show_in_fdinfo(proxy: SpfsMount) -> None:
    import fcntl
    import subprocess
    import sys
    (proxy.target / "locked").write_bytes(b"0123456789")
    with open(proxy.mountpoint / "locked", "r+b") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 0)
        fdinfo = Path(f"/proc/self/fdinfo/{handle.fileno()}").read_text()
        assert "lock:" in fdinfo and "POSIX" in fdinfo
        probe = """
import fcntl, sys
with open(sys.argv[1], "r+b") as f:
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 0)
        print("free")
    except OSError:
        print("locked")
"""
        through_spfs = subprocess.run([sys.executable, "-c", probe, str(proxy.mountpoint / "locked")],
                                      capture_output=True, text=True, timeout=20).stdout.strip()
        on_target = subprocess.run([sys.executable, "-c", probe, str(proxy.target / "locked")],
                                   capture_output=True, text=True, timeout=20).stdout.strip()
        assert (through_spfs, on_target) == ("locked", "free")  # FUSE-inode local
        proxy.set_mode("stub")
        proxy.set_mode("proxy", proxy.target)
        assert "lock:" in Path(f"/proc/self/fdinfo/{handle.fileno()}").read_text()


def test_lookups_see_target_changes_at_once(spfs_factory: Callable[..., SpfsMount],
                                            tmp: Path) -> None:
    """Lookups of missing names are not remembered, and a held object is only reused for a
    name while that name still leads to it (the lookup fast path)."""
    mount = spfs_factory("proxy", "--proxy-dir", str(tmp / "target"), "--cache-timeout", "0")
    m, t = mount.mountpoint, mount.target
    assert not (m / "late").exists()
    (t / "late").write_bytes(b"1")
    assert (m / "late").read_bytes() == b"1"
    first = os.stat(m / "late").st_ino
    os.unlink(t / "late")
    (t / "late").write_bytes(b"22")
    assert (m / "late").read_bytes() == b"22"
    assert os.stat(m / "late").st_ino != first
    os.link(t / "late", t / "other")
    assert os.stat(m / "other").st_ino == os.stat(m / "late").st_ino
    os.unlink(t / "late")
    os.mkdir(t / "late")
    assert stat.S_ISDIR(os.stat(m / "late").st_mode)
    assert (m / "other").read_bytes() == b"22"
