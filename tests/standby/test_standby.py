"""spfs-standby on the host: it forks the real spfs daemon (real FUSE mounts) and the real
spfs-manager, hands them the client's descriptors, reports exit statuses, refuses what it
must refuse, and its children outlive it."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from spfs.criu.manager_link import ManagerError, ManagerLink
from spfs.standby import client, service
from spfs.standby.child import run_child
from spfs.standby.protocol import SpawnRequest
from tests.fs.spfs_testlib import NOBODY, is_mounted, run_as, wait_for


@pytest.fixture
def standby(tmp_path: Path) -> Iterator[tuple[str, int]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    socket_path = str(run_dir / "standby.sock")
    with service.running(socket_path, tmp_path / "standby.log") as pid:
        yield socket_path, pid


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


@contextmanager
def _spfs_spawned(socket_path: str, tmp_path: Path
                  ) -> Iterator[tuple[client.StandbyChild, Path, Path]]:
    """spfs forked by the standby on tmp_path/mnt, proxying tmp_path/target, ready; killed
    and its mount detached afterwards, whatever the test did."""
    mnt, target = tmp_path / "mnt", tmp_path / "target"
    mnt.mkdir()
    target.mkdir()
    ready_read, ready_write = os.pipe()
    try:
        child = client.spawn(socket_path, "spfs", [
            str(mnt), "--mode", "proxy", "--proxy-dir", str(target), "--socket-path",
            str(tmp_path / "spfs.sock"), "--log", str(tmp_path / "spfs.log"), "--foreground",
            "--ready-fd", "3"], fds={3: ready_write}, new_session=True)
    finally:
        os.close(ready_write)
    try:
        # the ready fd closes when the mount answers
        assert select.select([ready_read], [], [], 30)[0], "spfs not ready"
        assert os.read(ready_read, 1) == b""
    finally:
        os.close(ready_read)
    try:
        yield child, mnt, target
    finally:
        child.kill()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_forked_spfs_serves_a_real_mount_and_its_exit_status_comes_back(
        standby: tuple[str, int], tmp_path: Path) -> None:
    socket_path, standby_pid = standby
    t0 = time.monotonic()
    with _spfs_spawned(socket_path, tmp_path) as (child, mnt, target):
        print(f"spfs forked and ready in {time.monotonic() - t0:.3f} s")
        assert _ppid(child.pid) == standby_pid
        (target / "f").write_bytes(b"through the forked daemon")
        assert (mnt / "f").read_bytes() == b"through the forked daemon"
        assert child.poll() is None
        # nothing of the standby's own sockets (listener, other clients) leaked into it
        assert not _socket_inodes(standby_pid) & _socket_inodes(child.pid)
        child.terminate()
        assert child.wait(15) == 0
        wait_for(lambda: not is_mounted(mnt), 10, "unmounted")


def test_exit_status_and_stderr_of_a_failing_program(standby: tuple[str, int]) -> None:
    err_read, err_write = os.pipe()
    try:
        child = client.spawn(standby[0], "spfs", ["--mode", "nonsense", "/nowhere"],
                             fds={2: err_write})
    finally:
        os.close(err_write)
    assert child.wait(15) == 2
    with os.fdopen(err_read, "rb") as err:
        assert b"invalid choice: 'nonsense'" in err.read()


def test_child_gets_exactly_the_descriptors_environment_directory_it_was_given(
        tmp_path: Path) -> None:
    """run_child, in a real forked child, with a module whose main reports what it sees."""
    report = tmp_path / "report.json"
    module = types.ModuleType("reporter")

    def main(argv: list[str]) -> int:
        Path(argv[0]).write_text(json.dumps({
            "env": dict(os.environ), "cwd": os.getcwd(), "fds": sorted(
                int(f) for f in os.listdir("/proc/self/fd")),
            "fd7": os.read(7, 100).decode(), "sid": os.getsid(0) == os.getpid()}))
        return 3
    module.main = main  # type: ignore[attr-defined]
    r, w = os.pipe()
    os.write(w, b"payload")
    os.close(w)
    stray = os.open("/dev/null", os.O_RDONLY)  # not given: must not reach the program
    pid = os.fork()
    if pid == 0:
        # as in a guest whose limit is the default: no scratch descriptor above it
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
        code = run_child(module, SpawnRequest("x", [str(report)], {"ONLY": "this"},
                                              str(tmp_path), True, [7]), [r])
        os._exit(code)
    os.close(r)
    os.close(stray)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3
    seen = json.loads(report.read_text())
    assert seen["env"] == {"ONLY": "this"}
    assert seen["cwd"] == str(tmp_path)
    assert seen["fd7"] == "payload"
    assert seen["sid"] is True
    # 0-2 (on /dev/null when not given), 7, and the directory listing's own descriptor
    assert set(seen["fds"]) - {0, 1, 2, 7} <= {3} and len(seen["fds"]) <= 5


@pytest.mark.parametrize("payload, fds, error", [
    (b"not json", 0, "not JSON"),
    (json.dumps({"program": "python", "argv": []}).encode(), 0, "unknown program"),
    (json.dumps({"program": "spfs", "argv": "--help"}).encode(), 0, "argv"),
    (json.dumps({"program": "spfs", "argv": [], "cwd": "relative"}).encode(), 0, "cwd"),
    (json.dumps({"program": "spfs", "argv": [], "env": {"A=B": "c"}}).encode(), 0, "env"),
    (json.dumps({"program": "spfs", "argv": [], "fds": [0, 1]}).encode(), 1, "descriptor"),
    (json.dumps({"program": "spfs", "argv": [], "fds": [5000]}).encode(), 1, "below 1024"),
])
def test_malformed_requests_are_refused_and_the_standby_goes_on(
        standby: tuple[str, int], tmp_path: Path, payload: bytes, fds: int, error: str) -> None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(10)
    conn.connect(standby[0])
    attached = [os.open("/dev/null", os.O_RDONLY) for _ in range(fds)]
    try:
        if attached:
            socket.send_fds(conn, [payload], attached)
        else:
            conn.send(payload)
        reply = json.loads(conn.recv(65536))
    finally:
        for fd in attached:
            os.close(fd)
        conn.close()
    assert error in reply["error"]
    child = client.spawn(standby[0], "spfs", ["--help"])
    assert child.wait(15) == 0


def test_other_users_are_kept_out(standby: tuple[str, int]) -> None:
    result = run_as(NOBODY, f"""
import socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect({standby[0]!r})
except PermissionError:
    print("refused")
""")
    assert result.stdout.strip() == "refused", result.stderr


def test_a_second_standby_on_the_same_socket_is_refused_a_stale_socket_is_replaced(
        standby: tuple[str, int], tmp_path: Path) -> None:
    socket_path, pid = standby
    result = subprocess.run([sys.executable, "-m", "spfs.standby.cli", "-s", socket_path,
                             "-l", str(tmp_path / "second.log")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "already serves" in result.stderr
    os.kill(pid, signal.SIGKILL)  # leaves its socket file behind
    wait_for(lambda: not os.path.exists(f"/proc/{pid}/status") or
             "zombie" in Path(f"/proc/{pid}/status").read_text(), 10, "standby killed")
    assert os.path.exists(socket_path)
    with service.running(socket_path, tmp_path / "third.log"):
        assert client.spawn(socket_path, "spfs", ["--help"]).wait(15) == 0


def test_no_standby_is_unavailable_not_an_error(tmp_path: Path) -> None:
    with pytest.raises(client.StandbyUnavailable):
        client.spawn(str(tmp_path / "none.sock"), "spfs", ["--help"])


def test_children_outlive_a_killed_standby(standby: tuple[str, int], tmp_path: Path) -> None:
    socket_path, standby_pid = standby
    with _spfs_spawned(socket_path, tmp_path) as (child, mnt, target):
        standby_fd, child_fd = os.pidfd_open(standby_pid), os.pidfd_open(child.pid)
        try:
            os.kill(standby_pid, signal.SIGKILL)
            # readable once the standby has exited: whatever its death does to its children
            # (a parent-death signal, a hangup) has been sent by then
            assert select.select([standby_fd], [], [], 15)[0], "the standby did not die"
            # served by the child after the standby's death, and the child has not exited
            (target / "g").write_bytes(b"still here")
            assert (mnt / "g").read_bytes() == b"still here"
            assert not select.select([child_fd], [], [], 0)[0], "the child died with the standby"
        finally:
            os.close(standby_fd)
            os.close(child_fd)
        assert child.poll() is None
        child.terminate()  # through its pidfd: no pid reuse can make this hit another
        assert child.wait(15) == client.UNKNOWN_EXIT  # nobody was left to tell its status
        assert not os.path.exists(f"/proc/{child.pid}") or \
            "zombie" in Path(f"/proc/{child.pid}/status").read_text()


def test_manager_forked_by_the_standby_forks_its_spfs_there_too(
        standby: tuple[str, int], tmp_path: Path) -> None:
    socket_path, standby_pid = standby
    link = ManagerLink(tmp_path / "manager", tmp_path / "logs")
    mp = tmp_path / "mp"
    mp.mkdir()
    t0 = time.monotonic()
    assert link.start(standby=socket_path) is True
    try:
        print(f"manager forked and listening in {time.monotonic() - t0:.3f} s")
        link.request(cmd="mount", id="s", mode="stub", mountpoint=str(mp))
        mount = next(m for m in link.status() if m["id"] == "s")
        assert _ppid(mount["spfs_pid"]) == standby_pid
        # no detaching fork of its own: the standby's child is the manager, stdio on
        # /dev/null once it said it was ready
        assert _ppid(link.pid) == standby_pid
        assert all(os.readlink(f"/proc/{link.pid}/fd/{fd}") == "/dev/null" for fd in (0, 1, 2))
        assert is_mounted(mp)
        log = (tmp_path / "logs" / "spfs-manager.log").read_text()
        assert f"standby forked {mount['spfs_pid']}" in log
        assert "warm spfs spare" not in log  # no spare competing for the CPU
    finally:
        link.stop()
        if is_mounted(mp):
            subprocess.run(["umount", "-l", str(mp)], check=False)
    wait_for(lambda: not is_mounted(mp), 15, "SPFS gone with the manager")


def test_a_manager_failing_to_start_in_the_standby_reports_why(
        standby: tuple[str, int], tmp_path: Path) -> None:
    # a control socket path longer than AF_UNIX allows: the manager cannot bind it
    link = ManagerLink(tmp_path / ("w" * 120), tmp_path / "logs")
    with pytest.raises(ManagerError, match="spfs-manager failed to start.*AF_UNIX|too long"):
        link.start(standby=standby[0])


def test_forked_programs_are_named_and_found_as_spfs_helpers(
        standby: tuple[str, int], tmp_path: Path) -> None:
    from spfs.lab.ct.inspect import spfs_helpers_running
    with _spfs_spawned(standby[0], tmp_path) as (child, mnt, _):
        assert Path(f"/proc/{child.pid}/comm").read_text().strip() == "spfs"
        helpers = spfs_helpers_running()
        assert any(h.startswith(f"{child.pid}:") for h in helpers), helpers
        assert not any(h.startswith(f"{standby[1]}:") for h in helpers)  # the standby itself
        child.terminate()
        assert child.wait(15) == 0


def _children_of(pid: int) -> set[int]:
    out = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if _ppid(int(name)) == pid:
                    out.add(int(name))
            except (OSError, IndexError):
                pass
    return out


def _spares(standby_pid: int) -> set[int]:
    """The standby's children that are no program yet: they keep its name."""
    return {pid for pid in _children_of(standby_pid)
            if Path(f"/proc/{pid}/comm").read_text().strip() not in ("spfs", "spfs-manager")}


SYS_RECVMSG = 47  # x86-64


def _waiting_for_a_request(pid: int) -> bool:
    """The spare sits in its recvmsg on the channel: it has dropped what it inherited (a
    spare only just forked still holds a copy of every descriptor of the standby)."""
    try:
        return Path(f"/proc/{pid}/syscall").read_text().split()[0] == str(SYS_RECVMSG)
    except (OSError, IndexError):
        return False


def test_a_request_takes_a_spare_forked_before_it_and_a_new_one_follows(
        standby: tuple[str, int], tmp_path: Path) -> None:
    socket_path, standby_pid = standby
    wait_for(lambda: len(_spares(standby_pid)) == 2, 15, "a spare per program")
    before = _spares(standby_pid)
    # Counted from /proc, a spare exists as soon as the fork returns, before it has run:
    # the check below means something only once each waits for its request.
    wait_for(lambda: all(_waiting_for_a_request(p) for p in before), 15, "spares waiting")
    # nothing of the standby's own sockets (the listener above all: a dead standby must
    # refuse connections, not queue them) in a spare
    assert all(not _socket_inodes(standby_pid) & _socket_inodes(p) for p in before)
    with _spfs_spawned(socket_path, tmp_path) as (child, mnt, target):
        assert child.pid in before  # no fork for the request: a spare became spfs
        (target / "f").write_bytes(b"spare")
        assert (mnt / "f").read_bytes() == b"spare"
        wait_for(lambda: len(_spares(standby_pid)) == 2, 15, "the spfs spare replaced")
        assert child.pid not in _spares(standby_pid)
        child.terminate()
        assert child.wait(15) == 0  # its status still comes back from the standby


def test_a_dead_spare_is_no_loss_and_spares_end_with_the_standby(
        standby: tuple[str, int], tmp_path: Path) -> None:
    socket_path, standby_pid = standby
    wait_for(lambda: len(_spares(standby_pid)) == 2, 15, "a spare per program")
    for pid in _spares(standby_pid):
        os.kill(pid, signal.SIGKILL)
    # whichever way the standby learns of it, the request is served (by a fork, then)
    assert client.spawn(socket_path, "spfs", ["--help"]).wait(15) == 0
    wait_for(lambda: len(_spares(standby_pid)) == 2, 15, "spares forked again")
    spares = _spares(standby_pid)
    os.kill(standby_pid, signal.SIGKILL)
    # EOF on their channel: nobody is left to ask them for anything
    wait_for(lambda: not any(os.path.exists(f"/proc/{p}") and "zombie" not in
                             Path(f"/proc/{p}/status").read_text() for p in spares),
             15, "spares gone with the standby")
    with pytest.raises(client.StandbyUnavailable):
        client.spawn(socket_path, "spfs", ["--help"])
