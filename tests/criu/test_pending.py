"""criu-spfs dump of a container whose earlier replace is pending: it waits, bounded, while
SPFS is mounted in the namespace. A real SPFS mount, looked at from a mount namespace of the
test's own (a copy of ours without any other SPFS: tests running beside this one on the
same host have theirs)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from spfs.criu.pending import PendingReplace, spfs_mounts, wait_for_replaces
from tests.fs.spfs_testlib import start_spfs

# in a private copy of our mount namespace: lazily unmount every SPFS but the one kept
ONLY_MINE = """
import subprocess, sys
from spfs.sys.mountinfo import read_mountinfo
keep = sys.argv[1:]
for m in read_mountinfo():
    if m.fstype == "fuse.spfs" and m.mountpoint not in keep:
        subprocess.run(["umount", "-l", m.mountpoint], check=True)
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def namespace() -> Iterator[Callable[..., int]]:
    """namespace(*keep): the pid of a process in a namespace of its own whose SPFS mounts
    are only `keep`."""
    procs: list[subprocess.Popen[str]] = []

    def make(*keep: str) -> int:
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", sys.executable,
                                 "-c", ONLY_MINE, *keep], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc.pid

    yield make
    for proc in procs:
        proc.kill()
        proc.wait(30)


@pytest.fixture
def spfs_mount(tmp_path: Path):
    mount = start_spfs(tmp_path / "mnt", "stub", tmp_path)
    try:
        yield mount.mountpoint
    finally:
        mount.stop()


def test_no_spfs_mount_means_no_wait(namespace) -> None:
    pid = namespace()
    waited = wait_for_replaces(pid, deadline_s=5)
    assert waited < 5  # it returned on its own, not at the deadline
    print(f"returned after {waited:.2f} s")


def test_waits_until_the_replace_took_spfs_away(spfs_mount: Path, namespace) -> None:
    pid = namespace(str(spfs_mount))
    assert spfs_mounts(pid) == [str(spfs_mount)]
    umounted = threading.Event()

    def replace() -> None:
        subprocess.run(["nsenter", "-t", str(pid), "-m", "umount", "-l", str(spfs_mount)],
                       check=True, timeout=30)
        umounted.set()
    timer = threading.Timer(0.6, replace)
    timer.start()
    try:
        waited = wait_for_replaces(pid, deadline_s=60, poll_s=0.05)
    finally:
        timer.join()
    assert umounted.is_set()  # it returned because the mount went, not before
    assert waited >= 0.5
    print(f"returned after {waited:.2f} s (umount at 0.6 s)")


def test_a_replace_pending_too_long_is_a_clear_error(spfs_mount: Path, namespace) -> None:
    pid = namespace(str(spfs_mount))
    t0 = time.monotonic()
    with pytest.raises(PendingReplace, match=str(spfs_mount)):
        wait_for_replaces(pid, deadline_s=0.5, poll_s=0.05)
    took = time.monotonic() - t0
    assert took < 30, f"the error came after {took:.1f} s (deadline 0.5 s)"
