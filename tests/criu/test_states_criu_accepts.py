"""Image dirs of states plain CRIU dumps and restores (found by CRIU's zdtm tests on NFS,
issue 17), which our checks must accept, with what CRIU needs to find on the share in the
restore-mode tree."""

from __future__ import annotations

import quopri
import stat
from pathlib import Path

import pycriu

from spfs.criu.images import ImageSet, MountRecord, RegFile, load_images
from spfs.criu.stubtree import SYMLINK_PLACEHOLDER, build_manifest

DEV = 42


def _image(path: Path, magic: str, entries: list[dict]) -> None:
    with open(path, "wb") as f:
        pycriu.images.dump({"magic": magic, "entries": entries}, f)


def _base(d: Path, tasks: list[int]) -> Path:
    d.mkdir()
    _image(d / "inventory.img", "INVENTORY", [{"img_version": 2}])
    _image(d / "pstree.img", "PSTREE", [{"pid": p, "ppid": 0 if p == tasks[0] else tasks[0],
                                         "pgid": tasks[0], "sid": tasks[0]} for p in tasks])
    _image(d / "files.img", "FILES", [])
    _image(d / "mountpoints-1.img", "MNTS", [{
        "fstype": 1, "mnt_id": 5, "root_dev": DEV, "parent_mnt_id": 1, "flags": 0, "root": "/",
        "mountpoint": "/mnt/nfs", "source": "srv:/x", "options": ""}])
    return d


def _ids(d: Path, pid: int, files_id: int) -> None:
    _image(d / f"ids-{pid}.img", "IDS", [{"files_id": files_id, "vm_id": pid, "fs_id": pid,
                                          "sighand_id": pid}])


def test_a_task_that_closed_every_descriptor_has_no_fdinfo_and_an_empty_table(tmp_path) -> None:
    d = _base(tmp_path / "img", [1])
    _ids(d, 1, 7)  # and no fdinfo-7.img: CRIU writes none for an empty table
    assert load_images(d).fd_tables == {1: []}


def test_a_zombie_has_only_its_core(tmp_path) -> None:
    d = _base(tmp_path / "img", [1, 2])
    _ids(d, 1, 7)
    _image(d / "fdinfo-7.img", "FDINFO", [])
    _image(d / "core-2.img", "CORE", [{"mtype": "X86_64", "tc": {
        "task_state": 2, "exit_code": 0, "personality": 0, "flags": 0, "blk_sigset": 0,
        "comm": "zombie"}}])
    assert load_images(d).fd_tables == {1: []}


def test_a_live_task_without_ids_is_still_refused(tmp_path) -> None:
    d = _base(tmp_path / "img", [1])
    _image(d / "core-1.img", "CORE", [{"mtype": "X86_64", "tc": {
        "task_state": 1, "exit_code": 0, "personality": 0, "flags": 0, "blk_sigset": 0,
        "comm": "alive"}}])
    try:
        load_images(d)
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        assert "ids-1.img: missing" in str(e)
    else:
        raise AssertionError("a live task without ids-1.img was accepted")


def _share(*files: RegFile, mounts: tuple[MountRecord, ...] = ()) -> ImageSet:
    images = ImageSet(mounts={5: MountRecord(5, DEV, "/", "/mnt/nfs", "srv:/x", "", "nfs0")})
    for m in mounts:
        images.mounts[m.mnt_id] = m
    for f in files:
        images.files[f.id] = f
    return images


def test_an_o_path_symlink_gets_a_symlink_with_a_placeholder_target() -> None:
    link = RegFile(3, "/mnt/nfs/dir/link", 5, 0o10000000 | 0o400000, stat.S_IFLNK | 0o777, None)
    manifest = build_manifest(_share(link), DEV)
    entry = next(e for e in manifest.entries if e.path == "dir/link")
    assert (entry.type, entry.target) == ("symlink", SYMLINK_PLACEHOLDER)


def test_a_mount_on_a_directory_of_the_share_has_its_mountpoint_in_the_tree() -> None:
    data = RegFile(3, "/mnt/nfs/data", 5, 0, stat.S_IFREG | 0o644, 3)
    tmpfs = MountRecord(9, 77, "/", "/mnt/nfs/sub/tmp", "tmpfs", "", None)
    on_tmpfs = MountRecord(10, 78, "/", "/mnt/nfs/sub/tmp/deeper", "tmpfs", "", None)
    outside = MountRecord(11, 79, "/", "/mnt/other", "tmpfs", "", None)
    manifest = build_manifest(_share(data, mounts=(tmpfs, on_tmpfs, outside)), DEV)
    by_path = {e.path: e for e in manifest.entries}
    assert by_path["sub/tmp"].type == "dir"
    # on the tmpfs, not on the share; and nothing of the other mount
    assert "sub/tmp/deeper" not in by_path and not any("other" in p for p in by_path)


def test_a_bind_of_a_sub_directory_places_nested_mountpoints_below_its_root() -> None:
    bind = MountRecord(6, DEV, "/export/sub", "/srv", "srv:/x", "", "nfs1")
    nested = MountRecord(12, 80, "/", "/srv/cache", "tmpfs", "", None)
    manifest = build_manifest(_share(mounts=(bind, nested)), DEV)
    assert {e.path for e in manifest.entries} >= {"export/sub/cache"}


def _unix_socket(sid: int, name: bytes, mnt_id: int) -> dict:
    fown = {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0, "pid": 0}
    opts = {"so_sndbuf": 212992, "so_rcvbuf": 212992, "so_snd_tmo_sec": 0, "so_snd_tmo_usec": 0,
            "so_rcv_tmo_sec": 0, "so_rcv_tmo_usec": 0}
    # pycriu takes a unix address quoted-printable, as it gives it
    usk = {"id": sid, "ino": 1000 + sid, "type": 1, "state": 10, "flags": 2, "uflags": 0,
           "backlog": 8, "peer": 0, "fown": fown, "opts": opts,
           "name": quopri.encodestring(name).decode(), "ns_id": 10, "mnt_id": mnt_id,
           "file_perms": {"mode": 0o140755, "uid": 0, "gid": 0}}
    return {"type": "UNIXSK", "id": sid, "usk": usk}


def test_a_directory_holding_only_sockets_is_in_the_tree(tmp_path) -> None:
    """CRIU binds the sockets again at restore, in restore mode, and needs their directory."""
    d = _base(tmp_path / "img", [1])
    _ids(d, 1, 7)
    _image(d / "fdinfo-7.img", "FDINFO", [{"id": 3, "flags": 0, "type": "UNIXSK", "fd": 4},
                                          {"id": 4, "flags": 0, "type": "UNIXSK", "fd": 5}])
    _image(d / "files.img", "FILES", [_unix_socket(3, b"/mnt/nfs/run/sub/app.sock\0", 5),
                                      _unix_socket(4, b"/tmp/elsewhere.sock\0", 1)])
    images = load_images(d)
    assert images.socket_names == [(5, "/mnt/nfs/run/sub/app.sock"), (1, "/tmp/elsewhere.sock")]
    manifest = build_manifest(images, DEV)
    assert [(e.path, e.type) for e in manifest.entries] == [("run/sub", "dir")]
