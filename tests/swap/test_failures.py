"""Failure injection at every commit step, and a manager killed at random points."""

from __future__ import annotations

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

HARNESS = Path(__file__).with_name("kill_harness.py")


def _on(path_prefix: Path, pid: int) -> bool:
    """Every reference of the victim is under path_prefix (consistent, not half switched)."""
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in range(3, 13)]
    links.append(os.readlink(f"/proc/{pid}/cwd"))
    on = [link.startswith(str(path_prefix)) for link in links]
    assert all(on) or not any(on), f"victim {pid} is half switched: {links}"
    return all(on)


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
    time.sleep(0.1)
    # Still holding its POSIX lock on A after the revert:
    assert subprocess.run(["flock", "-n", str(mounts.a / "v0" / "flock.txt"), "true"]).returncode != 0
    mounts.stop_victims()
    reports = mounts.reports()
    for i, p in enumerate(procs):
        rep = reports[p.pid]
        assert rep["cwd"] == str(mounts.a / f"v{i}")
        assert rep["errors_read"] == "0" and rep["epoll_miss"] == "0" and rep["epoll_eintr"] == "0"
        assert rep["preload"] == "PRELOAD" and rep["pos_equal"] == "1" and rep["append"] == "1"
        assert p.returncode == 0


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_manager_killed_at_random_points(mounts, victim_bin, cgroup, how):
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
    trials = int(os.environ.get("SPFS_KILL_TRIALS", "10"))
    outcomes = {"finished": 0, "killed": 0}
    for trial in range(trials):
        source, target = (mounts.a, mounts.b) if trial % 2 == 0 else (mounts.b, mounts.a)
        harness = subprocess.Popen([sys.executable, str(HARNESS), str(source), str(target), str(cgroup)],
                                   stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert harness.stdout.readline().strip() == "go"
        time.sleep(rng.uniform(0, 0.008))
        harness.send_signal(how)
        out, _ = harness.communicate(timeout=20)
        outcomes["finished" if out.strip() else "killed"] += 1
        on_target = sum(1 for pid in pids if _on(target, pid))
        outcomes[f"moved {on_target}/{len(pids)}"] = outcomes.get(f"moved {on_target}/{len(pids)}", 0) + 1
        if how == signal.SIGTERM and out.strip():
            report = json.loads(out)
            if not report["ok"]:
                for pid in pids:
                    assert _on(source, pid), "aborted switch did not revert"
        deadline = time.monotonic() + 5
        while True:  # the watchdog thaws the cgroup after a SIGKILL
            frozen = ((cgroup / "freezer.state").read_text().strip() != "THAWED"
                      if (cgroup / "freezer.state").exists() else (cgroup / "cgroup.events").read_text().find("frozen 1") >= 0)
            if not frozen or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert not frozen, f"trial {trial}: cgroup left frozen"
        dead = [(p.pid, p.returncode) for p in procs if p.poll() is not None]
        assert not dead, f"trial {trial}: victims died: {dead}"
        _assert_running_untraced(pids)
        for pid in pids:
            _on(mounts.a, pid)  # all on A or all on B, never half
        assert all(p.poll() is None for p in procs), f"trial {trial}: a victim died"
    mounts.stop_victims()
    reports = mounts.reports()
    for p in procs:
        rep = reports[p.pid]
        assert p.returncode == 0
        assert rep["errors_read"] == "0" and rep["epoll_miss"] == "0" and rep["epoll_eintr"] == "0"
        assert rep["errors_fifo"] == "0" and rep["pos_equal"] == "1" and rep["errors_map"] == "0"
    print(outcomes)


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
    time.sleep(0.1)
    mounts.stop_victims()
    rep = mounts.reports()[proc.pid]
    assert rep["errors_map"] == "0" and rep["errors_read"] == "0" and rep["cwd"] == str(mounts.a)
    assert proc.returncode == 0
