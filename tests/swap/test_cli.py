"""The switch command, run as a separate process like an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spfs.swap.cli", *args], capture_output=True, text=True, timeout=60)


def test_dry_run_lists_everything_and_stops_nothing(mounts, victim_bin):
    mounts.populate()
    mounts.add_mapped_files()
    proc = mounts.spawn(victim_bin, "maps", "threads", "2")
    mounts.wait_ready(1)
    out = _cli("--source", str(mounts.a), "--target", str(mounts.b), "--pid", str(proc.pid), "--dry-run", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    (p,) = plan["processes"]
    assert p["pid"] == proc.pid and len(p["threads"]) == 3
    assert {f["path"] for f in p["fds"]} >= {"log.txt", "shared.txt", "ro.txt", "fifo", "lock.txt"}
    shared = [f for f in p["fds"] if f["path"] == "shared.txt"]
    assert len(shared) == 2 and shared[0]["description"] == shared[1]["description"]
    assert p["epoll"] and p["dirs"] == [{"kind": "cwd", "path": ""}]
    assert {m["path"] for m in p["mappings"]} == {"shared.map", "private.map"}
    text = _cli("--source", str(mounts.a), "--target", str(mounts.b), "--pid", str(proc.pid), "--dry-run")
    assert "shared.txt" in text.stdout and "mapping" in text.stdout
    assert os.readlink(f"/proc/{proc.pid}/cwd") == str(mounts.a)
    assert "TracerPid:\t0" in open(f"/proc/{proc.pid}/status").read()


def test_switch_command_moves_and_reports_json(mounts, victim_bin, cgroup):
    mounts.populate()
    mounts.spawn(victim_bin, cgroup=cgroup)
    mounts.wait_ready(1)
    mounts.mirror()
    out = _cli("--source", str(mounts.a), "--target", str(mounts.b), "--cgroup", str(cgroup), "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] and report["processes"] == 1 and report["fds_moved"] == 10
    print(f"stop window {report['stop_window_s'] * 1e3:.1f} ms")
    assert 0 < report["stop_window_s"] < 10  # ~10x the usual; a shared, loaded host
    assert report["pending_tasks"] == 0  # nothing holds A any more: no wait before the umount
    assert subprocess.run(["umount", str(mounts.a)]).returncode == 0


def test_bad_input_is_refused_clearly(mounts):
    out = _cli("--source", str(mounts.a / "missing"), "--target", str(mounts.b), "--pid", "1")
    assert out.returncode == 2 and "No such file" in out.stderr
    out = _cli("--source", str(mounts.a), "--target", str(mounts.b), "--pid", str(os.getpid()))
    assert out.returncode == 2 and "manager itself" in out.stderr
    out = _cli("--source", str(mounts.a), "--target", str(mounts.b), "--cgroup", str(mounts.root))
    assert out.returncode == 2 and "not a cgroup" in out.stderr


def test_missing_file_on_target_is_refused_before_stopping(mounts, victim_bin, cgroup):
    mounts.populate()
    proc = mounts.spawn(victim_bin, cgroup=cgroup)
    mounts.wait_ready(1)
    out = _cli("--source", str(mounts.a), "--target", str(mounts.b), "--cgroup", str(cgroup))
    assert out.returncode == 2 and "prepare failed" in out.stderr and "No such file" in out.stderr
    state = (cgroup / ("freezer.state" if (cgroup / "freezer.state").exists() else "cgroup.freeze")).read_text()
    assert state.strip() in ("THAWED", "0")
    assert "TracerPid:\t0" in open(f"/proc/{proc.pid}/status").read()
    assert os.readlink(f"/proc/{proc.pid}/cwd") == str(mounts.a)


def test_run_switch_from_a_worker_thread(mounts, victim_bin):
    """The manager calls run_switch from its own threads: no signal handler set-up there."""
    import argparse
    import threading

    from spfs.swap import cli

    mounts.populate()
    proc = mounts.spawn(victim_bin)
    mounts.wait_ready(1)
    mounts.mirror()
    parser = argparse.ArgumentParser()
    cli.add_switch_arguments(parser)
    args = parser.parse_args(["--source", str(mounts.a), "--target", str(mounts.b), "--pid", str(proc.pid), "--json"])
    result = []
    worker = threading.Thread(target=lambda: result.append(cli.run_switch(args)))
    worker.start()
    worker.join(60)
    assert result == [0]
    assert os.readlink(f"/proc/{proc.pid}/cwd") == str(mounts.b)
