"""`switch`: the swap engine behind the socket request and behind `spfs-manager switch`."""

import os
import subprocess
import sys

import pytest

from manager_helpers import kill_and_reap, wait_for


@pytest.fixture
def two_mounts(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "sw", str(path)], check=True)
    (a / "f").write_text("")
    (b / "f").write_text("")
    try:
        yield a, b
    finally:
        for path in (a, b):
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def holder(two_mounts, cgroup):
    a, _ = two_mounts
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import os, time\nf = open({str(a / 'f')!r}, 'a')\n"
                             f"os.chdir({str(a)!r})\nprint('ok', flush=True)\n"
                             "while True:\n    f.write('x'); f.flush(); time.sleep(0.01)\n"],
                            stdout=subprocess.PIPE, text=True)
    try:
        cgroup.add(proc.pid)
        assert proc.stdout.readline().strip() == "ok"
        yield proc
    finally:
        kill_and_reap(proc)


def _on(pid: int, path) -> bool:
    dev = os.stat(path).st_dev
    return any(os.stat(f"/proc/{pid}/fd/{fd}").st_dev == dev
               for fd in os.listdir(f"/proc/{pid}/fd")) and \
        os.stat(f"/proc/{pid}/cwd").st_dev == dev


def test_switch_request_moves_a_cgroup(daemon, two_mounts, holder, cgroup):
    a, b = two_mounts
    assert _on(holder.pid, a)
    assert daemon.text(f"switch;source={a};target={b};freeze_cgroup={cgroup.path}") == 0
    assert _on(holder.pid, b) and not _on(holder.pid, a)
    wait_for(lambda: (b / "f").stat().st_size > 0, what="writes on B")
    assert not cgroup.frozen()


def test_switch_request_by_device_is_refused(daemon, two_mounts, cgroup):
    a, b = two_mounts
    reply = daemon.json({"cmd": "switch", "device": os.stat(a).st_dev, "target": str(b),
                         "freeze_cgroup": str(cgroup.path)})
    assert reply["code"] == 95 and "source=" in reply["message"]  # EOPNOTSUPP


def test_manager_cli_switch_delegates_to_the_engine(two_mounts, holder, cgroup):
    a, b = two_mounts
    done = subprocess.run([sys.executable, "-m", "spfs.manager.cli", "switch", "--source",
                           str(a), "--target", str(b), "--cgroup", str(cgroup.path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _on(holder.pid, b)



def test_the_swapper_plans_again_when_the_engine_says_the_tasks_changed(two_mounts, cgroup, caplog):
    """The manager's swap retries with a fresh plan on the engine's SwapChanged (a cwd
    changed between prepare and the stop; a fresh look in /proc cannot see that), decided on
    the error's type: the same words in a plain SwapError do not retry."""
    from spfs.swap import api as swap
    from spfs.manager.interfaces import SwapJob
    from spfs.manager.swapper import SwapEngineAdapter, should_plan_again

    a, b = two_mounts
    for root in (a, b):
        (root / "d1").mkdir()
        (root / "d2").mkdir()
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import os, sys\nos.chdir({str(a / 'd1')!r})\nprint('ok', flush=True)\n"
                             f"sys.stdin.readline()\nos.chdir({str(a / 'd2')!r})\n"
                             "print('moved', flush=True)\nsys.stdin.readline()\n"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        cgroup.add(proc.pid)
        assert proc.stdout.readline().strip() == "ok"
        job = SwapJob(str(cgroup.path), None, (str(a),), os.stat(a).st_dev, str(b))
        swapper = SwapEngineAdapter()
        prepared = swapper.prepare(job)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "moved"
        with caplog.at_level("INFO", logger="spfs.manager.swapper"):
            result = swapper.swap(job, prepared)
        assert result["ok"] and result["committed"] and result["pending_tasks"] == 0
        retried = [r.getMessage() for r in caplog.records if "preparing again" in r.getMessage()]
        assert len(retried) == 1 and "changed after discovery" in retried[0]
        assert os.readlink(f"/proc/{proc.pid}/cwd") == str(b / "d2")
        assert swapper.settle(job, 5.0) == {"pending_tasks": 0, "pending_pids": []}
        assert not cgroup.frozen()

        plan = swap.discover(str(b), str(a), pids=[proc.pid])
        assert should_plan_again(swap.report(plan, None, swap.SwapChanged("cwd changed after discovery")))
        assert not should_plan_again(swap.report(plan, None, swap.SwapError("changed after discovery")))
        assert not should_plan_again(swap.report(plan, None, "process 1 appeared after discovery"))
    finally:
        kill_and_reap(proc)
