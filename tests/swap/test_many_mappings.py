"""10,240 mappings of one file need a few fds, not 10,240 (issue 17 item 1): the manager
and the task keep one fd per distinct file, and both run here with RLIMIT_NOFILE 1024."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import time
from pathlib import Path

import pytest

from spfs import swap

PAGE = 4096
SHARED, PRIVATE = 10240, 64
FINAL = 0x46494E414C


@pytest.fixture
def fd_limit_1024():
    """This process plays the manager: its soft limit is 1024 for the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _write_pages(path: Path, count: int) -> None:
    """Page k holds k in its first word."""
    with open(path, "wb") as f:
        for k in range(count):
            f.write(struct.pack("<q", k).ljust(PAGE, b"\0"))


def _soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no fd limit in /proc/PID/limits")


def _file_vmas(pid: int, path: Path) -> list[tuple[str, int, int]]:
    """(perms, dev, inode) of each VMA of `path`."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5] == str(path):
            major, minor = (int(x, 16) for x in fields[3].split(":"))
            out.append((fields[1], os.makedev(major, minor), int(fields[4])))
    return out


def test_ten_thousand_shared_mappings_of_one_file(mounts, many_maps_bin, fd_limit_1024):
    _write_pages(mounts.a / "many.map", SHARED)
    _write_pages(mounts.a / "private.map", PRIVATE)
    proc = mounts.spawn(many_maps_bin, str(SHARED), str(PRIVATE))
    mounts.wait_ready(1)
    mounts.wait_iterations()
    assert _soft_fd_limit(proc.pid) == 1024
    assert len(_file_vmas(proc.pid, mounts.a / "many.map")) == SHARED  # none merged
    mounts.mirror()

    started = time.perf_counter()
    plan = swap.discover(str(mounts.a), str(mounts.b), pids=[proc.pid])
    discovered = time.perf_counter()
    swap.prepare(plan)
    prepared = time.perf_counter()
    report = swap.commit(plan)
    done = time.perf_counter()
    assert report.ok, report.error
    assert report.mappings_moved == SHARED + PRIVATE
    print(f"\n{SHARED + PRIVATE} mappings: discover {discovered - started:.2f} s, prepare "
          f"{prepared - discovered:.2f} s, commit {done - prepared:.2f} s (stop window "
          f"{report.stop_window_s * 1e3:.0f} ms), total {done - started:.2f} s; commit steps (s): "
          f"{ {k: round(v, 3) for k, v in report.timings.items()} }")

    assert subprocess.run(["umount", str(mounts.a)]).returncode == 0, "A still busy after the switch"
    for name, count in (("many.map", SHARED), ("private.map", PRIVATE)):
        st = os.stat(mounts.b / name)
        vmas = _file_vmas(proc.pid, mounts.b / name)
        assert len(vmas) == count
        assert {(dev, ino) for _, dev, ino in vmas} == {(st.st_dev, st.st_ino)}, f"a mapping of {name} not on B"
    assert sum(perms.endswith("s") for perms, _, _ in _file_vmas(proc.pid, mounts.b / "many.map")) == SHARED

    mounts.wait_iterations()  # it writes every shared page and checks every private one, on B
    mounts.stop_victims(timeout=60)
    report_file = mounts.reports()[proc.pid]
    assert report_file["errors_shared"] == "0" and report_file["errors_private"] == "0", report_file
    assert proc.returncode == 0
    data = (mounts.b / "many.map").read_bytes()
    last = int(report_file["iterations"]) - 1
    for k in range(SHARED):  # what it wrote through each mapping is in B's file
        word0, word1, word2 = struct.unpack_from("<qqq", data, k * PAGE)
        assert (word0, word1, word2) == (k, last, FINAL), f"page {k} of B's file"
