"""The dumped tree left stopped by criu-spfs dump (spfs.criu.source), on real processes and
a real network namespace of the test's own: resumed (running again, CRIU's network lock and
our marking chain gone) or released (killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from spfs.criu.source import StoppedSource, process_tree, unlock_network


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _wait(what: str, check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def stopped_tree() -> Iterator[subprocess.Popen]:
    """A shell with two children, in a network namespace of its own, every task stopped
    as `criu dump --leave-stopped` leaves them."""
    proc = subprocess.Popen(["unshare", "-n", "sh", "-c", "sleep 1000 & sleep 1000 & wait"])
    try:
        _wait("the tree", lambda: len(process_tree(proc.pid)) >= 3)  # unshare execs sh
        for pid in process_tree(proc.pid):
            os.kill(pid, signal.SIGSTOP)
        _wait("every task stopped", lambda: all(_state(p) == "T" for p in process_tree(proc.pid)))
        yield proc
    finally:
        for pid in reversed(process_tree(proc.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(10)


def _in_netns(pid: int, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True,
                          text=True, timeout=30, check=False)


def _lock_like_criu(pid: int) -> None:
    """The rules a dump leaves in the container's netns: CRIU's lock (iptables flavour and
    nftables flavour) and the action script's mangle chain."""
    steps = [
        ["iptables", "-w", "-N", "CRIU"],
        ["iptables", "-w", "-A", "CRIU", "-m", "mark", "--mark", "0xC114", "-j", "ACCEPT"],
        ["iptables", "-w", "-A", "CRIU", "-j", "DROP"],
        ["iptables", "-w", "-I", "INPUT", "-j", "CRIU"],
        ["iptables", "-w", "-I", "OUTPUT", "-j", "CRIU"],
        ["iptables", "-w", "-t", "mangle", "-N", "SPFS-NFS"],
        ["iptables", "-w", "-t", "mangle", "-I", "OUTPUT", "-j", "SPFS-NFS"],
        ["iptables", "-w", "-t", "mangle", "-I", "PREROUTING", "-j", "SPFS-NFS"],
        ["nft", "add", "table", "inet", f"CRIU-{pid}"],
    ]
    for argv in steps:
        done = _in_netns(pid, *argv)
        assert done.returncode == 0, f"{argv}: {done.stderr}"


def _rules(pid: int) -> str:
    return "\n".join(_in_netns(pid, *argv).stdout for argv in (
        ["iptables", "-w", "-S"], ["iptables", "-w", "-t", "mangle", "-S"], ["nft", "list", "tables"]))


def test_resume_undoes_the_network_lock_and_lets_every_task_run(stopped_tree) -> None:
    root = stopped_tree.pid
    _lock_like_criu(root)
    assert "CRIU" in _rules(root) and "SPFS-NFS" in _rules(root)
    source = StoppedSource.of(root)
    assert len(source.tasks) >= 3 and source.tasks[0] == root
    assert source.resume() == []
    rules = _rules(root)
    assert "CRIU" not in rules and "SPFS-NFS" not in rules, rules
    _wait("every task running again",
          lambda: all(_state(p) in ("S", "R") for p in source.tasks))


def test_unlock_leaves_a_netns_without_a_lock_alone(stopped_tree) -> None:
    before = _rules(stopped_tree.pid)
    assert unlock_network(stopped_tree.pid) == []
    assert _rules(stopped_tree.pid) == before


def test_release_kills_every_task(stopped_tree) -> None:
    source = StoppedSource.of(stopped_tree.pid)
    source.release(timeout=20)
    stopped_tree.wait(10)  # our child: reaped here, after release saw it die
    _wait("the children gone", lambda: all(not os.path.exists(f"/proc/{p}") or _state(p) == "Z"
                                           for p in source.tasks[1:]))
