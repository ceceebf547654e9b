"""Freezing real cgroups, v1 (freezer.state) and v2 (cgroup.freeze)."""

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from spfs.manager.freezer import (CgroupFreezer, FreezeError, FreezePolicy, FreezerVersion,
                                  evacuate, freeze_with_retries, frozen)

POLICY = FreezePolicy(lock_timeout=1, attempt=5, deadline=5, thaw=5)

from manager_helpers import advances, kill_and_reap, stands_still, wait_for

COUNTER = ("import sys, time\n"
           "n = 0\n"
           "while True:\n"
           "    n += 1\n"
           "    open(sys.argv[1], 'w').write(str(n))\n"
           "    time.sleep(0.005)\n")


@pytest.fixture
def counter(cgroup, tmp_path):
    out = tmp_path / "count"
    proc = subprocess.Popen([sys.executable, "-c", COUNTER, str(out)])
    try:
        cgroup.add(proc.pid)
        wait_for(lambda: out.exists() and out.read_text(), what="counter start")
        yield proc, out
    finally:
        cgroup.thaw()
        kill_and_reap(proc)


def test_detects_version(cgroup):
    assert CgroupFreezer(cgroup.path).version is FreezerVersion(cgroup.version)


def test_not_a_cgroup(tmp_path):
    with pytest.raises(FreezeError) as info:
        CgroupFreezer(tmp_path)
    assert info.value.errno == errno.ENOENT


def test_freeze_stops_the_tasks_and_thaw_resumes_them(cgroup, counter):
    _, out = counter
    freezer = CgroupFreezer(cgroup.path)
    freezer.freeze(5)
    try:
        assert cgroup.frozen() and freezer.is_frozen()
        assert stands_still(out)
    finally:
        freezer.thaw(5)
    assert not cgroup.frozen()
    assert advances(out)


def test_context_thaws_when_the_body_fails(cgroup, counter):
    _, out = counter
    with pytest.raises(RuntimeError):
        with frozen(CgroupFreezer(cgroup.path), threading.Lock(), POLICY):
            assert cgroup.frozen()
            raise RuntimeError("swap failed")
    assert not cgroup.frozen() and advances(out)


def test_lock_serialises_replaces_of_one_cgroup(cgroup, counter):
    lock = threading.Lock()
    lock.acquire()  # another replace holds the freezer
    try:
        with pytest.raises(FreezeError) as info:
            with frozen(CgroupFreezer(cgroup.path), lock, FreezePolicy(lock_timeout=0.1)):
                pass
        assert info.value.errno == errno.EBUSY
        assert not cgroup.frozen()
    finally:
        lock.release()


def test_guard_thaws_when_the_freezing_process_is_killed(cgroup, counter):
    """The manager dying while frozen must not leave the container frozen."""
    _, out = counter
    code = ("import sys, threading, time\n"
            "from spfs.manager.freezer import CgroupFreezer, frozen\n"
            "with frozen(CgroupFreezer(sys.argv[1]), threading.Lock()):\n"
            "    print('frozen', flush=True)\n"
            "    time.sleep(60)\n")
    freezer_proc = subprocess.Popen([sys.executable, "-c", code, str(cgroup.path)],
                                    stdout=subprocess.PIPE, text=True)
    try:
        assert freezer_proc.stdout.readline().strip() == "frozen"
        assert cgroup.frozen()
        os.kill(freezer_proc.pid, signal.SIGKILL)
        wait_for(lambda: not cgroup.frozen(), timeout=5, what="guard thaw")
        assert advances(out)
    finally:
        kill_and_reap(freezer_proc)


@pytest.mark.parametrize("armed", [True, False])
def test_armed_guard_finishes_the_replace_before_thawing(cgroup, counter, tmp_path, armed):
    """Killed between the swap and the mount move: an armed guard runs the rest (here: a
    marker written, while the cgroup is still frozen, through a descriptor the rest needs, as
    the mount move needs the real mount's), then thaws; a disarmed one only thaws."""
    _, out = counter
    marker = tmp_path / "finished"
    code = ("import os, sys, threading, time\n"
            "from spfs.manager.freezer import CgroupFreezer, frozen\n"
            "freezer = CgroupFreezer(sys.argv[1])\n"
            "fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o644)\n"
            "def finish():\n"
            "    os.write(fd, str(freezer.is_frozen()).encode())\n"
            "with frozen(freezer, threading.Lock(), finish=finish, keep_fds=(fd,)) as guard:\n"
            "    guard.arm()\n"
            "    if sys.argv[3] == 'no':\n"
            "        guard.disarm()\n"
            "    print('frozen', flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(cgroup.path), str(marker),
                             "yes" if armed else "no"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "frozen"
        os.kill(proc.pid, signal.SIGKILL)
        wait_for(lambda: not cgroup.frozen(), timeout=10, what="guard thaw")
        assert advances(out)
        assert marker.read_text() == ("True" if armed else "")
    finally:
        kill_and_reap(proc)


@pytest.fixture
def blocked_task(cgroup, tmp_path):
    """A task of the cgroup sleeping in a FUSE request that is not answered (a task parked on
    an SPFS stub).  Killing the FUSE daemon (yielded) releases it; it then keeps running."""
    mnt = tmp_path / "fuse"
    mnt.mkdir()
    fs = subprocess.Popen([sys.executable, str(Path(__file__).parent / "blocking_fuse.py"),
                           str(mnt)], stdout=subprocess.PIPE, text=True)
    reader = None
    try:
        assert fs.stdout.readline().strip() == "ready"
        reader = subprocess.Popen([sys.executable, "-c",
                                   "import time\n"
                                   f"try: open({str(mnt / 'block')!r}, 'rb').read(10)\n"
                                   "except OSError: pass\n"
                                   "while True: time.sleep(0.01)\n"])
        cgroup.add(reader.pid)
        wait_for(lambda: Path(f"/proc/{reader.pid}/wchan").read_text() not in ("0", ""),
                 what="reader blocked")
        time.sleep(0.2)
        yield fs
    finally:
        kill_and_reap(fs)  # aborts the connection: the reader gets an error
        if reader is not None:
            kill_and_reap(reader)
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)


def test_freeze_that_cannot_complete_times_out_thawed(cgroup, blocked_task):
    freezer = CgroupFreezer(cgroup.path)
    started = time.monotonic()
    with pytest.raises(FreezeError) as info:
        freezer.freeze(0.5)
    assert info.value.errno == errno.ETIMEDOUT
    assert time.monotonic() - started < 3
    assert freezer.is_thawed() and not cgroup.frozen()


def test_freeze_retries_until_the_blocked_task_is_released(cgroup, blocked_task):
    release = threading.Timer(1.0, blocked_task.kill)
    release.start()
    freezer = CgroupFreezer(cgroup.path)
    try:
        started = time.monotonic()
        freeze_with_retries(freezer, FreezePolicy(attempt=0.3, deadline=10))
        assert cgroup.frozen() and time.monotonic() - started >= 0.9
    finally:
        release.cancel()
        freezer.thaw(5)


def test_freeze_retries_stop_at_the_deadline(cgroup, blocked_task):
    freezer = CgroupFreezer(cgroup.path)
    started = time.monotonic()
    with pytest.raises(FreezeError) as info:
        freeze_with_retries(freezer, FreezePolicy(attempt=0.3, deadline=1.0))
    assert info.value.errno == errno.ETIMEDOUT
    assert 0.9 < time.monotonic() - started < 3 and not cgroup.frozen()


def test_evacuate_moves_only_the_given_pids_to_the_root(cgroup, counter):
    proc, _ = counter
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        child = cgroup.path / "child"
        child.mkdir()
        try:
            (child / "cgroup.procs").write_text(str(helper.pid))
            assert evacuate(cgroup.path, [helper.pid, os.getpid()]) == [helper.pid]
            assert str(helper.pid) not in (child / "cgroup.procs").read_text().split()
            root = Path("/sys/fs/cgroup/freezer" if cgroup.version == "v1"
                        else "/sys/fs/cgroup/unified")
            assert str(helper.pid) in (root / "cgroup.procs").read_text().split()
            assert str(proc.pid) in (cgroup.path / "cgroup.procs").read_text().split()
        finally:
            child.rmdir()
    finally:
        kill_and_reap(helper)
