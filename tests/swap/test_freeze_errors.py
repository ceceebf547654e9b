"""Errors after the switch itself (issue 13 item 6): a final thaw that fails, and tasks let
go before they finished their table, are reported, not swallowed.  Everything here happens
for real: a cgroup kept frozen by its parent, tasks kept frozen by the caller."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spfs import swap
from tests.swap.checks import check_report


def _freeze_file(cgroup: Path) -> Path:
    return cgroup / ("freezer.state" if (cgroup / "freezer.state").exists() else "cgroup.freeze")


def _set_frozen(cgroup: Path, frozen: bool) -> None:
    v1 = (cgroup / "freezer.state").exists()
    _freeze_file(cgroup).write_text(("FROZEN" if frozen else "THAWED") if v1 else ("1" if frozen else "0"))


def _is_frozen(cgroup: Path) -> bool:
    if (cgroup / "freezer.state").exists():
        return (cgroup / "freezer.state").read_text().strip() == "FROZEN"
    return "frozen 1" in (cgroup / "cgroup.events").read_text().splitlines()


def _wait(what: str, predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _watch_devs(pid: int) -> set[int]:
    """The devices (as fdinfo prints them) the process's inotify watches are on."""
    devs = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("inotify wd:"):
                    devs.add(int(line.split("sdev:")[1].split()[0], 16))
    return devs


def _kernel_dev(path: Path) -> int:
    st = os.stat(path)
    return os.major(st.st_dev) << 20 | os.minor(st.st_dev)


def _untraced_running(pid: int) -> bool:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["TracerPid"]) == 0 and fields["State"].split()[0] not in "tT"


@pytest.fixture
def child_cgroup(cgroup: Path):
    """A cgroup below the test's: freezing its parent keeps it frozen whatever is written
    into its own freezer file (the parent is cleaned up by the `cgroup` fixture)."""
    child = cgroup / "child"
    child.mkdir()
    try:
        yield child
    finally:
        _set_frozen(cgroup, False)
        _set_frozen(child, False)
        for pid in (child / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        _wait("the child cgroup to empty", lambda: not (child / "cgroup.procs").read_text().split())
        _wait("the child cgroup to go", lambda: _try_rmdir(child))


def _try_rmdir(path: Path) -> bool:
    try:
        path.rmdir()
        return True
    except OSError:
        return False


def test_a_final_thaw_that_fails_is_logged_and_reported(mounts, cgroup, child_cgroup, caplog):
    """The engine freezes the cgroup and must thaw it at the end; here its parent gets frozen
    while the tasks are stopped, so the thaw cannot take effect.  The switch itself commits
    (the victim's only reference, an inotify watch, is moved by the manager side), then the
    report says ok=False, ThawFailed, the cgroup left frozen, and the log says so too."""
    (mounts.a / "watched").mkdir()
    (mounts.b / "watched").mkdir()
    script = ("import ctypes, os, time\n"
              "libc = ctypes.CDLL(None, use_errno=True)\n"
              "fd = libc.inotify_init1(os.O_CLOEXEC)\n"
              f"assert libc.inotify_add_watch(fd, {str(mounts.a / 'watched').encode()!r}, 0x100) >= 0\n"
              f"open({str(mounts.ctrl / 'ready.1')!r}, 'w').close()\n"
              "while True: time.sleep(0.01)\n")
    victim = subprocess.Popen([sys.executable, "-c", script], cwd="/",
                              preexec_fn=lambda: (child_cgroup / "cgroup.procs").write_text(str(os.getpid())))
    mounts.procs.append(victim)
    mounts.wait_ready(1)
    assert _watch_devs(victim.pid) == {_kernel_dev(mounts.a)}
    plan = swap.discover(str(mounts.a), str(mounts.b), cgroup=str(child_cgroup))
    assert plan.unmovable == []
    swap.prepare(plan)

    def freeze_the_parent() -> None:
        _set_frozen(cgroup, True)  # stopped (traced) tasks count as frozen: at once
        _wait("the parent cgroup to freeze", lambda: _is_frozen(cgroup), 10)

    with caplog.at_level(logging.ERROR, logger="spfs.swap"):
        report = swap.commit(plan, timeout=1.0, on_stopped=freeze_the_parent)
    assert not report.ok and report.committed and report.phase == "released"
    assert isinstance(report.failure, swap.ThawFailed) and report.error_kind == "ThawFailed"
    assert report.failure.frozen is True and "left frozen" in report.error
    assert str(child_cgroup) in report.error and report.watches_moved == 1
    assert any("could not thaw" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)
    assert _is_frozen(child_cgroup), "the report says frozen: it must be"
    _set_frozen(cgroup, False)
    _wait("the victim's cgroup to thaw", lambda: not _is_frozen(child_cgroup))
    assert _untraced_running(victim.pid)
    assert _watch_devs(victim.pid) == {_kernel_dev(mounts.b)}, "committed: the watch is on B"


def _caller_frozen_commit(mounts, victim_bin, cgroup: Path):
    mounts.populate(records=2000)
    proc = mounts.spawn(victim_bin, cgroup=cgroup)
    mounts.wait_ready(1)
    mounts.mirror()
    plan = swap.discover(str(mounts.a), str(mounts.b), cgroup=str(cgroup))
    assert plan.unmovable == []
    swap.prepare(plan)
    _set_frozen(cgroup, True)
    _wait("the cgroup to freeze", lambda: _is_frozen(cgroup))
    report = swap.commit(plan, on_stopped=mounts.sync_contents)
    assert report.ok and report.committed, report.error
    # Parked, let go and frozen again before running on: still holding its kept references
    assert report.pending_tasks == 1 and report.pending_pids == [proc.pid]
    assert _is_frozen(cgroup)
    umount = subprocess.run(["umount", str(mounts.a)], capture_output=True, text=True)
    assert umount.returncode != 0 and "busy" in umount.stderr, "a pending task must still hold A"
    return plan, proc


def test_a_commit_into_a_frozen_cgroup_reports_its_pending_tasks_until_settled(mounts, victim_bin, cgroup):
    """The manager's way: the caller freezes, commits, thaws, then settles.  Until the thaw
    the report's pending task holds A; once settled nothing does."""
    plan, proc = _caller_frozen_commit(mounts, victim_bin, cgroup)
    _set_frozen(cgroup, False)
    assert swap.settle(plan, 20.0) == (0, [])
    assert plan.unsettled is None
    assert subprocess.run(["umount", str(mounts.a)]).returncode == 0, "A still busy once settled"
    mounts.stop_victims()
    check_report(mounts.reports()[proc.pid], mounts.b)


def test_tasks_that_do_not_finish_in_time_are_named(mounts, victim_bin, cgroup):
    """Settled while the cgroup is still frozen: the wait runs out and the task is named,
    found inside its table; thawed, it finishes on its own and lets A go."""
    plan, proc = _caller_frozen_commit(mounts, victim_bin, cgroup)
    assert swap.settle(plan, 0.3) == (1, [proc.pid])
    _set_frozen(cgroup, False)
    _wait("A to be let go", lambda: subprocess.run(["umount", str(mounts.a)]).returncode == 0)
    mounts.stop_victims()
    check_report(mounts.reports()[proc.pid], mounts.b)
