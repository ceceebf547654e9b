"""The lab's per-test watchdog (tests/lab/watchdog.py) on the host: a test that pytest-timeout
cannot stop (its SIGALRM never gets through, as for a test stuck in the kernel) is killed
with its process tree, reported failed with where it was stuck, and the session goes on."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFTEST = """
import pytest
from tests.lab import watchdog

@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    watchdog.run_item(item)
    return True
"""

TESTS = """
import os, signal, subprocess, time

def test_stuck(tmp_path_factory):
    helper = subprocess.Popen(["sleep", "3600"])
    with open(os.environ["HELPER_PID_FILE"], "w") as f:
        f.write(str(helper.pid))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # pytest-timeout's way in
    time.sleep(3600)

def test_after_the_stuck_one():
    assert True

def test_failing_normally():
    assert 1 == 2, "an ordinary failure"
"""


def test_a_test_that_cannot_be_interrupted_is_killed_reported_and_the_rest_runs(
        tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_w.py").write_text(TESTS)
    pid_file = tmp_path / "helper.pid"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'src'}", SPFS_LAB_WATCHDOG_GRACE="3",
               HELPER_PID_FILE=str(pid_file))
    xml = tmp_path / "out.xml"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                           "--timeout=2", f"--junitxml={xml}", "-q", "test_w.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    cases = {c.get("name"): c for c in ET.parse(xml).getroot().iter("testcase")}
    stuck = cases["test_stuck"].find("failure")
    assert stuck is not None, out
    assert "lab watchdog: test still running after 5 s" in stuck.get("message", "") + (
        stuck.text or ""), out
    assert "wchan" in (stuck.text or ""), out  # where it was stuck is in the report
    assert cases["test_after_the_stuck_one"].find("failure") is None
    assert "an ordinary failure" in (cases["test_failing_normally"].find("failure").text or "")
    helper = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{helper}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{helper}"), "the stuck test's helper was left running"
    assert took < 60, f"the session took {took:.0f} s"
    print(f"session of 3 tests (one stuck) done in {took:.1f} s")
