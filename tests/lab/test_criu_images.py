"""criu-spfs groundwork (issue 6): from a real CRIU dump of a lab container to the SPFS
manifest of its NFS superblock, checked against the server's own files; hostile images
(names escaping the mount, absurd sizes) are rejected."""

import os
import shutil
import stat
from pathlib import Path

import pycriu
import pytest

from spfs.criu.images import ImageError, load_images
from spfs.criu.stubtree import build_manifest
from spfs.fs.manifest import ManifestError
from spfs.lab.ct import checkpoint
from spfs.lab.ct.container import exec_in
from spfs.lab.ct.util import wait_for
from spfs.lab.env import shares
from spfs.lab.paths import LabPaths


@pytest.fixture(scope="module")
def dumped(tmp_path_factory, request):
    """One container with every kind of NFS reference, dumped once for the module."""
    from spfs.lab.ct import container, workload
    from spfs.lab.ct.spec import BindMount, NfsMount
    server = Path(shares()["a"].server_dir) / "imgtest"
    server.mkdir()
    shutil.copy2(LabPaths.default().bin_dir / "nfsload", server / "exe-on-nfs")
    (server / "sub").mkdir(mode=0o750)
    os.mkfifo(server / "fifo", 0o640)
    ct = container.create("imgs", [NfsMount.parse("4.1:a:/mnt/nfs")],
                          [BindMount.parse("ct:/mnt/nfs:/srv")], "v2")
    try:
        loads = [workload.start("imgs", "append", "/mnt/nfs/imgtest/w.log"),
                 workload.start("imgs", "mmap", "/srv/imgtest/m.dat"),
                 workload.start("imgs", "posix", "/mnt/nfs/imgtest/l.dat")]
        exec_in("imgs", ["/mnt/nfs/imgtest/exe-on-nfs", "cwd", "/mnt/nfs/imgtest/sub", "/tmp/r"],
                detach=True, timeout=30)
        exec_in("imgs", ["sh", "-c", "exec 5<>/mnt/nfs/imgtest/fifo; echo data >&5; "
                         "exec sleep 1000"], detach=True, timeout=30)
        exec_in("imgs", ["sh", "-c", "exec 6>/mnt/nfs/imgtest/gone; echo xy >&6; "
                         "rm /mnt/nfs/imgtest/gone; exec sleep 1000"], detach=True, timeout=30)
        workload.wait_running(loads)
        wait_for("every detached program to hold its file", lambda: _all_in_place(server), 60)
        images = tmp_path_factory.mktemp("img")
        checkpoint.suspend(ct, images, plain=True)
        yield images, server
    finally:
        container.destroy("imgs", missing_ok=True)
        shutil.rmtree(server, ignore_errors=True)


def _held_inodes() -> set[int]:
    """Inode numbers of what every process's exe, cwd and fds lead to (an NFS file's inode
    number is the server's: the test compares them with the server's own files)."""
    found: set[int] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        for link in ("exe", "cwd", *(f"fd/{fd}" for fd in _listdir(f"/proc/{pid}/fd"))):
            try:
                found.add(os.stat(f"/proc/{pid}/{link}").st_ino)
            except OSError:
                pass
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _all_in_place(server: Path) -> bool:
    """exe-on-nfs running with its cwd in sub/, the FIFO held, and the removed file held
    open (NFS renamed it to .nfsXXXX on the server)."""
    held = _held_inodes()
    wanted = [server / "exe-on-nfs", server / "sub", server / "fifo"]
    try:
        silly = [p for p in server.iterdir() if p.name.startswith(".nfs")]
        return (all(p.stat().st_ino in held for p in wanted) and not (server / "gone").exists()
                and any(p.stat().st_ino in held for p in silly))
    except FileNotFoundError:  # a file between two looks: look again
        return False


def _nfs_dev(images) -> int:
    return next(m.root_dev for m in images.mounts.values() if m.ext_key == "nfs0")


def test_manifest_matches_the_server(dumped) -> None:
    image_dir, server = dumped
    images = load_images(image_dir)
    manifest = build_manifest(images, _nfs_dev(images))
    by_path = {e.path: e for e in manifest.entries}
    root = Path(shares()["a"].server_dir)
    expected = {"imgtest/w.log", "imgtest/m.dat", "imgtest/l.dat", "imgtest/exe-on-nfs",
                "imgtest/sub", "imgtest/fifo"}
    assert expected <= set(by_path), sorted(by_path)
    for path in expected:
        st = os.stat(root / path)
        entry = by_path[path]
        assert entry.mode == stat.S_IMODE(st.st_mode), path
        assert entry.file_type == stat.S_IFMT(st.st_mode), path
        if path != "imgtest/w.log":  # O_WRONLY|O_APPEND: CRIU records no size
            assert entry.size == (st.st_size if stat.S_ISREG(st.st_mode) else 0), path
    # the unlinked file is there under its link_remap name (made on the server by CRIU),
    # not under its silly-rename name
    remaps = [p for p in by_path if os.path.basename(p).startswith("link_remap.")]
    assert len(remaps) == 1 and by_path[remaps[0]].size == 3
    assert os.path.exists(root / remaps[0])
    assert not any(os.path.basename(p).startswith(".nfs") for p in by_path)


def _rewrite_files(image_dir: Path, tmp_path: Path, change) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(image_dir, bad)
    with open(bad / "files.img", "rb") as f:
        data = pycriu.images.load(f)
    target = next(e["reg"] for e in data["entries"]
                  if e.get("type") == "REG" and e["reg"]["name"].endswith("/l.dat"))
    change(target)
    with open(bad / "files.img", "wb") as f:
        pycriu.images.dump(data, f)
    return bad


@pytest.mark.parametrize("change, error", [
    (lambda r: r.update(name="/mnt/nfs/../../etc/shadow"), ImageError),
    (lambda r: r.update(name="relative/name"), ImageError),
    (lambda r: r.update(size=1 << 62), ManifestError),
    (lambda r: r.update(mode=0o020644), ImageError),   # a character device on NFS
])
def test_hostile_images_are_rejected(dumped, tmp_path, change, error) -> None:
    image_dir, _ = dumped
    bad = _rewrite_files(image_dir, tmp_path, change)
    with pytest.raises(error):
        images = load_images(bad)
        build_manifest(images, _nfs_dev(images))
