"""flock and OFD locks are taken on B by the tasks themselves (issue 17 item 1): the kernel
records a flock's taker as its holder, in /proc/locks and fdinfo, where CRIU's dump and
people read it; the manager must not appear there (a dead pid once it exits)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from spfs import swap
from tests.swap.checks import assert_locks_held_by

TRY_FLOCK = ("import fcntl, sys\n"
             "f = open(sys.argv[1], 'r+b')\n"
             "try:\n"
             "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError:\n"
             "    sys.exit(1)\n")

def _proc_locks(path: Path) -> list[tuple[str, str, int]]:
    """(kind, access, pid) of each lock /proc/locks lists on the file (waiters left out)."""
    st = os.stat(path)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    out = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[5] != where:
            continue
        out.append((fields[1], fields[3], int(fields[4])))
    return out

def _fdinfo_locks(pid: int, path: Path) -> list[tuple[str, str, int]]:
    """The "lock:" lines of the victim's fd on `path`, as (kind, access, pid)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
            text = Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
            return [(f[2], f[4], int(f[5])) for f in (line.split() for line in text.splitlines())
                    if f and f[0] == "lock:"]
    raise AssertionError(f"process {pid} has no fd on {path}")

def _other_process_gets_flock(path: Path) -> bool:
    run = subprocess.run([sys.executable, "-c", TRY_FLOCK, str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode in (0, 1), run.stderr
    return run.returncode == 0

def _wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)

def test_flock_holder_is_the_task_after_the_switch(mounts, victim_bin):
    mounts.populate()
    proc = mounts.spawn(victim_bin)
    mounts.wait_ready(1)
    mounts.wait_iterations()
    assert _proc_locks(mounts.a / "flock.txt") == [("FLOCK", "WRITE", proc.pid)]
    mounts.mirror()
    plan = swap.discover(str(mounts.a), str(mounts.b), pids=[proc.pid])
    swap.prepare(plan)
    report = swap.commit(plan, on_stopped=mounts.sync_contents)
    assert report.ok, report.error
    assert subprocess.run(["umount", str(mounts.a)]).returncode == 0, "A still busy after the switch"

    flock_file = mounts.b / "flock.txt"
    assert _proc_locks(flock_file) == [("FLOCK", "WRITE", proc.pid)], \
        f"/proc/locks must name the victim {proc.pid}, not the manager {os.getpid()}"
    assert _fdinfo_locks(proc.pid, flock_file) == [("FLOCK", "WRITE", proc.pid)]
    assert not _other_process_gets_flock(flock_file), "flock not held on B"
    # OFD locks are the description's: /proc/locks shows no pid for them (-1)
    assert _proc_locks(mounts.b / "ofd.txt") == [("OFDLCK", "WRITE", -1)]
    assert_locks_held_by(proc.pid, mounts.b)
    me = os.getpid()
    for name in ("flock.txt", "ofd.txt", "lock.txt"):
        assert all(pid != me for _, _, pid in _proc_locks(mounts.b / name)), f"the manager holds a lock on {name}"

    mounts.wait_iterations()  # the victim goes on, on B
    mounts.stop_victims()
    # nothing but the victim held it: gone with the victim
    _wait_for(lambda: _proc_locks(flock_file) == [], "the flock to go with its holder")
    assert _other_process_gets_flock(flock_file)

def test_flock_held_on_b_by_someone_else_reverts_the_switch(mounts, victim_bin):
    """The check is in the task's table, before the commit point: the switch reverts."""
    mounts.populate()
    proc = mounts.spawn(victim_bin)
    mounts.wait_ready(1)
    mounts.wait_iterations()
    mounts.mirror()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'r+b'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('held', flush=True); sys.stdin.read()",
                               str(mounts.b / "flock.txt")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        plan = swap.discover(str(mounts.a), str(mounts.b), pids=[proc.pid])
        swap.prepare(plan)
        report = swap.commit(plan)
        assert not report.ok and report.phase == "released" and not report.committed
        assert "flock" in report.error and "flock.txt" in report.error, report.error
        assert isinstance(report.failure, swap.SwapError)
    finally:
        holder.stdin.close()
        holder.wait(30)
    # every reference back on A, its locks on A its own
    assert all(os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith(str(mounts.a))
               for fd in os.listdir(f"/proc/{proc.pid}/fd")
               if os.readlink(f"/proc/{proc.pid}/fd/{fd}").startswith((str(mounts.a), str(mounts.b))))
    assert _proc_locks(mounts.a / "flock.txt") == [("FLOCK", "WRITE", proc.pid)]
    assert_locks_held_by(proc.pid, mounts.a)
    # nothing of the reverted switch keeps a lock on B
    _wait_for(lambda: _proc_locks(mounts.b / "flock.txt") == [], "B's flock.txt to be free")
    mounts.wait_iterations()
    mounts.stop_victims()
    assert proc.returncode == 0
