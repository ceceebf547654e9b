"""Host runs of the lab's self-checking workloads (src/spfs/lab/workloads/nfsload.c).

Each kind runs on a local directory for about a second, gets SIGTERM and must report PASS;
for most kinds a second run sabotages the data behind the workload's back (truncating its
file, writing into its FIFO, unlinking its socket...) and the verdict must be FAIL, which
proves the check can fail. The binary is built with the lab's own compiler call.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spfs.lab.paths import LabPaths
from spfs.lab.workloads import ensure_workloads

pytestmark = pytest.mark.timeout(30)

STOP_TIMEOUT = 10.0

# kind -> whether PATH is a directory the test must create first
KINDS = {
    "append": False, "mmap": False, "posix": False, "flock": False, "ofd": False,
    "cwd": True, "rw": False, "read": False, "odirect": False, "dirfd": False,
    "mmap-private": False, "chroot": True, "exe": False, "fifo": False, "epoll": False,
    "unix-listen": False, "unix-dgram": False, "unlinked": False,
}


@pytest.fixture(scope="module")
def nfsload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = ensure_workloads(LabPaths(tmp_path_factory.mktemp("lab-build")))
    return next(exe for exe in built if exe.name == "nfsload")


@dataclass
class Workload:
    proc: subprocess.Popen[bytes]
    path: Path
    result: Path

    def progress(self) -> int:
        """Its iteration count, from RESULT.progress (what the lab tests wait on)."""
        try:
            data = Path(f"{self.result}.progress").read_bytes()
        except FileNotFoundError:
            return 0
        return int.from_bytes(data, sys.byteorder) if len(data) == 8 else 0

    def wait_iterations(self, more: int, timeout: float = 20.0, may_end: bool = False) -> int:
        """Until it has done `more` iterations past the count it has now (or ended, if it
        `may_end`); that count."""
        want = self.progress() + more
        deadline = time.monotonic() + timeout
        while (now := self.progress()) < want:
            if may_end and self.proc.poll() is not None:
                return now
            assert self.proc.poll() is None, f"died early: {self.result.read_text()!r}"
            assert time.monotonic() < deadline, f"stuck at iteration {now}, waiting for {want}"
            time.sleep(0.01)
        return now

    def verdict(self) -> str:
        """SIGTERM (if still running) and return what the workload wrote to RESULT."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=STOP_TIMEOUT)
        return self.result.read_text()


@contextlib.contextmanager
def started(binary: Path, kind: str, tmp: Path) -> Iterator[Workload]:
    path = tmp / f"target-{kind}"
    if KINDS[kind]:
        path.mkdir()
    result = tmp / f"{kind}.result"
    proc = subprocess.Popen(["nice", "-n", "19", str(binary), kind, str(path), str(result)],
                            stderr=subprocess.PIPE)
    try:
        yield Workload(proc, path, result)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
        if proc.stderr:
            proc.stderr.close()


def iterations(verdict: str) -> int:
    match = re.search(r"\(iterations (\d+)\)\n$", verdict)
    assert match, f"no iteration count in {verdict!r}"
    return int(match.group(1))


def exe_copy(nfsload: Path, tmp: Path) -> Path:
    """The exe kind is meant to run from a copy of the binary on the file system under test."""
    copy = tmp / "nfsload-copy"
    shutil.copy2(nfsload, copy)
    return copy


def binary_for(kind: str, nfsload: Path, tmp: Path) -> Path:
    return exe_copy(nfsload, tmp) if kind == "exe" else nfsload


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_passes_when_left_alone(kind: str, nfsload: Path, tmp_path: Path) -> None:
    with started(binary_for(kind, nfsload, tmp_path), kind, tmp_path) as load:
        load.wait_iterations(3)
        # The result file is opened at start-up and stays empty until the verdict.
        assert load.result.read_text() == ""
        verdict = load.verdict()
        assert verdict.startswith("PASS"), verdict
        assert load.proc.returncode == 0
        # the count the lab tests wait on is the one the verdict gives
        assert iterations(verdict) == load.progress() >= 3, verdict


def test_read_wraps_at_eof(nfsload: Path, tmp_path: Path) -> None:
    with started(nfsload, "read", tmp_path) as load:
        time.sleep(1.0)
        verdict = load.verdict()
    wraps = re.match(r"PASS \((\d+) wraps\)", verdict)
    assert wraps and int(wraps.group(1)) >= 1, verdict


# ---- sabotage: each one breaks what the workload holds, then its verdict must be FAIL ----

def truncate_file(load: Workload) -> None:
    os.truncate(load.path, 0)


def overwrite_with_zeros(load: Workload) -> None:
    size = load.path.stat().st_size
    with open(load.path, "r+b") as f:
        f.write(bytes(size))


def overwrite_after_counter(load: Workload) -> None:
    """The mmap workload's file is shared with its mapping: bytes 8.. must stay its own."""
    with open(load.path, "r+b") as f:
        f.seek(100)
        f.write(b"\x01")


def overwrite_second_page(load: Workload) -> None:
    """Page 1 of the mmap-private workload is a clean (never written) MAP_PRIVATE page."""
    with open(load.path, "r+b") as f:
        f.seek(os.sysconf("SC_PAGE_SIZE"))
        f.write(b"\xff" * 64)


def add_stray_entry(load: Workload) -> None:
    (load.path / "intruder").write_text("not from the workload\n")


def rename_dir(load: Workload) -> None:
    load.path.rename(load.path.with_name(load.path.name + "-moved"))


def overwrite_chroot_marker(load: Workload) -> None:
    (load.path / "nfsload-chroot-marker").write_text("someone else\n")


def write_into_fifo(load: Workload) -> None:
    fd = os.open(load.path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"garbage-garbage\n")
    finally:
        os.close(fd)


def unlink_socket(load: Workload) -> None:
    load.path.unlink()


def send_stray_datagram(load: Workload) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"datagram 999999", str(load.path))


def truncate_through_proc_fd(load: Workload) -> None:
    """The unlinked file has no name any more; reach it through the workload's fd table."""
    fd_dir = Path(f"/proc/{load.proc.pid}/fd")
    for fd in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd) == f"{load.path} (deleted)":
                os.truncate(fd, 100)
                return
    raise AssertionError(f"no deleted {load.path} among the fds of {load.proc.pid}")


def corrupt_own_text(load: Workload) -> None:
    """Change one byte of the (never called) exe_canary function in the running process's
    text, as a page re-read wrongly after a migration would; /proc/PID/mem writes through
    the read-only mapping as root."""
    binary = Path(load.proc.args[3])  # type: ignore[index]
    out = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    match = re.search(r"^([0-9a-f]+) T exe_canary$", out, re.M)
    assert match, "exe_canary not in the symbol table"
    with open(f"/proc/{load.proc.pid}/mem", "r+b", buffering=0) as mem:
        mem.seek(int(match.group(1), 16))
        old = mem.read(1)
        mem.seek(int(match.group(1), 16))
        mem.write(bytes([old[0] ^ 0xFF]))


SABOTAGE: dict[str, tuple[Callable[[Workload], None], str]] = {
    "append": (truncate_file, r"line 1 holds"),
    "mmap": (overwrite_after_counter, r"mapping byte 100 changed"),
    "rw": (truncate_file, r"record \d+|file size"),
    "read": (overwrite_with_zeros, r"byte at \d+ is"),
    "odirect": (overwrite_with_zeros, r"O_DIRECT block \d+"),
    "dirfd": (add_stray_entry, r"unexpected entry intruder"),
    "mmap-private": (overwrite_second_page, r"clean page 1 byte 0 is 0xff"),
    "cwd": (rename_dir, r"cwd is .*-moved, want"),
    "chroot": (overwrite_chroot_marker, r"/ is not .* any more"),
    "exe": (corrupt_own_text, r"checksum of our text changed"),
    "fifo": (write_into_fifo, r"record \d+ reads"),
    "epoll": (write_into_fifo, r"read byte|data in an empty FIFO"),
    "unix-listen": (unlink_socket, r"connect to .*: No such file or directory"),
    "unix-dgram": (send_stray_datagram, r'got "datagram 999999"'),
    "unlinked": (truncate_through_proc_fd, r"record \d+|file size"),
}


@pytest.mark.parametrize("kind", list(SABOTAGE))
def test_kind_fails_when_sabotaged(kind: str, nfsload: Path, tmp_path: Path) -> None:
    sabotage, why = SABOTAGE[kind]
    with started(binary_for(kind, nfsload, tmp_path), kind, tmp_path) as load:
        load.wait_iterations(2)
        sabotage(load)
        load.wait_iterations(2, may_end=True)  # it sees the damage now, or at its verdict
        verdict = load.verdict()
    assert verdict.startswith("FAIL: "), verdict
    assert re.search(why, verdict), verdict
    assert load.proc.returncode == 1


def test_usage_errors_exit_2(nfsload: Path, tmp_path: Path) -> None:
    for argv in (["nosuchkind", str(tmp_path / "f"), str(tmp_path / "r")], ["rw"]):
        proc = subprocess.run([str(nfsload), *argv], capture_output=True, text=True, timeout=10)
        assert proc.returncode == 2, proc
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["posix", "flock", "ofd"])
def test_lockcheck_sees_the_held_lock(kind: str, nfsload: Path, tmp_path: Path) -> None:
    def lockcheck(path: Path) -> int:
        return subprocess.run([str(nfsload), "lockcheck", kind, str(path)],
                              capture_output=True, timeout=10).returncode

    with started(nfsload, kind, tmp_path) as load:
        load.wait_iterations(1)  # the lock is taken before the first one
        assert lockcheck(load.path) == 0  # held by the workload
        assert load.verdict().startswith("PASS")
    assert lockcheck(load.path) == 1  # free once it exited
