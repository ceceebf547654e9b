"""run_criu's bound holds even for a criu that a kill cannot end: a task in an
uninterruptible wait dies only when that wait ends, and subprocess.run waits for a killed
child without a bound (the lab run of issue 13 hung 45 minutes past every timeout)."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from spfs.criu import runner
from spfs.criu.runner import CriuError, run_criu
from tests.fs.spfs_testlib import SpfsMount, start_spfs

# Opens a file on FUSE, says so, and closes it when told: with the daemon stopped that close
# (a FLUSH, which the kernel waits for uninterruptibly once a fatal signal came) is a D-state
# wait that SIGKILL does not end, and so is the close at exit.
STUCK_CRIU = """
import os, sys, time
fd = os.open(sys.argv[2], os.O_RDWR)
open(sys.argv[3], "w").close()
while not os.path.exists(sys.argv[4]):
    time.sleep(0.01)
os.close(fd)
"""


@pytest.fixture
def proxy() -> Iterator[SpfsMount]:
    tmp = Path(tempfile.mkdtemp(prefix="spfs-runner-"))
    (tmp / "target").mkdir()
    mount = start_spfs(tmp / "mnt", "proxy", tmp, "--proxy-dir", str(tmp / "target"))
    try:
        yield mount
    finally:
        mount.proc.send_signal(signal.SIGCONT)  # whatever the test did to it
        mount.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def test_a_criu_that_a_kill_cannot_end_does_not_hold_the_caller(proxy: SpfsMount,
                                                                monkeypatch) -> None:
    monkeypatch.setattr(runner, "KILL_GRACE", 2.0)
    (proxy.mountpoint / "f").write_text("x")
    tmp = proxy.mountpoint.parent
    opened, go = tmp / "opened", tmp / "go"
    argv = [sys.executable, "-c", STUCK_CRIU, "restore", str(proxy.mountpoint / "f"),
            str(opened), str(go)]
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            run_criu(argv, tmp / "restore.log", timeout=3.0)
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001 -- checked below
            outcome.append(e)

    caller = threading.Thread(target=call, daemon=True)
    t0 = time.monotonic()
    caller.start()
    wait_for(opened.exists, 30, "the fake criu to open its file on FUSE")
    os.kill(proxy.proc.pid, signal.SIGSTOP)
    try:
        go.touch()
        caller.join(3.0 + 2.0 + 20)
        took = time.monotonic() - t0
        assert not caller.is_alive(), "run_criu still waits for a child a kill cannot end"
    finally:
        os.kill(proxy.proc.pid, signal.SIGCONT)
    err = outcome[0]
    assert isinstance(err, CriuError), err
    assert "did not finish in 3 s" in str(err) and "did not die when killed" in str(err)
    assert " state D " in str(err), str(err)  # the report shows where it is stuck
    print(f"run_criu returned after {took:.1f} s (timeout 3 s, kill grace 2 s)")
    caller.join(5)
