"""Fixtures that run the real `spfs` daemon on real FUSE mounts."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from spfs_testlib import SpfsMount, is_mounted, start_spfs


@pytest.fixture
def tmp() -> Iterator[Path]:
    # Not pytest's tmp_path: non-root test users must be able to traverse to the mount.
    path = Path(tempfile.mkdtemp(prefix="spfs-test-"))
    path.chmod(0o755)
    (path / "target").mkdir()
    (path / "target").chmod(0o777)
    try:
        yield path
    finally:
        for sub in path.iterdir():
            if is_mounted(sub):
                subprocess.run(["umount", "-l", str(sub)], check=False)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spfs_factory(tmp: Path) -> Iterator[Callable[..., SpfsMount]]:
    mounts: list[SpfsMount] = []

    def factory(mode: str, *extra: str, mountpoint: Path | None = None,
                wait_ready: bool = True) -> SpfsMount:
        mount = start_spfs(mountpoint or tmp / "mnt", mode, tmp, *extra, wait_ready=wait_ready)
        mounts.append(mount)
        return mount

    yield factory
    for mount in mounts:
        mount.stop()


@pytest.fixture
def proxy(spfs_factory: Callable[..., SpfsMount], tmp: Path) -> SpfsMount:
    return spfs_factory("proxy", "--proxy-dir", str(tmp / "target"))


