"""The manager opens a container's path with the container's root as '/' (issue 12): a symlink
the container planted on the way resolves in its own tree, and the object must be on the
device the manager expects (SPFS's), else ESTALE."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from spfs.manager.swapper import container_path
from tests.sys.chrooted import chrooted_process


@pytest.fixture
def chrooted(tmp_path: Path):
    """A process whose root is tmp_path/root, where /mnt/share -> /etc (a symlink)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "marker").write_text("the container's /etc")
    (root / "mnt").mkdir()
    (root / "mnt" / "share").symlink_to("/etc")
    with chrooted_process(root) as pid:
        yield pid, root


def test_a_symlink_in_the_container_resolves_in_its_root(chrooted) -> None:
    pid, root = chrooted
    with container_path(pid, "/mnt/share") as path:
        assert path.startswith(f"/proc/{os.getpid()}/fd/")
        assert (Path(path) / "marker").read_text() == "the container's /etc"
        assert os.stat(path).st_ino == os.stat(root / "etc").st_ino


def test_an_object_on_another_device_is_refused(chrooted) -> None:
    pid, root = chrooted
    wrong = os.stat(root).st_dev + 1
    with pytest.raises(OSError) as caught:
        with container_path(pid, "/mnt/share", expect_dev=wrong):
            pass
    assert caught.value.errno == errno.ESTALE and "no longer SPFS" in str(caught.value)
