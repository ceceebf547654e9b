"""Control sockets live in private host directories (issue 12 item 4): the directory is made
0700, or refused if it is a symlink, not ours, open to others, under a directory others may
write, or on FUSE (a share); spfs, spfs-manager and spfs-standby each refuse such a
directory before they touch anything in it, and their socket file is 0600 when it appears.

Real directories, real ownership and modes, a real SPFS (FUSE) mount, the real daemons."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from spfs.manager.server import ControlServer
from spfs.standby.server import StandbyServer
from spfs.sys.private_dir import UnsafeDirectory, bind_private, open_private_dir

from spfs_testlib import NOBODY, SPFS, is_mounted, start_spfs


def _refused(path: Path, match: str) -> None:
    with pytest.raises(UnsafeDirectory, match=match):
        os.close(open_private_dir(str(path)))


def test_a_missing_dir_is_made_0700(tmp_path: Path) -> None:
    os.close(open_private_dir(str(tmp_path / "a" / "run")))
    st = os.lstat(tmp_path / "a" / "run")
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == os.geteuid()


def test_an_existing_dir_open_to_others_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    os.chmod(tmp_path / "run", 0o755)
    _refused(tmp_path / "run", "has mode 755, not 700")
    assert stat.S_IMODE(os.lstat(tmp_path / "run").st_mode) == 0o755  # left as it was


def test_a_dir_of_another_owner_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o700)
    os.chown(tmp_path / "run", NOBODY, NOBODY)
    _refused(tmp_path / "run", f"owned by uid {NOBODY}")


def test_a_symlink_to_a_private_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(tmp_path / "real")
    _refused(tmp_path / "run", "is a symbolic link")


def test_a_dir_below_one_others_may_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could rename our directory away and put theirs there
    _refused(shared / "run", "writable by others")
    os.chmod(shared, 0o1777)  # sticky: others cannot rename or remove our entries
    os.close(open_private_dir(str(shared / "run")))


def test_a_dir_on_fuse_is_refused(tmp: Path) -> None:
    # a real SPFS proxy mount stands for a share (on NFS the check is the same one)
    mount = start_spfs(tmp / "mnt", "proxy", tmp, "--proxy-dir", str(tmp / "target"))
    try:
        (tmp / "mnt" / "run").mkdir(mode=0o700)
        _refused(tmp / "mnt" / "run", "is on FUSE")
    finally:
        mount.stop()


def test_the_socket_file_is_0600_from_its_creation(tmp_path: Path) -> None:
    umask = os.umask(0)  # the most permissive one a caller could have
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            bind_private(sock, str(tmp_path / "run" / "x.sock"))
            assert stat.S_IMODE(os.lstat(tmp_path / "run" / "x.sock").st_mode) == 0o600
    finally:
        assert os.umask(umask) == 0  # and the caller's umask is back


def test_spfs_refuses_a_socket_dir_open_to_others(tmp: Path) -> None:
    # tmp is 0755 (non-root test users traverse it to the mount)
    (tmp / "mnt").mkdir()
    result = subprocess.run([*SPFS, str(tmp / "mnt"), "--mode", "stub", "--socket-path",
                             str(tmp / "ctl.sock"), "--foreground"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "not mounted" in result.stderr and "has mode 755, not 700" in result.stderr
    assert not is_mounted(tmp / "mnt") and not (tmp / "ctl.sock").exists()


def test_the_manager_refuses_a_symlinked_socket_dir(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(victim)
    with pytest.raises(UnsafeDirectory, match="is a symbolic link"):
        ControlServer(str(tmp_path / "run" / "spfs-manager.sock"), lambda request: None)
    assert os.listdir(victim) == []


def test_the_standby_touches_nothing_in_a_symlinked_dir(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    (victim / "standby.sock").write_text("not a socket: a file the standby must not unlink")
    (tmp_path / "run").symlink_to(victim)
    with pytest.raises(UnsafeDirectory, match="is a symbolic link"):
        StandbyServer(str(tmp_path / "run" / "standby.sock")).bind()
    assert (victim / "standby.sock").read_text().startswith("not a socket")


def test_missing_parents_are_made_0755_even_under_umask_0(tmp_path: Path) -> None:
    umask = os.umask(0)
    try:
        os.close(open_private_dir(str(tmp_path / "a" / "b" / "run")))
    finally:
        os.umask(umask)
    assert [stat.S_IMODE(os.lstat(p).st_mode) for p in
            (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "run")] == \
        [0o755, 0o755, 0o700]
