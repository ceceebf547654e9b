"""A socket's name on the share never goes missing while a replace re-creates the socket.

In a replace A (SPFS) proxies onto B (the real filesystem), so the file a task's socket is
bound to *is* B's file, and the container keeps sending to it while the swap prepares.
The lab's 4.6 test on NFS 4.1 saw `sendto .../dgram.sock: ENOENT` in a workload: prepare
renamed the file aside on B and bound the new socket in its place while the container ran.
Here A is the real spfs daemon proxying onto a tmpfs B, its entry cache off so that every
send looks the name up on B, and a sender runs through discovery and prepare.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spfs import swap
from tests.fs.spfs_testlib import is_mounted, start_spfs

VICTIM = Path(__file__).parent / "victims" / "sockets.py"


@pytest.fixture
def proxied(tmp_path: Path, mounts):
    """spfs at A proxying onto B (the swap fixture's tmpfs B)."""
    subprocess.run(["umount", str(mounts.a)], check=True)  # A becomes the FUSE mount
    spfs = start_spfs(mounts.a, "proxy", tmp_path, "--proxy-dir", str(mounts.b),
                      "--cache-timeout", "0")
    try:
        yield mounts
    finally:
        mounts.stop_victims()
        spfs.stop()
        assert not is_mounted(mounts.a)


class Sender(threading.Thread):
    """Sends numbered datagrams to `path` until stopped; keeps every failure."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="dgram-sender", daemon=True)
        self.path, self.sent, self.errors = str(path), [], []
        self.stop = threading.Event()

    def run(self) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.settimeout(10)  # the victim drains; a full queue only slows us down
            n = 0
            while not self.stop.is_set():
                try:
                    s.sendto(f"d{n}".encode(), self.path)
                    self.sent.append(f"d{n}")
                except OSError as exc:
                    self.errors.append(f"d{n}: {exc}")
                n += 1
                self.stop.wait(0.0005)


def test_senders_reach_the_socket_through_the_whole_prepare_of_a_replace(proxied):
    m = proxied
    (m.ctrl / "drain").touch()  # the victim reads its datagrams as they come
    proc = subprocess.Popen([sys.executable, str(VICTIM), str(m.a), str(m.ctrl)])
    m.procs.append(proc)
    m.wait_ready(1)
    sender = Sender(m.a / "dgram.sock")
    sender.start()
    try:
        plan = swap.discover(str(m.a), str(m.b), pids=[proc.pid])
        assert {d.rel for d in plan.descriptions} == {"srv.sock", "dgram.sock"}
        plan.target_replaces_source = True  # the manager's case
        swap.prepare(plan)
        # a positive sign the sender ran across prepare, not before or after it
        sent_at_prepare = len(sender.sent) + len(sender.errors)
    finally:
        sender.stop.set()
        sender.join(20)
    assert sender.errors == [], f"the name went missing: {sender.errors[:5]}"
    assert sent_at_prepare > 0
    report = swap.commit(plan)  # in a replace the container is frozen from here on
    assert report.ok, report.error
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"after", str(m.b / "dgram.sock"))  # B's name now leads to the new socket
    names = sorted(p.name for p in m.b.iterdir())
    assert names == ["dgram.sock", "srv.sock"], f"staging or kept files left: {names}"
    m.stop_victims()
    report_file = next(m.ctrl.glob(f"report.{proc.pid}"))
    got = json.loads(report_file.read_text())["datagrams"]
    print(f"{len(sender.sent)} datagrams sent during discovery and prepare")
    assert got == sender.sent + ["after"], "datagrams lost or reordered"
