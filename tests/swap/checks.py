"""Assertions shared by the swap tests: what each victim must see after a switch."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path


def check_report(report: dict[str, str], b: Path) -> None:
    assert report["append"] == "1"
    assert report["nonblock"] == "1"
    assert report["cloexec_sh"] == "1" and report["cloexec_dup"] == "0"
    assert report["pos_equal"] == "1"
    assert report["errors_read"] == "0", "the reader lost its offset"
    assert report["errors_fifo"] == "0"
    assert report["epoll_miss"] == "0", "epoll registration lost"
    assert report["epoll_eintr"] == "0" and report["thread_eintr"] == "0", "spurious EINTR"
    assert report["preload"] == "PRELOAD", "FIFO content lost"
    assert report["cwd"] == str(b)
    assert int(report["cwd_dev"]) == os.stat(b).st_dev
    assert int(report["log_dev"]) == os.stat(b).st_dev


def check_log(path: Path, iterations: int) -> None:
    lines = path.read_text().split()
    assert [int(x) for x in lines] == list(range(iterations)), "gap or duplicate in the O_APPEND log"


def check_records(path: Path, tag: str, count: int) -> None:
    data = path.read_bytes()
    records = [data[i:i + 16] for i in range(0, len(data), 16)]
    mine = [int(r[1:15]) for r in records if r[:1] == tag.encode()]
    assert mine == list(range(count)), f"records {tag}: lost or overwritten"


def assert_locks_held_by(pid: int, b: Path) -> None:
    """A competitor (this process) cannot take any of the three locks on B."""
    with open(b / "lock.txt", "r+b") as f:
        probe = struct.pack("<hhxxxxqqixxxx", fcntl.F_WRLCK, 0, 0, 0, 0)
        res = struct.unpack("<hhxxxxqqixxxx", fcntl.fcntl(f, fcntl.F_GETLK, probe))
        assert res[0] == fcntl.F_WRLCK and res[4] == pid, "POSIX lock not held on B"
    with open(b / "flock.txt", "r+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            raise AssertionError("flock not held on B")
    with open(b / "ofd.txt", "r+b") as f:
        probe = struct.pack("<hhxxxxqqixxxx", fcntl.F_WRLCK, 0, 0, 10, 0)
        res = struct.unpack("<hhxxxxqqixxxx", fcntl.fcntl(f, 36, probe))  # F_OFD_GETLK
        assert res[0] == fcntl.F_WRLCK, "OFD lock not held on B"
