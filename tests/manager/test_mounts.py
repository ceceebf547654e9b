"""The mount steps on real tmpfs mounts in a private mount namespace (the "container"):
mounting the real fs detached inside it, and moving it in place of SPFS at every path."""

import errno
import os
import re
import subprocess
import threading
import time

import pytest

from spfs.sys import mountapi as m
from spfs.manager.mounts import (Placement, describe_placements, mounts_of_device, move_into_place,
                                 with_mountpoint_flags)
from spfs.sys.mountinfo import read_mountinfo, top_mount_at
from spfs.sys.nsexec import Namespaces
from spfs.manager.realmount import RealFs, RetryPolicy, mount_real_fs

REAL = RealFs("realfs", "tmpfs", m.MS_NOSUID | m.MS_NODEV, "size=2m,mode=751")


def _fill(fd: int) -> None:
    root = f"/proc/self/fd/{fd}"
    os.makedirs(f"{root}/sub/deeper")
    with open(f"{root}/sub/deeper/file", "w") as f:
        f.write("real data")


@pytest.fixture
def real_fd(container):
    fds = []

    def mount(fs=REAL, **kw):
        fd = mount_real_fs(fs, Namespaces(container.pid), str(container.base), **kw)
        fds.append(fd)
        return fd

    yield mount
    for fd in fds:
        os.close(fd)


@pytest.fixture
def spfs_in_container(container):
    """A tmpfs named "spfs" in place of SPFS: at MP, bound at B1 (sub-root, ro+nosuid) and
    at B2 (root, noexec, made a slave of MP, which is shared)."""
    mp, b1, b2 = (str(container.base / n) for n in ("mp", "b1", "b2"))
    for path in (mp, b1, b2):
        os.mkdir(path)
    container.run("sh", "-ec", f"""
        mount -t tmpfs -o size=1m spfs {mp}
        mkdir -p {mp}/sub/deeper
        mount --make-shared {mp}
        mount --bind {mp}/sub {b1}
        mount -o remount,bind,ro,nosuid {b1}
        mount --make-private {b1}
        mount --bind {mp} {b2}
        mount -o remount,bind,noexec {b2}
        mount --make-slave {b2}
    """)
    return mp, b1, b2


def _optional_fields(pid: int, path: str) -> str:
    lines = [line for line in open(f"/proc/{pid}/mountinfo") if line.split()[4] == path]
    fields = lines[-1].split()
    return " ".join(fields[6:fields.index("-")])


def test_real_fs_is_mounted_detached_with_its_options(container, real_fd):
    before = {e.mount_id for e in container.mounts()}
    fd = real_fd()
    # invisible to the container: nothing new in its mount table
    assert {e.mount_id for e in container.mounts()} == before
    _fill(fd)
    assert open(f"/proc/self/fd/{fd}/sub/deeper/file").read() == "real data"
    st = os.stat(f"/proc/self/fd/{fd}")
    assert oct(st.st_mode & 0o777) == oct(0o751)


def test_fallback_mount2_leaves_no_trace(container, real_fd):
    before = [(e.mount_id, e.mountpoint) for e in container.mounts()]
    fd = real_fd(legacy=True)
    assert [(e.mount_id, e.mountpoint) for e in container.mounts()] == before
    assert oct(os.stat(f"/proc/self/fd/{fd}").st_mode & 0o777) == oct(0o751)


def test_unknown_fstype_fails_at_once(container):
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        mount_real_fs(RealFs("x", "nosuchfs", 0, ""), Namespaces(container.pid),
                      str(container.base), RetryPolicy(deadline=10))
    assert info.value.errno == errno.ENODEV
    assert time.monotonic() - started < 2


def test_retries_until_it_works(container, real_fd):
    """The hidden dir of the fallback appears only later: mount(2) fails with ENOENT, the
    retry loop keeps going and succeeds once the directory exists."""
    hidden = container.base / "late"
    timer = threading.Timer(0.6, hidden.mkdir)
    timer.start()
    try:
        started = time.monotonic()
        fd = mount_real_fs(REAL, Namespaces(container.pid), str(hidden),
                           RetryPolicy(deadline=10, first_delay=0.05), legacy=True)
        os.close(fd)
        assert time.monotonic() - started >= 0.5
    finally:
        timer.cancel()


def test_retries_stop_at_the_deadline(container):
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        mount_real_fs(REAL, Namespaces(container.pid), str(container.base / "never"),
                      RetryPolicy(deadline=0.8, first_delay=0.05), legacy=True)
    elapsed = time.monotonic() - started
    assert info.value.errno == errno.ENOENT and "attempt(s)" in str(info.value)
    print(f"gave up after {elapsed:.2f} s (deadline 0.8 s)")
    assert 0.7 < elapsed < 30  # ~10x the margin: a shared, loaded host


def test_placements_describe_sub_root_flags_and_propagation(container, spfs_in_container):
    mp, b1, b2 = spfs_in_container
    placements = describe_placements(container.pid, [mp, b1, b2])
    assert placements[0] == Placement(mp, "/", 0, m.Propagation.SHARED)
    assert placements[1] == Placement(b1, "/sub", m.MOUNT_ATTR_RDONLY | m.MOUNT_ATTR_NOSUID,
                                      m.Propagation.PRIVATE)
    assert placements[2] == Placement(b2, "/", m.MOUNT_ATTR_NOEXEC, m.Propagation.SLAVE)


def test_move_into_place_keeps_sub_root_flags_propagation_and_one_superblock(
        container, spfs_in_container, real_fd):
    mp, b1, b2 = spfs_in_container
    fd = real_fd()
    _fill(fd)
    placements = with_mountpoint_flags(describe_placements(container.pid, [mp, b1, b2]),
                                       REAL.flags)
    move_into_place(fd, placements, Namespaces(container.pid), 10)

    mounts = container.mounts()
    at = {p: top_mount_at(mounts, p) for p in (mp, b1, b2)}
    assert {e.source for e in at.values()} == {"realfs"}
    assert len({e.dev for e in at.values()}) == 1  # one superblock (seed test 4.5)
    assert len({container.stat(p).st_dev for p in (mp, b1, b2)}) == 1
    assert at[b1].root == "/sub" and at[mp].root == "/" and at[b2].root == "/"
    assert {"ro", "nosuid"} <= set(at[b1].options)
    assert "noexec" in at[b2].options and "nosuid" not in at[b2].options
    assert open(f"/proc/{container.pid}/root{b1}/deeper/file").read() == "real data"
    # the mountpoint is shared again and B2 is a slave of exactly its peer group
    peer = re.search(r"shared:(\d+)", _optional_fields(container.pid, mp)).group(1)
    assert f"master:{peer}" in _optional_fields(container.pid, b2)
    assert _optional_fields(container.pid, b1) == ""
    # the superblock option of the real fs came from the recorded data and flags
    assert "size=2048k" in at[mp].super_options
    assert {"rw", "nosuid", "nodev"} <= set(at[mp].options)
    # SPFS is gone from every path
    assert not [e for e in mounts if e.source == "spfs"
                and e.mountpoint.startswith(str(container.base))]


def test_failed_move_puts_spfs_back_everywhere(container, spfs_in_container, real_fd):
    mp, b1, b2 = spfs_in_container
    fd = real_fd()  # empty: has no "sub", so the clone for B1 fails after MP was switched
    placements = describe_placements(container.pid, [mp, b1, b2])
    before = {p: top_mount_at(container.mounts(), p) for p in (mp, b1, b2)}
    with pytest.raises(OSError) as info:
        move_into_place(fd, placements, Namespaces(container.pid), 10)
    assert info.value.errno == errno.ENOENT
    after = {p: top_mount_at(container.mounts(), p) for p in (mp, b1, b2)}
    for path in (mp, b1, b2):
        assert after[path].source == "spfs", path
        assert after[path].root == before[path].root
        assert after[path].options == before[path].options
    assert len({container.stat(p).st_dev for p in (mp, b1, b2)}) == 1
    # the real mount is still usable through its fd (SPFS may be proxying onto it)
    os.mkdir(f"/proc/self/fd/{fd}/still-usable")


def test_container_with_its_own_user_namespace(tmp_path):
    """The real mount is made after joining the container's user namespace too, and moved
    in place of SPFS at a sub-root bind."""
    base = tmp_path / "userns"
    base.mkdir()
    mp, bind = str(base / "mp"), str(base / "bind")
    os.mkdir(mp)
    os.mkdir(bind)
    setup = (f"mount -t tmpfs spfs {mp} && mkdir {mp}/sub && mount --bind {mp}/sub {bind} && "
             "echo ready && exec sleep 60")
    proc = subprocess.Popen(["unshare", "-U", "--map-root-user", "-m", "--propagation",
                             "private", "sh", "-c", setup], stdout=subprocess.PIPE, text=True)
    fd = None
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert os.stat(f"/proc/{proc.pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
        target = Namespaces(proc.pid)
        placements = describe_placements(proc.pid, [mp, bind])
        fd = mount_real_fs(REAL, target, mp)
        _fill(fd)
        move_into_place(fd, placements, target, 10)
        mounts = read_mountinfo(proc.pid)
        assert top_mount_at(mounts, mp).source == top_mount_at(mounts, bind).source == "realfs"
        assert top_mount_at(mounts, bind).root == "/sub"
        assert os.path.exists(f"/proc/{proc.pid}/root{bind}/deeper/file")
    finally:
        if fd is not None:
            os.close(fd)
        proc.kill()
        proc.wait(10)


def test_mounts_of_device_skips_mounts_below_others(container, spfs_in_container):
    mp, b1, b2 = spfs_in_container
    container.run("mount", "--bind", b1, f"{mp}/sub/deeper")  # on top of SPFS itself
    dev = container.stat(mp).st_dev
    assert mounts_of_device(container.pid, dev) == [mp, b1, b2]
