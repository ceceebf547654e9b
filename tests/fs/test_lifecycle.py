"""Daemon lifecycle: readiness, daemonizing, unmount and lazy detach, mount namespaces."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from spfs.fs import control_client
from spfs_testlib import SPFS, SpfsMount, fusectl_dir, is_mounted, wait_for


def test_ready_fd_means_usable_and_umount_exits_zero(proxy: SpfsMount) -> None:
    # The fixture returned as soon as the ready fd closed: the mount must answer now.
    (proxy.target / "f").write_bytes(b"ready")
    assert (proxy.mountpoint / "f").read_bytes() == b"ready"
    subprocess.run(["umount", str(proxy.mountpoint)], check=True)
    assert proxy.exit_status() == 0
    assert not Path(proxy.socket).exists()


def test_lazy_detach_exits_once_the_last_open_file_is_closed(proxy: SpfsMount) -> None:
    (proxy.target / "f").write_bytes(b"still readable")
    fd = os.open(proxy.mountpoint / "f", os.O_RDONLY)
    try:
        subprocess.run(["umount", "-l", str(proxy.mountpoint)], check=True)
        assert not is_mounted(proxy.mountpoint)
        # Answered through the detached mount: the daemon is still there, serving it (had
        # it exited on the detach, the read would fail with ENOTCONN).
        assert os.pread(fd, 100, 0) == b"still readable"
        assert proxy.proc.poll() is None
    finally:
        os.close(fd)
    assert proxy.exit_status() == 0


def test_an_aborted_connection_ends_the_daemon_cleanly(proxy: SpfsMount) -> None:
    # An administrator's abort (fusectl) ends the filesystem as an unmount does: exit 0,
    # no traceback, the mount left for its owner to remove.
    (proxy.mountpoint / "f").write_bytes(b"x")
    (fusectl_dir(proxy.mountpoint) / "abort").write_text("1")
    assert proxy.exit_status() == 0
    with pytest.raises(OSError) as failed:
        (proxy.mountpoint / "f").read_bytes()
    assert failed.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    subprocess.run(["umount", "-l", str(proxy.mountpoint)], check=False)


def test_sigterm_with_open_file_keeps_serving_it_then_exits(proxy: SpfsMount) -> None:
    (proxy.target / "f").write_bytes(b"served after SIGTERM")
    fd = os.open(proxy.mountpoint / "f", os.O_RDONLY)
    try:
        proxy.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not is_mounted(proxy.mountpoint), 5, "mount detached")
        assert os.pread(fd, 100, 0) == b"served after SIGTERM"
        assert proxy.proc.poll() is None
    finally:
        os.close(fd)
    assert proxy.exit_status() == 0


def test_daemonizes_without_foreground(tmp: Path) -> None:
    mnt, sock = tmp / "mnt", str(tmp / "ctl" / "d.sock")
    mnt.mkdir()
    result = subprocess.run([*SPFS, str(mnt), "--mode", "proxy", "--proxy-dir",
                             str(tmp / "target"), "--socket-path", sock,
                             "--log", str(tmp / "d.log")], timeout=30)
    assert result.returncode == 0
    try:
        assert is_mounted(mnt)
        pid = control_client.status(sock)["pid"]
        (tmp / "target" / "f").write_bytes(b"daemon")
        assert (mnt / "f").read_bytes() == b"daemon"
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 10, "daemon exit")
        assert not is_mounted(mnt) and not os.path.exists(sock)
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_stale_socket_is_replaced_but_a_live_one_is_refused(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    (tmp / "ctl").mkdir(mode=0o700)
    stale.bind(str(tmp / "ctl" / "ctl.sock"))  # bound, never listening: like a killed daemon's
    stale.close()
    first = spfs_factory("proxy", "--proxy-dir", str(tmp / "target"))
    assert first.status()["mode"] == "proxy"
    second = spfs_factory("stub", mountpoint=tmp / "mnt2", wait_ready=False)
    assert second.proc.wait(20) == 2
    assert second.proc.stderr is not None and b"in use" in second.proc.stderr.read()
    assert not is_mounted(tmp / "mnt2")


@pytest.fixture
def other_mount_ns(tmp: Path) -> Iterator[tuple[int, Path]]:
    """A process in its own mount namespace with a tmpfs only it can see."""
    hidden = tmp / "hidden"
    hidden.mkdir()
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs spfs-test {hidden} && echo 'only in that namespace' > {hidden}/f "
         f"&& echo ready && exec sleep 60"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc.pid, hidden
    finally:
        proc.kill()
        proc.wait(5)


def test_proxy_dir_opened_in_another_mount_namespace(
        spfs_factory: Callable[..., SpfsMount], other_mount_ns: tuple[int, Path],
        tmp: Path) -> None:
    pid, hidden = other_mount_ns
    assert not (hidden / "f").exists()  # not visible here
    mount = spfs_factory("proxy", "--proxy-dir", str(hidden), "--proxy-mntns-pid", str(pid))
    assert (mount.mountpoint / "f").read_bytes() == b"only in that namespace\n"
    (mount.mountpoint / "g").write_bytes(b"written through spfs")
    mount.set_mode("proxy", tmp / "target")
    assert not (mount.mountpoint / "f").exists()
    control_client.set_mode(mount.socket, "proxy", str(hidden), ns_pid=pid)
    assert (mount.mountpoint / "g").read_bytes() == b"written through spfs"
    with pytest.raises(control_client.ControlError, match="mount namespace"):
        control_client.set_mode(mount.socket, "proxy", "/nonexistent", ns_pid=pid)


def test_readahead_is_raised_after_init(proxy: SpfsMount) -> None:
    from spfs.fs.mountinfo import find_fuse_device
    device = find_fuse_device(str(proxy.mountpoint))
    assert device is not None
    assert Path(f"/sys/class/bdi/{device}/read_ahead_kb").read_text().strip() == "1024"


def test_direct_io_serves_data_but_refuses_shared_mmap(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    import mmap
    (tmp / "target" / "f").write_bytes(b"direct" * 1000)
    mount = spfs_factory("proxy", "--proxy-dir", str(tmp / "target"), "--direct-io")
    with open(mount.mountpoint / "f", "r+b") as handle:
        assert handle.read() == b"direct" * 1000
        with pytest.raises(OSError):
            mmap.mmap(handle.fileno(), 6000, flags=mmap.MAP_SHARED)
        private = mmap.mmap(handle.fileno(), 6000, flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ)
        assert private[:6] == b"direct"
        private.close()


@pytest.mark.parametrize("args, message", [
    (["--mode", "proxy"], "proxy mode needs --proxy-dir"),
    (["--mode", "proxy", "--proxy-dir", "/nonexistent/spfs"], "cannot open proxy directory"),
    (["--mode", "stub", "--manifest", "/etc/hostname"], "only used in restore mode"),
    (["--mode", "stub", "--stub-timeout", "0"], "must be positive"),
])
def test_bad_command_lines_mount_nothing(tmp: Path, args: list[str], message: str) -> None:
    (tmp / "mnt").mkdir()
    result = subprocess.run([*SPFS, str(tmp / "mnt"), *args, "--foreground"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr
    assert not is_mounted(tmp / "mnt")


def test_proxy_dir_given_at_start_is_the_default_target(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    (tmp / "target" / "f").write_bytes(b"default target")
    mount = spfs_factory("stub", "--proxy-dir", str(tmp / "target"))
    record = control_client.set_mode(mount.socket, "proxy")
    assert record["new"] == "proxy"
    assert (mount.mountpoint / "f").read_bytes() == b"default target"


def test_sigterm_leaves_a_mount_that_is_no_longer_ours_alone(proxy: SpfsMount, tmp: Path) -> None:
    # Someone moved our mount away and mounted something else at our old mountpoint.
    moved = tmp / "moved"
    moved.mkdir()
    subprocess.run(["mount", "--move", str(proxy.mountpoint), str(moved)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "spfs-other", str(proxy.mountpoint)], check=True)
    try:
        proxy.proc.send_signal(signal.SIGTERM)
        # The daemon has handled the signal (and decided) once it says so.
        wait_for(lambda: "is no longer our mount" in proxy.log.read_text(), 20,
                 "the daemon's answer to SIGTERM in its log")
        assert is_mounted(proxy.mountpoint)  # the other filesystem is still there
        assert proxy.proc.poll() is None     # ours is still mounted (elsewhere)
        subprocess.run(["umount", str(moved)], check=True)
        assert proxy.exit_status() == 0
    finally:
        subprocess.run(["umount", "-l", str(proxy.mountpoint)], check=False)
        if is_mounted(moved):
            subprocess.run(["umount", "-l", str(moved)], check=False)
