"""Restore mode: the manifest tree, CRIU-style changes, and the switch to the real target."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import stat
from pathlib import Path
from typing import Callable

import pytest

from spfs_testlib import SpfsMount, write_manifest

TARGET_BYTES = bytes(range(256)) * 64  # 16 KiB of non-zero target data


@pytest.fixture
def restore(spfs_factory: Callable[..., SpfsMount], tmp: Path) -> SpfsMount:
    source = tmp / "exe.bin"
    source.write_bytes(b"\x7fELF real bytes" + b"\x01" * 4081)
    manifest = write_manifest(tmp / "m.json", [
        {"path": "dir", "type": "dir", "mode": 0o750, "uid": 1000, "gid": 1001},
        {"path": "dir/data", "type": "file", "mode": 0o640, "uid": 1000, "gid": 1001,
         "size": len(TARGET_BYTES), "mtime_ns": 1_600_000_000_000_000_000},
        {"path": "dir/exe", "type": "file", "mode": 0o755, "size": 4096,
         "content_source": str(source)},
        {"path": "dir/short_source", "type": "file", "mode": 0o644, "size": 100,
         "content_source": str(source)},
        {"path": "dir/link", "type": "symlink", "target": "data"},
        {"path": "dir/fifo", "type": "fifo", "mode": 0o600},
        {"path": "dir/sock", "type": "socket", "mode": 0o755},
        {"path": "deep/er/file", "type": "file", "mode": 0o600, "size": 1 << 40},
        {"path": ".nfs000000001", "type": "file", "mode": 0o644, "size": 0},
    ], root={"mode": 0o711, "uid": 0, "gid": 0})
    (tmp / "exe.bin").chmod(0o644)
    return spfs_factory("restore", "--manifest", str(manifest))


def test_tree_matches_the_manifest_exactly(restore: SpfsMount) -> None:
    m = restore.mountpoint
    assert stat.S_IMODE(os.stat(m).st_mode) == 0o711
    st = os.stat(m / "dir")
    assert (stat.S_ISDIR(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == \
        (True, 0o750, 1000, 1001)
    st = os.stat(m / "dir" / "data")
    assert (st.st_mode, st.st_size, st.st_uid, st.st_mtime_ns) == \
        (stat.S_IFREG | 0o640, len(TARGET_BYTES), 1000, 1_600_000_000_000_000_000)
    assert (m / "dir" / "data").read_bytes() == bytes(len(TARGET_BYTES))
    exe = (m / "dir" / "exe").read_bytes()
    assert exe.startswith(b"\x7fELF real bytes") and len(exe) == 4096
    assert (m / "dir" / "short_source").read_bytes() == exe[:100]
    assert os.readlink(m / "dir" / "link") == "data"
    assert stat.S_ISFIFO(os.lstat(m / "dir" / "fifo").st_mode)
    assert stat.S_ISSOCK(os.lstat(m / "dir" / "sock").st_mode)
    assert os.stat(m / "deep" / "er" / "file").st_size == 1 << 40
    with open(m / "deep" / "er" / "file", "rb") as handle:
        handle.seek((1 << 40) - 10)
        assert handle.read() == bytes(10)
    assert sorted(os.listdir(m / "dir")) == ["data", "exe", "fifo", "link", "short_source", "sock"]
    with open(m / "dir" / "exe", "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 4096, prot=mmap.PROT_READ)
        assert mapped[:15] == b"\x7fELF real bytes"
        mapped.close()


def test_criu_style_changes_work_in_restore_mode(restore: SpfsMount) -> None:
    m = restore.mountpoint
    # link_remap: CRIU links the remap file to the silly-renamed name, opens, unlinks.
    (m / "link_remap.7").write_bytes(b"ghost")
    os.link(m / "link_remap.7", m / "dir" / "linked")
    assert os.stat(m / "dir" / "linked").st_nlink == 2
    fd = os.open(m / "dir" / "linked", os.O_RDWR)
    os.unlink(m / "link_remap.7")
    os.unlink(m / "dir" / "linked")
    assert os.pread(fd, 5, 0) == b"ghost" and os.fstat(fd).st_nlink == 0
    os.close(fd)
    os.setxattr(m / ".nfs000000001", "security.spfs.link_remap", b"link_remap.7")
    os.setxattr(m / ".nfs000000001", "user.note", b"kept")
    assert os.getxattr(m / ".nfs000000001", "security.spfs.link_remap") == b"link_remap.7"
    assert os.listxattr(m / ".nfs000000001") == ["user.note"]
    os.rename(m / "dir" / "data", m / "dir" / "renamed")
    assert os.stat(m / "dir" / "renamed").st_size == len(TARGET_BYTES)
    os.mkdir(m / "newdir", 0o700)
    os.mkfifo(m / "newdir" / "p")
    os.symlink("/abs/target", m / "newdir" / "l")
    assert os.readlink(m / "newdir" / "l") == "/abs/target"
    with pytest.raises(OSError) as info:
        os.rmdir(m / "newdir")
    assert info.value.errno == errno.ENOTEMPTY
    os.chmod(m / "dir" / "exe", 0o700)
    os.truncate(m / "dir" / "exe", 10)
    assert (m / "dir" / "exe").read_bytes() == b"\x7fELF real "
    with open(m / "dir" / "renamed", "r+b") as handle:
        handle.seek(100)
        handle.write(b"written in restore")
    data = (m / "dir" / "renamed").read_bytes()
    assert data[100:118] == b"written in restore" and data[:100] == bytes(100)
    st = os.stat(m / "dir")
    assert st.st_nlink == 2
    assert os.stat(m).st_nlink == 2 + 3  # dir, deep, newdir


def test_restore_bytes_never_reach_applications_after_stub_then_proxy(
        restore: SpfsMount, tmp: Path) -> None:
    m, target = restore.mountpoint, tmp / "target"
    (target / "dir").mkdir()
    (target / "dir" / "data").write_bytes(TARGET_BYTES)
    (target / "dir" / "exe").write_bytes(b"target exe")
    fd = os.open(m / "dir" / "data", os.O_RDWR)
    try:
        assert os.pread(fd, 4096, 0) == bytes(4096)            # zeros, now in the page cache
        os.pwrite(fd, b"restore-mode write", 8192)             # restore bytes in the cache too
        private = mmap.mmap(fd, len(TARGET_BYTES), flags=mmap.MAP_PRIVATE,
                            prot=mmap.PROT_READ)               # mapped, not faulted yet
        shared = mmap.mmap(fd, len(TARGET_BYTES), flags=mmap.MAP_SHARED,
                           prot=mmap.PROT_READ)
        assert shared[8192:8210] == b"restore-mode write"    # faulted in restore mode
        restore.set_mode("stub")
        record = restore.set_mode("proxy", target)
        assert record["reopened"] == 1 and record["broken"] == 0
        assert private[:] == TARGET_BYTES
        assert shared[:] == TARGET_BYTES
        assert os.pread(fd, len(TARGET_BYTES), 0) == TARGET_BYTES
        assert (m / "dir" / "data").read_bytes() == TARGET_BYTES
        os.pwrite(fd, b"after", 0)                             # the restore handle now writes the target
        assert (target / "dir" / "data").read_bytes()[:5] == b"after"
        private.close()
        shared.close()
    finally:
        os.close(fd)
    assert (m / "dir" / "exe").read_bytes() == b"target exe"
    assert os.stat(m / "dir").st_uid == 0  # the target's owner, not the manifest's


def test_restore_straight_to_proxy_and_missing_target_files(restore: SpfsMount, tmp: Path) -> None:
    m, target = restore.mountpoint, tmp / "target"
    (target / "dir").mkdir()
    (target / "dir" / "data").write_bytes(TARGET_BYTES)
    present = os.open(m / "dir" / "data", os.O_RDONLY)
    missing = os.open(m / "dir" / "exe", os.O_RDONLY)
    cwd = os.open(m / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        record = restore.set_mode("proxy", target)
        assert (record["reopened"], record["broken"]) == (2, 1)
        assert os.pread(present, 16, 0) == TARGET_BYTES[:16]
        with pytest.raises(OSError) as info:
            os.pread(missing, 16, 0)
        # EIO from the broken handle, or ESTALE if the kernel re-validates the inode first
        assert info.value.errno in (errno.EIO, errno.ESTALE)
        assert sorted(os.listdir(cwd)) == ["data"]
        assert not (m / "dir" / "exe").exists()
        assert restore.status()["mode"] == "proxy"
    finally:
        for fd in (present, missing, cwd):
            os.close(fd)


def _leave_socket_file(path: Path, kind: int) -> None:
    """What a process bound on the real share leaves there once CRIU's dump killed it."""
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(str(path))
    s.close()


def test_unix_sockets_bound_in_restore_mode_answer_in_proxy_mode(
        restore: SpfsMount, tmp: Path) -> None:
    """CRIU binds restored unix sockets on SPFS; the kernel finds a bound socket by its
    inode, so the name must keep leading to that very FUSE inode after the switch, also
    once the swap engine has bound the process's new socket on the target."""
    m, target = restore.mountpoint, tmp / "target"
    (target / "dir").mkdir()
    _leave_socket_file(target / "dir" / "listen.sock", socket.SOCK_STREAM)
    _leave_socket_file(target / "dir" / "dgram.sock", socket.SOCK_DGRAM)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        listener.bind(str(m / "dir" / "listen.sock"))
        listener.listen(4)
        receiver.bind(str(m / "dir" / "dgram.sock"))
        restore.set_mode("stub")
        restore.set_mode("proxy", target)
        for name in ("listen.sock", "dgram.sock"):  # what the swap engine's prepare does
            (target / "dir" / name).unlink()
        replacement = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        replacement.bind(str(target / "dir" / "listen.sock"))
        replacement.listen(1)
        _leave_socket_file(target / "dir" / "dgram.sock", socket.SOCK_DGRAM)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(m / "dir" / "listen.sock"))
            accepted, _ = listener.accept()
            client.sendall(b"ping")
            assert accepted.recv(4) == b"ping"
            accepted.close()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(b"datagram", str(m / "dir" / "dgram.sock"))
            receiver.settimeout(5)
            assert receiver.recv(16) == b"datagram"
        assert stat.S_ISSOCK(os.lstat(m / "dir" / "listen.sock").st_mode)
        os.unlink(m / "dir" / "dgram.sock")  # unlinked through SPFS: the name is the target's
        _leave_socket_file(target / "dir" / "dgram.sock", socket.SOCK_DGRAM)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            with pytest.raises(ConnectionRefusedError):
                sender.sendto(b"gone", str(m / "dir" / "dgram.sock"))
        replacement.close()
    finally:
        listener.close()
        receiver.close()


def test_unlinked_open_file_reaches_its_link_remap_in_proxy_mode(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    """CRIU's restore of a silly-renamed file: link link_remap.N to the silly name, open it,
    unlink both. In proxy mode the open file is link_remap.N of the target (still there
    until the manager removes it after the swap), and it still looks unlinked."""
    manifest = write_manifest(tmp / "m.json", [
        {"path": "dir", "type": "dir", "mode": 0o755},
        {"path": "dir/link_remap.3", "type": "file", "mode": 0o600, "size": len(TARGET_BYTES)},
    ])
    restore = spfs_factory("restore", "--manifest", str(manifest))
    m, target = restore.mountpoint, tmp / "target"
    (target / "dir").mkdir()
    (target / "dir" / "link_remap.3").write_bytes(TARGET_BYTES)
    os.link(m / "dir" / "link_remap.3", m / "dir" / ".nfs0000000000000001")
    fd = os.open(m / "dir" / ".nfs0000000000000001", os.O_RDWR)
    try:
        os.unlink(m / "dir" / ".nfs0000000000000001")
        os.unlink(m / "dir" / "link_remap.3")
        restore.set_mode("stub")
        record = restore.set_mode("proxy", target)
        assert (record["reopened"], record["broken"]) == (1, 0)
        assert os.pread(fd, len(TARGET_BYTES), 0) == TARGET_BYTES
        os.pwrite(fd, b"still open", 0)
        assert (target / "dir" / "link_remap.3").read_bytes()[:10] == b"still open"
        assert os.fstat(fd).st_nlink == 0
        assert sorted(os.listdir(m / "dir")) == ["link_remap.3"]  # the target's, as it is
    finally:
        os.close(fd)
