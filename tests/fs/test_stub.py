"""Stub mode: requests park until the mode changes, then run in the new mode."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from spfs_testlib import SpfsMount, wait_for

READERS = 1000
FILE_SIZE = 16 * 1024


def content(i: int) -> bytes:
    return (f"file {i:04d} ".encode() * (FILE_SIZE // 10 + 1))[:FILE_SIZE]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(l.split()[1]) for l in handle if l.startswith("VmRSS:"))


def test_1000_parked_readers_released_by_switch_to_proxy(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    target = tmp / "target"
    for i in range(READERS):
        (target / f"f{i:04d}").write_bytes(content(i))
    mount = spfs_factory("proxy", "--proxy-dir", str(target))
    fds = [os.open(mount.mountpoint / f"f{i:04d}", os.O_RDONLY) for i in range(READERS)]
    spare = os.open(mount.mountpoint / "f0000", os.O_RDONLY)
    results: dict[int, tuple[bytes, float]] = {}
    threads: list[threading.Thread] = []
    try:
        mount.set_mode("stub")
        rss_before = rss_kib(mount.proc.pid)

        def reader(i: int) -> None:
            data = os.pread(fds[i], FILE_SIZE, 0)
            results[i] = (data, time.monotonic())

        old_stack = threading.stack_size(256 * 1024)
        try:
            for i in range(READERS):
                thread = threading.Thread(target=reader, args=(i,), daemon=True)
                thread.start()
                threads.append(thread)
        finally:
            threading.stack_size(old_stack)
        wait_for(lambda: mount.status()["parked"] >= READERS, 30, "all readers parked")
        assert not results
        parked_rss = rss_kib(mount.proc.pid) - rss_before

        # The mountpoint itself still answers at once (the median of 21 tries, so that
        # one scheduling hiccup of a loaded machine does not decide).
        times = []
        for _ in range(21):
            start = time.monotonic()
            os.stat(mount.mountpoint)
            times.append(time.monotonic() - start)
        times.sort()
        worst = times[-1]
        # 10x margin for a loaded host; the value is printed below
        assert times[10] < 0.100, f"stat of the mountpoint took {times[10] * 1e3:.1f} ms"

        # Closing descriptors (FLUSH + RELEASE) does not hang in stub.
        closer = threading.Thread(target=os.close, args=(spare,), daemon=True)
        closer.start()
        closer.join(5)
        assert not closer.is_alive(), "close() hung in stub mode"
        spare = -1

        switched = time.monotonic()
        mount.set_mode("proxy", mount.target)
        for thread in threads:
            thread.join(10)
        assert len(results) == READERS
        wrong = [i for i, (data, _) in results.items() if data != content(i)]
        assert not wrong, f"{len(wrong)} readers got wrong data"
        last = max(done for _, done in results.values()) - switched
        answered = mount.status()["release_seconds"]
        # SPFS's part: every parked read answered within 1 s of the switch. The reader
        # threads of this process then still need the CPU to wake up, which on a loaded
        # 2-core machine can take a while longer: bounded, but more loosely.
        assert answered is not None and answered < 10.0, f"daemon answered after {answered} s"
        assert last < 30.0, f"last reader finished {last:.2f} s after the switch"
        assert parked_rss < 64 * 1024, f"{READERS} parked requests cost {parked_rss} KiB"
        print(f"daemon answered {READERS} parked reads {answered * 1e3:.0f} ms after the "
              f"switch, last reader done after {last * 1e3:.0f} ms; parked RSS {parked_rss} "
              f"KiB; stat median {times[10] * 1e3:.2f} ms, worst {worst * 1e3:.2f} ms")
    finally:
        if mount.proc.poll() is None and mount.status()["mode"] != "proxy":
            mount.set_mode("proxy", mount.target)
        for thread in threads:
            thread.join(10)
        for fd in fds + ([spare] if spare >= 0 else []):
            os.close(fd)


def _run_async(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def body() -> None:
        try:
            out.append(target())
        except OSError as exc:
            out.append(exc)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def test_stub_from_start_parks_lookups_and_metadata_until_proxy(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    (tmp / "target" / "sub").mkdir()
    (tmp / "target" / "sub" / "file").write_bytes(b"late data")
    mount = spfs_factory("stub")
    m = mount.mountpoint
    thread, root = _run_async(lambda: os.stat(m))  # root getattr answers in stub
    thread.join(30)
    assert root and not isinstance(root[0], OSError), f"stat of the root in stub: {root}"
    assert stat.S_ISDIR(root[0].st_mode)
    pending = [
        _run_async(lambda: (m / "sub" / "file").read_bytes()),
        _run_async(lambda: sorted(os.listdir(m))),
        _run_async(lambda: os.statvfs(m).f_namemax),
        _run_async(lambda: (m / "created").write_bytes(b"new") and (tmp / "target" / "created").read_bytes()),
    ]
    # parked (the positive signal) before the negative check; the 4th may queue in the
    # kernel behind a parked lookup in the same directory
    wait_for(lambda: mount.status()["parked"] >= 3, 30, "requests parked")
    assert all(not out for _, out in pending), "a request was answered in stub mode"
    mount.set_mode("proxy", tmp / "target")
    for thread, _ in pending:
        thread.join(10)
    assert pending[0][1] == [b"late data"]
    assert pending[1][1][0] in (["sub"], ["created", "sub"])
    assert pending[2][1] == [255]
    assert pending[3][1] == [b"new"]


def test_process_exit_and_dup_close_during_stub_do_not_hang(proxy: SpfsMount) -> None:
    (proxy.target / "f").write_bytes(b"x")
    child = subprocess.Popen([sys.executable, "-c", f"""
import os, sys, time
fds = [os.open({str(proxy.mountpoint / 'f')!r}, os.O_RDWR) for _ in range(5)]
os.dup2(fds[0], 100)
print("open", flush=True)
sys.stdin.readline()
os.dup2(fds[1], fds[2])   # replaces an fd on the stub: FLUSH of the old one
os.close(fds[3])
print("closed", flush=True)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "open"
        proxy.set_mode("stub")
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "closed"
        assert child.wait(30) == 0  # exit closes the rest (FLUSH/RELEASE) without hanging
        # the kernel sends RELEASE in the background after the last close: 1 is a legal
        # answer right after the exit; the count must reach 0 soon after
        wait_for(lambda: proxy.status()["open_handles"] == 0, 30, "every handle released")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        proxy.set_mode("proxy", proxy.target)


def test_spfs_xattrs_answer_in_stub_mode(proxy: SpfsMount) -> None:
    (proxy.target / "f").write_bytes(b"")
    fd = os.open(proxy.mountpoint / "f", os.O_RDONLY)
    try:
        os.setxattr(fd, "security.spfs.link_remap", b"link_remap.3")
        proxy.set_mode("stub")
        thread, out = _run_async(lambda: os.getxattr(fd, "security.spfs.link_remap"))
        thread.join(5)
        assert out == [b"link_remap.3"]
        thread, out = _run_async(lambda: os.getxattr(fd, "user.other"))
        wait_for(lambda: proxy.status()["parked"] == 1, 5, "non-spfs xattr parked")
        proxy.set_mode("proxy", proxy.target)
        thread.join(5)
        assert isinstance(out[0], OSError) and out[0].errno == errno.ENODATA
    finally:
        os.close(fd)


def test_stub_timeout_turns_long_waits_into_eio(spfs_factory: Callable[..., SpfsMount],
                                               tmp: Path) -> None:
    mount = spfs_factory("stub", "--stub-timeout", "0.5")
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        os.listdir(mount.mountpoint)
    waited = time.monotonic() - start
    assert info.value.errno == errno.EIO
    assert 0.4 < waited < 50, f"EIO after {waited:.2f} s (stub timeout 0.5 s)"
    print(f"EIO after {waited:.2f} s (stub timeout 0.5 s)")


def test_sigterm_in_stub_fails_parked_requests_and_unmounts(
        spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    mount = spfs_factory("stub")
    thread, out = _run_async(lambda: os.listdir(mount.mountpoint))
    wait_for(lambda: mount.status()["parked"] == 1, 5, "listdir parked")
    mount.proc.terminate()
    assert mount.exit_status() == 0
    thread.join(5)
    assert isinstance(out[0], OSError) and out[0].errno in (errno.EIO, errno.ENOTCONN)
    from spfs_testlib import is_mounted
    assert not is_mounted(mount.mountpoint)
    assert not Path(mount.socket).exists()


def test_kernel_caches_do_not_bypass_the_stub(proxy: SpfsMount) -> None:
    m = proxy.mountpoint
    (proxy.target / "d").mkdir()
    (proxy.target / "d" / "f").write_bytes(b"cached")
    fd = os.open(m / "d" / "f", os.O_RDONLY)
    try:
        assert os.pread(fd, 6, 0) == b"cached"  # page cache filled
        os.stat(m / "d" / "f")                  # attributes and entries cached for 1 s
        proxy.set_mode("stub")
        pending = [_run_async(lambda: os.stat(m / "d" / "f").st_size),
                   _run_async(lambda: os.fstat(fd).st_size),
                   _run_async(lambda: os.pread(fd, 6, 0))]
        wait_for(lambda: proxy.status()["parked"] >= 2, 30, "cached operations parked")
        # no sleep: the content changed below is what shows every answer came after the
        # switch, not from a kernel cache during stub
        assert all(not out for _, out in pending), "served from a kernel cache in stub mode"
        (proxy.target / "d" / "f").write_bytes(b"CHANGED")
        proxy.set_mode("proxy", proxy.target)
        for thread, _ in pending:
            thread.join(5)
        assert [out[0] for _, out in pending] == [7, 7, b"CHANGE"]
    finally:
        os.close(fd)


def test_200_readers_opening_files_during_stub(spfs_factory: Callable[..., SpfsMount],
                                               tmp: Path) -> None:
    """Like the C spfs test (200 sha256sum readers): the open itself is parked."""
    target = tmp / "target"
    for d in range(10):
        (target / f"d{d}").mkdir()
        for i in range(20):
            (target / f"d{d}" / f"f{i}").write_bytes(content(d * 20 + i))
    mount = spfs_factory("stub")
    results: dict[int, bytes] = {}

    def reader(n: int) -> None:
        results[n] = (mount.mountpoint / f"d{n // 20}" / f"f{n % 20}").read_bytes()

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(200)]
    for thread in threads:
        thread.start()
    # Lookups in one directory queue in the kernel behind the parked one (no
    # PARALLEL_DIROPS): here all of them wait behind one lookup in the root.
    wait_for(lambda: mount.status()["parked"] >= 1, 30, "a lookup parked")
    assert not results
    switched = time.monotonic()
    mount.set_mode("proxy", target)
    for thread in threads:
        thread.join(10)
    elapsed = time.monotonic() - switched
    assert {n: data == content(n) for n, data in results.items()} == {n: True for n in range(200)}
    # wall-clock bound with a wide margin (a loaded 2-core host); its value is reported
    assert elapsed < 30.0, f"200 open+read took {elapsed:.2f} s after the switch"
    print(f"200 open+read done {elapsed:.2f} s after the switch")
