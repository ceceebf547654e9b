"""Unix sockets bound on A: listeners keep accepting at the same path on B, datagram
sockets keep receiving (queued datagrams included)."""

from __future__ import annotations

import json
import os
import stat
import socket
import subprocess
import sys
import time
from pathlib import Path

from spfs import swap

VICTIM = Path(__file__).parent / "victims" / "sockets.py"


def _ask(path: Path, line: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(str(path))
        c.sendall(line)
        return c.recv(100)


def _start(mounts) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(VICTIM), str(mounts.a), str(mounts.ctrl)])
    mounts.procs.append(proc)
    mounts.wait_ready(1)
    return proc


def test_listener_and_datagram_socket_move_to_b(mounts):
    proc = _start(mounts)
    assert _ask(mounts.a / "srv.sock", b"before") == b"ok:before"
    sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for i in range(3):
        sender.sendto(f"queued{i}".encode(), str(mounts.a / "dgram.sock"))
    plan = swap.discover(str(mounts.a), str(mounts.b), pids=[proc.pid])
    assert plan.unmovable == []
    assert {d.rel for d in plan.descriptions} == {"srv.sock", "dgram.sock"}
    swap.prepare(plan)
    report = swap.commit(plan)
    assert report.ok, report.error
    assert _ask(mounts.b / "srv.sock", b"after") == b"ok:after"
    sender.sendto(b"later", str(mounts.b / "dgram.sock"))
    (mounts.ctrl / "drain").touch()  # read all the same at the stop
    assert subprocess.run(["umount", str(mounts.a)]).returncode == 0, "a socket still pins A"
    assert _ask(mounts.b / "srv.sock", b"again") == b"ok:again"
    mounts.stop_victims()
    rep = json.loads(next(mounts.ctrl.glob("report.*")).read_text())
    assert rep["served"] == 3
    assert rep["datagrams"] == ["queued0", "queued1", "queued2", "later"]


def test_listener_with_unaccepted_connections_is_not_switched(mounts):
    proc = _start(mounts)
    (mounts.ctrl / "hold").touch()
    deadline = time.monotonic() + 20
    while not (mounts.ctrl / "holding").exists():  # it no longer accepts
        assert time.monotonic() < deadline, "the victim did not stop accepting"
        time.sleep(0.005)
    waiting = socket.socket(socket.AF_UNIX)
    waiting.connect(str(mounts.a / "srv.sock"))  # queued, not accepted
    waiting.sendall(b"queued")
    plan = swap.discover(str(mounts.a), str(mounts.b), pids=[proc.pid])
    swap.prepare(plan)
    report = swap.commit(plan)
    assert not report.ok and "not yet accepted" in report.error
    (mounts.ctrl / "hold").unlink()
    waiting.settimeout(5)
    assert waiting.recv(100) == b"ok:queued", "the queued connection was lost"
    assert _ask(mounts.a / "srv.sock", b"still") == b"ok:still"


def test_moved_socket_keeps_its_address_when_the_target_replaces_the_source(mounts):
    """The manager's case: B will be mounted where A is, so the new sockets are bound on B
    under A's addresses (what getsockname, /proc/net/unix and CRIU's next dump read)."""
    proc = _start(mounts)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        for i in range(2):
            sender.sendto(f"queued{i}".encode(), str(mounts.a / "dgram.sock"))
    plan = swap.discover(str(mounts.a), str(mounts.b), pids=[proc.pid])
    plan.target_replaces_source = True
    swap.prepare(plan)
    report = swap.commit(plan)
    assert report.ok, report.error
    inodes = {}
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8:
            inodes[fields[7]] = int(fields[6])
    held = {int(os.readlink(f"/proc/{proc.pid}/fd/{fd}")[8:-1])
            for fd in os.listdir(f"/proc/{proc.pid}/fd")
            if os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith("socket:[")}
    for name in ("srv.sock", "dgram.sock"):
        assert inodes.get(str(mounts.a / name)) in held, f"{name}: address is not A's"
        assert stat.S_ISSOCK(os.lstat(mounts.b / name).st_mode)
    assert _ask(mounts.b / "srv.sock", b"via b") == b"ok:via b"  # the file on B reaches it
    (mounts.ctrl / "drain").touch()  # read all the same at the stop
    mounts.stop_victims()
    rep = json.loads(next(mounts.ctrl.glob("report.*")).read_text())
    assert rep["datagrams"] == ["queued0", "queued1"]
