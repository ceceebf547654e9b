"""criu-spfs dump of a container whose earlier replace is pending: it waits, bounded, while
SPFS is mounted in the namespace (a real SPFS mount here, in this test's own namespace)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from spfs.criu.pending import PendingReplace, spfs_mounts, wait_for_replaces
from tests.fs.spfs_testlib import start_spfs


@pytest.fixture
def spfs_mount(tmp_path: Path):
    mount = start_spfs(tmp_path / "mnt", "stub", tmp_path)
    try:
        yield mount.mountpoint
    finally:
        mount.stop()


def test_no_spfs_mount_means_no_wait() -> None:
    assert wait_for_replaces(os.getpid(), deadline_s=5) < 1


def test_waits_until_the_replace_took_spfs_away(spfs_mount: Path) -> None:
    assert str(spfs_mount) in spfs_mounts(os.getpid())
    timer = threading.Timer(0.6, subprocess.run, (["umount", "-l", str(spfs_mount)],))
    timer.start()
    try:
        waited = wait_for_replaces(os.getpid(), deadline_s=20, poll_s=0.05)
    finally:
        timer.join()
    assert 0.5 <= waited < 10


def test_a_replace_pending_too_long_is_a_clear_error(spfs_mount: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(PendingReplace, match=str(spfs_mount)):
        wait_for_replaces(os.getpid(), deadline_s=0.5, poll_s=0.05)
    assert time.monotonic() - t0 < 5
