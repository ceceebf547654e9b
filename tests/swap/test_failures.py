"""Failure injection at every commit step, and a manager killed at random points."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spfs import swap
from tests.swap.checks import assert_locks_held_by

HARNESS = Path(__file__).with_name("kill_harness.py")


def _kernel_dev(path: Path) -> int:
    st = os.stat(path)
    return os.major(st.st_dev) << 20 | os.minor(st.st_dev)  # as fdinfo prints it (sdev)


def _side(pid: int, a: Path, b: Path) -> str:
    """"A", "B" or "mixed ...": where the victim's fds 3-12, cwd, exe, file mappings and
    inotify watches are."""
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in range(3, 13)]
    devs = {_kernel_dev(a): str(a), _kernel_dev(b): str(b)}
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("inotify wd:"):
                    sdev = int(line.split("sdev:")[1].split()[0], 16)
                    links.append(devs.get(sdev, f"watch on device {sdev:#x}"))
    links.append(os.readlink(f"/proc/{pid}/cwd"))
    links.append(os.readlink(f"/proc/{pid}/exe"))
    links += [line.split(None, 5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
              if len(line.split(None, 5)) == 6]
    sides = {"A" if link.startswith(f"{a}/") or link == str(a) else "B"
             for link in links if link.startswith((f"{a}/", f"{b}/")) or link in (str(a), str(b))}
    return sides.pop() if len(sides) == 1 else f"mixed {links}"


def _on(path_prefix: Path, pid: int) -> bool:
    """Every reference of the victim is under path_prefix (consistent, not half switched)."""
    root = path_prefix.parent
    side = _side(pid, root / "A", root / "B")
    assert not side.startswith("mixed"), f"victim {pid} is half switched: {side}"
    return side == path_prefix.name


def _settled_side(pids: list[int], a: Path, b: Path, fds: dict[int, int] | None = None,
                  timeout: float = 30.0) -> str:
    """The one side every victim is on, once each has finished its table: a task parked
    when the manager died holds its kept references (more fds than `fds`, counted before
    any switch) until it undoes its table, which takes as long as the scheduler makes it wait."""
    deadline = time.monotonic() + timeout
    while True:
        sides = {pid: _side(pid, a, b) for pid in pids}
        # +3: a parked task holds at least its pidfd, the decision pipe, the done counter
        # (and a kept reference per moved fd); a victim thread opens one fd of its own now and then.
        busy = [pid for pid in pids if fds and len(os.listdir(f"/proc/{pid}/fd")) >= fds[pid] + 3]
        if not busy and not any(side.startswith("mixed") for side in sides.values()):
            break
        assert time.monotonic() < deadline, f"victims did not settle: {sides}, still in a table: {busy}"
        time.sleep(0.01)
    assert len(set(sides.values())) == 1, f"victims on different sides or half switched: {sides}"
    return next(iter(sides.values()))


def _state(pid: int) -> tuple[str, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return fields["State"].split()[0], int(fields["TracerPid"])


def _assert_running_untraced(pids: list[int]) -> None:
    for pid in pids:
        state, tracer = _state(pid)
        assert tracer == 0, f"{pid} still traced by {tracer}"
        assert state not in "tT", f"{pid} left stopped ({state})"


@pytest.mark.parametrize("unit,entry", [(0, 0), (0, 1), (0, 9), (0, 23), (0, 999), (1, 0), (1, 12), (2, 999)])
def test_failure_at_each_commit_step_reverts_to_source(mounts, victim_bin, cgroup, unit, entry):
    procs = []
    for i in range(3):
        procs.append(mounts.spawn(victim_bin, "threads", "2", cgroup=cgroup,
                                  workdir=mounts.populate(records=20000, sub=f"v{i}")))
    mounts.wait_ready(3)
    mounts.mirror()
    plan = swap.discover(str(mounts.a), str(mounts.b), cgroup=str(cgroup))
    swap.prepare(plan)
    report = swap.commit(plan, fail=swap.FailPoint(unit=unit, entry=entry))
    assert not report.ok and "injected failure" in report.error
    assert report.phase == "released"
    _assert_running_untraced([p.pid for p in procs])
    for p in procs:
        assert _on(mounts.a, p.pid), "victim not reverted to A"
    assert (cgroup / ("freezer.state" if (cgroup / "freezer.state").exists() else "cgroup.freeze")).read_text().strip() in ("THAWED", "0")
    # Still holding its locks on A after the revert: POSIX (probed with F_GETLK), flock and OFD
    assert_locks_held_by(procs[0].pid, mounts.a / "v0")
    mounts.stop_victims()
    reports = mounts.reports()
    for i, p in enumerate(procs):
        rep = reports[p.pid]
        assert rep["cwd"] == str(mounts.a / f"v{i}")
        assert rep["errors_read"] == "0" and rep["epoll_miss"] == "0" and rep["epoll_eintr"] == "0"
        assert rep["preload"] == "PRELOAD" and rep["pos_equal"] == "1" and rep["append"] == "1"
        assert p.returncode == 0


def _run_harness(source: Path, target: Path, cgroup: Path, kill_after: float | None, how: int) -> dict | None:
    """One switch in a child process, killed `kill_after` seconds after it starts committing."""
    harness = subprocess.Popen([sys.executable, str(HARNESS), str(source), str(target), str(cgroup)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert harness.stdout.readline().strip() == "go"
        if kill_after is not None:
            time.sleep(kill_after)
            harness.send_signal(how)
        out, err = harness.communicate(timeout=30)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(10)
    if kill_after is None and not out.strip():  # not killed: it must have reported
        raise AssertionError(f"the harness exited {harness.returncode} without a report: {err[-3000:]}")
    return json.loads(out) if out.strip() else None


def _wait_thawed(cgroup: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while True:  # the watchdog thaws the cgroup after a SIGKILL
        frozen = ((cgroup / "freezer.state").read_text().strip() != "THAWED"
                  if (cgroup / "freezer.state").exists() else "frozen 1" in (cgroup / "cgroup.events").read_text())
        if not frozen or time.monotonic() > deadline:
            return not frozen
        time.sleep(0.02)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_manager_killed_at_random_points(mounts, victim_bin, cgroup, how):
    """Kill the switching process at random points over its whole commit: every victim ends
    all on A or all on B (all on B only if the commit had completed), never some on each
    side or one half switched; none stopped, traced, frozen or dead; every victim's own
    per-iteration check (cwd and fds on one filesystem) never saw a mix."""
    rng = random.Random(1234 + how)
    procs = []
    for i in range(6):
        workdir = mounts.populate(records=60000, sub=f"v{i}")
        binary, extra = victim_bin, ()
        if i < 2:  # two with file mappings on the mount, one of them running from it
            mounts.add_mapped_files(workdir)
            extra = ("maps", "inotify")
            if i == 0:
                binary = mounts.install_binary(victim_bin, workdir)
        procs.append(mounts.spawn(binary, "threads", "2", *extra, cgroup=cgroup, workdir=workdir))
    mounts.wait_ready(6)
    mounts.mirror()
    pids = [p.pid for p in procs]
    fds = {pid: len(os.listdir(f"/proc/{pid}/fd")) for pid in pids}
    a, b = mounts.a, mounts.b
    # One whole switch first, to spread the kills over the commit's real duration.
    calibration = _run_harness(a, b, cgroup, None, how)
    assert calibration and calibration["ok"], calibration
    assert _settled_side(pids, a, b, fds) == "B"
    span = calibration["commit_s"] * 1.2
    trials = int(os.environ.get("SPFS_KILL_TRIALS", "12"))
    outcomes: dict[str, int] = {}
    for trial in range(trials):
        side_before = _settled_side(pids, a, b, fds)
        source, target = (a, b) if side_before == "A" else (b, a)
        report = _run_harness(source, target, cgroup, rng.uniform(0, span), how)
        assert _wait_thawed(cgroup), f"trial {trial}: cgroup left frozen"
        dead = [(p.pid, p.returncode) for p in procs if p.poll() is not None]
        assert not dead, f"trial {trial}: victims died: {dead}"
        _assert_running_untraced(pids)
        try:
            side = _settled_side(pids, a, b, fds)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial} ({source} -> {target}, report {report}): {exc}") from None
        moved = side != side_before
        if report is not None:  # finished (SIGTERM: reverted, or too late to matter)
            assert moved == report["ok"], f"trial {trial}: report says ok={report['ok']}, victims moved={moved}"
        key = f"{'finished' if report else 'killed'}, {'moved' if moved else 'stayed'}"
        outcomes[key] = outcomes.get(key, 0) + 1
    mounts.stop_victims()
    reports = mounts.reports()
    for p in procs:
        rep = reports[p.pid]
        assert p.returncode == 0
        assert rep["mixed"] == "0", "a victim saw its cwd and fds on different mounts"
        assert rep["errors_read"] == "0" and rep["epoll_miss"] == "0" and rep["epoll_eintr"] == "0"
        assert rep["errors_fifo"] == "0" and rep["pos_equal"] == "1" and rep["errors_map"] == "0"
    print(outcomes)
    if how == signal.SIGKILL and trials >= 12:
        assert any(k.startswith("killed") for k in outcomes), f"no trial was killed mid-way: {outcomes}"


@pytest.mark.parametrize("entry", [0, 35, 45, 55, 70, 999])
def test_failure_while_moving_mappings_and_exe_reverts(mounts, victim_bin, entry):
    mounts.populate()
    mounts.add_mapped_files()
    exe = mounts.install_binary(victim_bin)
    proc = mounts.spawn(exe, "maps")
    mounts.wait_ready(1)
    mounts.mirror()
    plan = swap.discover(str(mounts.a), str(mounts.b), pids=[proc.pid])
    swap.prepare(plan)
    report = swap.commit(plan, fail=swap.FailPoint(unit=0, entry=entry))
    assert not report.ok and "injected failure" in report.error
    _assert_running_untraced([proc.pid])
    assert os.readlink(f"/proc/{proc.pid}/exe") == str(exe)
    assert str(mounts.b) not in Path(f"/proc/{proc.pid}/maps").read_text()
    assert _on(mounts.a, proc.pid)
    mounts.wait_iterations()  # it goes on, on A
    mounts.stop_victims()
    rep = mounts.reports()[proc.pid]
    assert rep["errors_map"] == "0" and rep["errors_read"] == "0" and rep["cwd"] == str(mounts.a)
    assert proc.returncode == 0
