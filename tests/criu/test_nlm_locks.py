"""NFSv3 OFD locks kept as OFD locks: the ownership probe on real locks held by a real
process, and the filelocks.img edit through pycriu. (NFS itself is in the lab: 4.8 v3.)"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pycriu
import pytest

from spfs.criu import nlm_locks
from spfs.swap import procfs
from spfs.sys.regular import NotRegularFile

HOLDER = """
import fcntl, os, struct, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
assert fd == 3
lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
fcntl.fcntl(fd, 37 if sys.argv[2] == "ofd" else fcntl.F_SETLK, lock)
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path: Path):
    procs = []

    def start(kind: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / f"{kind}.lock"), kind],
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("kind, owned", [("ofd", True), ("posix", False)])
def test_probe_tells_a_description_lock_from_a_process_lock(holder, kind: str, owned: bool) -> None:
    proc = holder(kind)
    [lock] = procfs.fdinfo(proc.pid, 3).locks
    assert nlm_locks._owned_by_description(proc.pid, 3, lock) is owned


def test_find_reports_only_locks_shown_as_posix_that_the_description_owns(holder, tmp_path: Path) -> None:
    """On a local filesystem an OFD lock is shown as OFDLCK, so nothing is reported; a POSIX
    lock is shown as POSIX but owned by the process, so nothing is reported either."""
    ofd, posix = holder("ofd"), holder("posix")
    dev = os.stat(tmp_path).st_dev
    assert nlm_locks.find(ofd.pid, {dev}) == []
    assert nlm_locks.find(posix.pid, {dev}) == []
    assert nlm_locks.find(posix.pid, set()) == []


def test_marked_entries_become_ofd_in_file_locks_img(tmp_path: Path) -> None:
    entries = [{"flag": nlm_locks.FL_POSIX, "type": fcntl.F_WRLCK, "pid": 7, "fd": 4, "start": 0, "len": 0},
               {"flag": nlm_locks.FL_POSIX, "type": fcntl.F_WRLCK, "pid": 8, "fd": 4, "start": 0, "len": 0},
               {"flag": 2, "type": fcntl.F_WRLCK, "pid": 7, "fd": 5, "start": 0, "len": 0}]
    with (tmp_path / "filelocks.img").open("wb") as f:
        pycriu.images.dump({"magic": "FILE_LOCKS", "entries": entries}, f)
    marked = nlm_locks.mark_in_images(tmp_path, [nlm_locks.OfdLock(pid=1007, nspid=7, fd=4)])
    assert marked == 1
    with (tmp_path / "filelocks.img").open("rb") as f:
        flags = [(e["pid"], e["fd"], e["flag"]) for e in pycriu.images.load(f)["entries"]]
    assert flags == [(7, 4, nlm_locks.FL_OFD), (8, 4, nlm_locks.FL_POSIX), (7, 5, 2)]


def test_marking_neither_follows_nor_writes_through_symlinks(tmp_path: Path) -> None:
    entries = [{"flag": nlm_locks.FL_POSIX, "type": fcntl.F_WRLCK, "pid": 7, "fd": 4,
                "start": 0, "len": 0}]
    images = tmp_path / "img"
    images.mkdir()
    with (images / "filelocks.img").open("wb") as f:
        pycriu.images.dump({"magic": "FILE_LOCKS", "entries": entries}, f)
    victim = tmp_path / "victim"
    victim.write_text("host file")
    (images / "filelocks.new").symlink_to(victim)  # left at the temporary name
    assert nlm_locks.mark_in_images(images, [nlm_locks.OfdLock(pid=1007, nspid=7, fd=4)]) == 1
    assert victim.read_text() == "host file"
    (images / "filelocks.img").unlink()
    (images / "filelocks.img").symlink_to(victim)
    with pytest.raises(NotRegularFile, match="filelocks.img is a symbolic link"):
        nlm_locks.mark_in_images(images, [nlm_locks.OfdLock(pid=1007, nspid=7, fd=4)])
