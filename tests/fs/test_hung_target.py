"""A proxy target that stops answering, and many callers at once through the worker pool.

The hung target is real: a second spfs (proxy mode over a plain directory) mounted as the
proxy directory of the spfs under test, then SIGSTOPped. Requests to it stay queued in
its /dev/fuse, unanswered, as with an NFS server that is down; the waits on it stay
killable (a stopped daemon never read them), so every process involved can still end.
Its fusectl `waiting` count says when a call of the spfs under test has reached it.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import pytest

from spfs.fs import control_client
from spfs_testlib import SpfsMount, fusectl_dir, start_spfs, wait_for

STATUS_BOUND_S = 1.0


@dataclasses.dataclass
class HungTarget:
    mount: SpfsMount
    backing: Path
    frozen: bool = False

    @property
    def path(self) -> Path:
        return self.mount.mountpoint

    def waiting(self) -> int:
        """Requests sent to this filesystem and not answered yet."""
        return int((self._fusectl / "waiting").read_text())

    def freeze(self) -> None:
        self._fusectl = fusectl_dir(self.path)
        assert self.waiting() == 0
        self.mount.proc.send_signal(signal.SIGSTOP)
        self.frozen = True
        wait_for(lambda: _state(self.mount.proc.pid) == "T", 10, "the target daemon stopped")

    def thaw(self) -> None:
        if self.frozen:
            self.mount.proc.send_signal(signal.SIGCONT)
            self.frozen = False


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _hung_target(tmp: Path, *extra: str) -> Iterator[HungTarget]:
    where = tmp / "hung"
    where.mkdir()
    backing = where / "target"
    backing.mkdir(mode=0o777)
    backing.chmod(0o777)
    target = HungTarget(start_spfs(where / "mnt", "proxy", where, "--proxy-dir", str(backing),
                                   *extra), backing)
    try:
        yield target
    finally:
        target.thaw()
        target.mount.stop()


@pytest.fixture
def hung(tmp: Path) -> Iterator[HungTarget]:
    yield from _hung_target(tmp)


@pytest.fixture
def hung_slow_to_forget(tmp: Path) -> Iterator[HungTarget]:
    """A hung target whose attributes the kernel keeps for 60 s: a stat of its root taken
    before it stops lets a switch open it as the target without asking it."""
    yield from _hung_target(tmp, "--cache-timeout", "60")


def _stuck_stat(path: Path) -> subprocess.Popen[str]:
    """A process whose stat of *path* goes to the daemon (a name never looked up): it
    prints the errno it ends with (0: it exists)."""
    code = ("import os, sys\ntry:\n os.stat(sys.argv[1]); print(0)\n"
            "except OSError as e:\n print(e.errno)\n")
    return subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    out, _ = proc.communicate(timeout=timeout)
    return int(out.strip())


def _status_in_time(mount: SpfsMount, when: str) -> dict:
    """The daemon's status, which must come within STATUS_BOUND_S (the value is printed)."""
    start = time.monotonic()
    status = control_client.status(mount.socket, timeout=10)
    latency = time.monotonic() - start
    print(f"status answered in {latency * 1e3:.1f} ms {when}")
    assert latency < STATUS_BOUND_S
    return status


def test_status_and_release_answer_while_a_call_hangs_on_the_target(
        hung: HungTarget, spfs_factory: Callable[..., SpfsMount]) -> None:
    (hung.backing / "open-me").write_bytes(b"opened before the hang")
    mount = spfs_factory("proxy", "--proxy-dir", str(hung.path))
    fd = os.open(mount.mountpoint / "open-me", os.O_RDONLY)  # before: its lookup needs the root
    hung.freeze()
    stuck = _stuck_stat(mount.mountpoint / "never-looked-up")
    try:
        wait_for(lambda: hung.waiting() >= 1, 30, "the lookup to reach the stopped target")
        status = _status_in_time(mount, "while a lookup hangs on the target")
        assert status["backend_calls"] >= 1 and status["oldest_backend_call_seconds"] > 0
        # RELEASE (its close goes to the stopped target too) is answered all the same.
        os.close(fd)
        fd = -1
        wait_for(lambda: control_client.status(mount.socket, timeout=10)["open_handles"] == 0,
                 10, "the handle released while the target hangs")
        assert stuck.poll() is None  # it really is waiting for the target
    finally:
        hung.thaw()  # first: a close left to do may wait for the target
        if fd >= 0:
            os.close(fd)
    assert _finish(stuck) == errno.ENOENT  # answered once the target answers again
    wait_for(lambda: control_client.status(mount.socket)["backend_calls"] == 0, 10,
             "the calls on the target to end once it answers")


def test_sigterm_ends_the_daemon_while_a_call_hangs_on_the_target(
        hung: HungTarget, spfs_factory: Callable[..., SpfsMount]) -> None:
    mount = spfs_factory("proxy", "--proxy-dir", str(hung.path))
    hung.freeze()
    stuck = _stuck_stat(mount.mountpoint / "never-looked-up")
    wait_for(lambda: hung.waiting() >= 1, 30, "the lookup to reach the stopped target")
    start = time.monotonic()
    mount.proc.send_signal(signal.SIGTERM)
    try:
        code = mount.proc.wait(60)
    except subprocess.TimeoutExpired:
        pytest.fail("spfs did not exit within 60 s of SIGTERM while a call hung on the target")
    elapsed = time.monotonic() - start
    print(f"spfs exited {elapsed:.1f} s after SIGTERM with a worker stuck on the target")
    assert code == 0
    assert "answered EIO" in mount.log.read_text()
    # The caller got EIO rather than waiting for the target (which is still stopped).
    assert _finish(stuck) == errno.EIO
    assert _state(hung.mount.proc.pid) == "T"  # the target never answered


def test_many_callers_at_once_keep_every_byte_and_handle_straight(
        proxy: SpfsMount) -> None:
    mnt, target = proxy.mountpoint, proxy.target
    threads, files_each = 12, 15
    shared_chunk = 64 * 1024
    (mnt / "shared").write_bytes(b"\0" * shared_chunk * threads)
    (mnt / "work").mkdir()

    def content(worker: int, index: int) -> bytes:
        rng = random.Random(worker * 1000 + index)
        return rng.randbytes(rng.randrange(1, 300_000))

    def worker(n: int) -> list[str]:
        problems: list[str] = []
        # Each thread its own region of one shared file, through its own descriptor.
        fd = os.open(mnt / "shared", os.O_RDWR)
        try:
            region = bytes([n + 1]) * shared_chunk
            os.pwrite(fd, region, n * shared_chunk)
            if os.pread(fd, shared_chunk, n * shared_chunk) != region:
                problems.append(f"{n}: shared region read back wrong")
        finally:
            os.close(fd)
        for i in range(files_each):
            data = content(n, i)
            tmp_name, name = mnt / "work" / f".{n}-{i}.tmp", mnt / "work" / f"{n}-{i}"
            with open(tmp_name, "wb") as out:
                out.write(data)
            os.rename(tmp_name, name)
            if name.read_bytes() != data:
                problems.append(f"{name.name}: read back wrong")
            if os.stat(name).st_size != len(data):
                problems.append(f"{name.name}: wrong size")
            if i % 3 == 0:
                os.unlink(name)
        return problems

    with ThreadPoolExecutor(threads) as pool:
        problems = [p for result in pool.map(worker, range(threads)) for p in result]
    assert problems == []
    expected = {f"{n}-{i}": content(n, i) for n in range(threads) for i in range(files_each)
                if i % 3}
    # Both through the mount and on the target itself.
    assert sorted(os.listdir(mnt / "work")) == sorted(os.listdir(target / "work")) \
        == sorted(expected)
    for name, data in expected.items():
        digest = hashlib.sha256(data).hexdigest()
        assert hashlib.sha256((target / "work" / name).read_bytes()).hexdigest() == digest
        assert hashlib.sha256((mnt / "work" / name).read_bytes()).hexdigest() == digest
    shared = (target / "shared").read_bytes()
    assert shared == b"".join(bytes([n + 1]) * shared_chunk for n in range(threads))
    wait_for(lambda: proxy.status()["open_handles"] == 0, 10, "every handle released")
    status = proxy.status()
    assert status["backend_calls"] == 0


def test_commands_wait_for_a_switch_in_progress(
        hung: HungTarget, spfs_factory: Callable[..., SpfsMount], tmp: Path) -> None:
    mount = spfs_factory("proxy", "--proxy-dir", str(tmp / "target"))
    (mount.mountpoint / "known").write_bytes(b"x")
    hung.freeze()
    finished: list[str] = []
    errors: list[BaseException] = []

    def command(name: str, call: Callable[[], object]) -> threading.Thread:
        def run() -> None:
            try:
                call()
                finished.append(name)
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    # The switch holds the lock while it opens the new (stopped) target.
    switch = command("set_mode", lambda: mount.set_mode("proxy", hung.path))
    try:
        wait_for(lambda: hung.waiting() >= 1, 30, "the switch to reach the stopped target")
        invalidate = command("invalidate", lambda: control_client.invalidate(mount.socket))
        # Either it waits for the lock (the positive signal), or it ran in the middle of
        # the switch, which is the failure this checks for.
        wait_for(lambda: mount.status().get("commands_waiting") == 1 or bool(finished), 10,
                 "invalidate waiting for the switch")
        assert finished == [] and errors == []
    finally:
        hung.thaw()
    switch.join(60)
    invalidate.join(60)
    assert errors == []
    assert finished == ["set_mode", "invalidate"]
    assert mount.status()["proxy_dir"] == str(hung.path)


def test_a_switch_rebinds_in_a_worker_while_status_answers(
        hung_slow_to_forget: HungTarget, spfs_factory: Callable[..., SpfsMount],
        tmp: Path) -> None:
    hung = hung_slow_to_forget
    mount = spfs_factory("proxy", "--proxy-dir", str(tmp / "target"))
    # A directory to re-bind (a switch of target drops the kernel's entries of files,
    # so those are looked up afresh instead).
    (mount.mountpoint / "known").mkdir()
    (hung.backing / "known").mkdir()
    (hung.backing / "known" / "f").write_bytes(b"new target")
    os.stat(hung.path)  # its root's attributes now cached: only the re-bind asks the target
    hung.freeze()
    errors: list[BaseException] = []

    def switch() -> None:
        try:
            mount.set_mode("proxy", hung.path)
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)
    thread = threading.Thread(target=switch, daemon=True)
    thread.start()
    try:
        wait_for(lambda: hung.waiting() >= 1, 30, "the re-bind to reach the stopped target")
        status = _status_in_time(mount, "during a re-bind stuck on the target")
        assert status["switching"] and status["mode"] == "proxy"
    finally:
        hung.thaw()
    thread.join(60)
    assert errors == [] and not thread.is_alive()
    assert (mount.mountpoint / "known" / "f").read_bytes() == b"new target"
    assert mount.status()["last_switch"]["rebound"] >= 1
