"""A hostile image dir (issue 12 item 3): an image that is a FIFO, a symlink or a device, or
images adding up to too many bytes, is refused at once with an error naming the file, and
criu-spfs restore refuses the directory before it starts CRIU, spfs-manager or any mount.

Real kernel objects throughout: a real FIFO (with no writer: a plain open() of it would
block forever), a real character device node (1:3, what /dev/null is), real symlinks, and
real CRIU images written by pycriu."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Callable

import pycriu
import pytest

from spfs.criu.images import ImageError, ImageLimits, check_image_dir, load_images
from spfs.criu.record import RecordError, load_record
from spfs.criu.restore import RestoreConfig, RestoreError, restore

FAST = 5.0        # a refusal takes milliseconds; this is the bound asserted
PATIENCE = 60.0   # how long the test waits before it calls the reader blocked


def _image(path: Path, magic: str, entries: list[dict]) -> None:
    with open(path, "wb") as f:
        pycriu.images.dump({"magic": magic, "entries": entries}, f)


def _files_entries() -> list[dict]:
    fown = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}
    return [{"type": "REG", "id": 3, "reg": {"id": 3, "flags": 0, "pos": 0, "fown": fown,
                                              "name": "/mnt/nfs/a", "mnt_id": 5,
                                              "mode": 0o100644, "size": 3}}]


def _image_dir(d: Path) -> Path:
    """The smallest image dir load_images accepts: one task, one fd on a file of one mount."""
    d.mkdir()
    _image(d / "inventory.img", "INVENTORY", [{"img_version": 2}])
    _image(d / "pstree.img", "PSTREE", [{"pid": 1, "ppid": 0, "pgid": 1, "sid": 1}])
    _image(d / "ids-1.img", "IDS", [{"files_id": 7, "vm_id": 1, "fs_id": 1, "sighand_id": 1}])
    _image(d / "fdinfo-7.img", "FDINFO", [{"id": 3, "flags": 0, "type": "REG", "fd": 4}])
    _image(d / "files.img", "FILES", _files_entries())
    _image(d / "mountpoints-1.img", "MNTS", [{
        "fstype": 1, "mnt_id": 5, "root_dev": 42, "parent_mnt_id": 1, "flags": 0, "root": "/",
        "mountpoint": "/mnt/nfs", "source": "srv:/x", "options": ""}])
    return d


def _refused_fast(work: Callable[[], object]) -> BaseException:
    """What *work* raised, asserting it ended well within FAST seconds (waited for in a
    thread with a bound, so a reader that blocks fails the test instead of hanging it)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            work()
            outcome.append(None)
        except BaseException as e:  # handed to the test
            outcome.append(e)

    t0 = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(PATIENCE)
    took = time.monotonic() - t0
    assert not thread.is_alive(), f"still blocked after {PATIENCE:.0f} s"
    assert took < FAST, f"took {took:.1f} s"
    assert outcome[0] is not None, "accepted"
    return outcome[0]


def _fifo_files_img(tmp_path: Path) -> Path:
    d = _image_dir(tmp_path / "img")
    (d / "files.img").unlink()
    os.mkfifo(d / "files.img")  # nobody ever opens the write end
    return d


def test_the_minimal_image_dir_loads(tmp_path: Path) -> None:
    d = _image_dir(tmp_path / "img")
    check_image_dir(d)
    images = load_images(d)
    assert images.files[3].name == "/mnt/nfs/a" and images.fd_tables == {1: [(4, 3)]}


def test_a_fifo_named_files_img_is_refused_at_once(tmp_path: Path) -> None:
    d = _fifo_files_img(tmp_path)
    for work in (lambda: load_images(d), lambda: check_image_dir(d)):
        error = _refused_fast(work)
        assert isinstance(error, ImageError)
        assert "files.img" in str(error) and "FIFO" in str(error)


def test_a_symlink_to_an_image_outside_is_not_followed(tmp_path: Path) -> None:
    d = _image_dir(tmp_path / "img")
    outside = tmp_path / "outside.img"
    _image(outside, "FILES", _files_entries())  # a valid image: followed, it would load
    (d / "files.img").unlink()
    (d / "files.img").symlink_to(outside)
    for work in (lambda: load_images(d), lambda: check_image_dir(d)):
        with pytest.raises(ImageError, match="files.img.*symbolic link"):
            work()


def test_a_device_image_is_refused_without_opening_it(tmp_path: Path) -> None:
    d = _image_dir(tmp_path / "img")
    (d / "files.img").unlink()
    os.mknod(d / "files.img", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    for work in (lambda: load_images(d), lambda: check_image_dir(d)):
        with pytest.raises(ImageError, match="files.img.*character device"):
            work()


def test_images_over_the_total_cap_are_refused(tmp_path: Path) -> None:
    d = _image_dir(tmp_path / "img")
    # every image is well under the per-file cap; together they are one byte too many
    read = sum(p.stat().st_size for p in d.glob("*.img") if p.name != "inventory.img")
    load_images(d, ImageLimits(total_bytes=read))
    with pytest.raises(ImageError, match=f"add up to more than {read - 1} bytes"):
        load_images(d, ImageLimits(total_bytes=read - 1))


def test_an_image_over_the_per_file_cap_is_refused(tmp_path: Path) -> None:
    d = _image_dir(tmp_path / "img")
    size = (d / "files.img").stat().st_size
    with pytest.raises(ImageError, match=f"files.img: larger than {size - 1} bytes"):
        load_images(d, ImageLimits(file_bytes=size - 1))


def test_a_symlinked_or_nested_log_dir_is_refused(tmp_path: Path) -> None:
    d = _image_dir(tmp_path / "img")
    logs = d / "spfs-manager"
    logs.mkdir()
    (logs / "spfs-manager.log").write_text("a log\n")
    check_image_dir(d)  # criu-spfs's own log dir, with regular files in it, is fine
    (logs / "spfs-x.log").symlink_to("/etc/passwd")
    with pytest.raises(ImageError, match="spfs-manager/spfs-x.log: a symbolic link"):
        check_image_dir(d)


def test_a_fifo_record_is_refused_at_once(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "criu-spfs.json")
    error = _refused_fast(lambda: load_record(tmp_path))
    assert isinstance(error, RecordError) and "criu-spfs.json is a FIFO" in str(error)


def test_restore_refuses_the_dir_before_starting_anything(tmp_path: Path) -> None:
    d = _fifo_files_img(tmp_path)
    marker = tmp_path / "criu-ran"
    criu = tmp_path / "criu"
    criu.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    criu.chmod(0o755)
    work = tmp_path / "work"
    config = RestoreConfig(d, criu=str(criu), work_dir=work)
    mounts_before = Path("/proc/self/mountinfo").read_text()
    error = _refused_fast(lambda: restore(config))
    assert isinstance(error, RestoreError)
    assert "refusing the image directory" in str(error) and "files.img" in str(error)
    assert not marker.exists(), "CRIU was started"
    assert not work.exists(), "the work dir (and the manager's socket dir in it) was made"
    assert Path("/proc/self/mountinfo").read_text() == mounts_before
    assert not (d / "spfs-manager").exists(), "spfs-manager was started"
