"""spfs.sys.beneath: a share's objects are reached below its root only (issue 12). Real
files, symlinks, mounts and a chrooted process; each refusal is the kernel's own answer."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from spfs.sys.beneath import Seen, Share, ShareChanged, component, open_in_root, relative
from tests.sys.chrooted import chrooted_process


@pytest.fixture
def share(tmp_path: Path):
    root = tmp_path / "share"
    (root / "dir").mkdir(parents=True)
    (root / "dir" / "file").write_text("inside")
    outside = tmp_path / "host"
    outside.mkdir()
    (outside / "file").write_text("outside")
    (root / "up").symlink_to(outside)
    (root / "rel").symlink_to("../host")
    s = Share.open(str(root), "test share")
    yield s, root, outside
    s.close()


def test_a_plain_name_opens_on_the_share(share) -> None:
    s, root, _ = share
    fd = s.open_at("dir/file", os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"inside"
    finally:
        os.close(fd)


@pytest.mark.parametrize("rel", ["up/file", "rel/file"])
def test_a_symlink_on_the_way_leads_nowhere(share, rel: str) -> None:
    s, _, _ = share
    with pytest.raises(ShareChanged, match="leads off the share"):
        s.open_at(rel, os.O_RDONLY)


@pytest.mark.parametrize("rel", ["../host/file", "/etc/passwd", "dir/../dir/file", "dir//file", "./dir"])
def test_names_that_are_not_plain_relative_paths_are_refused(share, rel: str) -> None:
    s, _, _ = share
    with pytest.raises(ShareChanged, match="not a relative path"):
        s.open_at(rel, os.O_RDONLY)


def test_a_symlink_itself_is_held_not_followed(share) -> None:
    s, root, _ = share
    fd = s.hold("up")
    try:
        assert stat.S_ISLNK(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
    fd = s.open_kind("up", 0, stat.S_IFLNK)
    os.close(fd)
    with pytest.raises(ShareChanged, match="leads off the share"):  # a final symlink is no directory
        s.open_kind("up", os.O_PATH, stat.S_IFDIR)


def test_another_mount_on_the_way_is_refused(share, tmp_path: Path) -> None:
    s, root, outside = share
    subprocess.run(["mount", "--bind", str(outside), str(root / "dir")], check=True)
    try:
        with pytest.raises(ShareChanged, match="leads off the share"):
            s.open_at("dir/file", os.O_RDONLY)
    finally:
        subprocess.run(["umount", str(root / "dir")], check=True)


def test_check_seen_tells_a_replaced_object(share) -> None:
    s, root, _ = share
    st = os.stat(root / "dir" / "file")
    os.close(s.check_seen("dir/file", Seen(st.st_dev, st.st_ino, st.st_mode), "file"))
    (root / "dir" / "file").rename(root / "dir" / "old")
    (root / "dir" / "file").write_text("a decoy")
    with pytest.raises(ShareChanged, match="no longer the regular file it was at discovery"):
        s.check_seen("dir/file", Seen(st.st_dev, st.st_ino, st.st_mode), "file")


def _staged_replacement(s, root: Path, rel: str):
    stage = s.stage(rel, kinds=(stat.S_IFREG,))
    with open(os.open(stage.name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=stage.stage_fd), "w") as f:
        f.write("new")
    return stage


def _hidden(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "dir").iterdir() if ".spfs-" in p.name)


def test_a_staged_replacement_takes_the_name_without_a_gap_and_is_kept(share) -> None:
    s, root, _ = share
    stage = _staged_replacement(s, root, "dir/file")
    assert (root / "dir" / "file").read_text() != "new"  # not before place()
    before = os.stat(root / "dir" / "file").st_ino
    stage.place()
    assert (root / "dir" / "file").read_text() == "new"
    kept = [n for n in _hidden(root) if ".spfs-old-" in n]
    assert len(kept) == 1 and os.stat(root / "dir" / kept[0]).st_ino == before
    stage.settle(keep_new=True)
    assert (root / "dir" / "file").read_text() == "new" and _hidden(root) == []


def test_a_placed_replacement_given_up_gives_the_old_object_its_name_back(share) -> None:
    s, root, _ = share
    before = os.stat(root / "dir" / "file").st_ino
    stage = _staged_replacement(s, root, "dir/file")
    stage.place()
    stage.settle(keep_new=False)
    assert os.stat(root / "dir" / "file").st_ino == before and _hidden(root) == []


def test_a_replacement_never_placed_leaves_nothing(share) -> None:
    s, root, _ = share
    before = os.stat(root / "dir" / "file").st_ino
    _staged_replacement(s, root, "dir/file").settle(keep_new=False)
    assert os.stat(root / "dir" / "file").st_ino == before and _hidden(root) == []
    # a name that did not exist: placed, then given up, it is gone again
    stage = _staged_replacement(s, root, "dir/none")
    stage.place()
    assert (root / "dir" / "none").read_text() == "new"
    stage.settle(keep_new=False)
    assert not (root / "dir" / "none").exists() and _hidden(root) == []


def test_a_staged_replacement_refuses_another_kind_at_the_name_or_a_swapped_replacement(share) -> None:
    s, root, _ = share
    stage = s.stage("up", kinds=(stat.S_IFREG,))
    os.close(os.open(stage.name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=stage.stage_fd))
    with pytest.raises(ShareChanged, match="not replaced"):
        stage.place()  # "up" is a symlink leading off the share
    stage.settle(keep_new=False)
    assert (root / "up").is_symlink()
    stage = _staged_replacement(s, root, "dir/file")
    first = stage.hold_made()  # held open: the swapped-in file cannot reuse its inode
    os.unlink(stage.name, dir_fd=stage.stage_fd)
    os.close(os.open(stage.name, os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=stage.stage_fd))
    with pytest.raises(ShareChanged, match="replaced in its staging directory"):
        stage.place()
    os.close(first)
    stage.settle(keep_new=False)
    assert (root / "dir" / "file").read_text() != "new" and _hidden(root) == []


def test_unlink_removes_the_name_only(share) -> None:
    s, root, outside = share
    assert s.unlink("up", kinds=(stat.S_IFREG, stat.S_IFLNK))
    assert not (root / "up").exists() and (outside / "file").read_text() == "outside"
    with pytest.raises(ShareChanged, match="leads off the share"):
        s.unlink("rel/file")
    assert (outside / "file").exists()


def test_component_refuses_paths() -> None:
    assert component("link_remap.3") == "link_remap.3"
    for bad in ("", ".", "..", "a/b", "x\0y"):
        with pytest.raises(ShareChanged):
            component(bad)
    assert relative("") == "" and relative("a/b") == "a/b"


def test_open_in_root_resolves_absolute_symlinks_in_the_process_root(tmp_path: Path) -> None:
    """A chrooted process's /link -> /etc is its own /etc, never ours."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "marker").write_text("the process's own /etc")
    (root / "link").symlink_to("/etc")
    with chrooted_process(root) as pid:
        fd = open_in_root(pid, "/link/marker", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert os.read(fd, 100) == b"the process's own /etc"
        finally:
            os.close(fd)
        with pytest.raises(FileNotFoundError):
            open_in_root(pid, "/link/passwd", os.O_RDONLY | os.O_CLOEXEC)  # ours has one
