"""Each lab test in a forked child that the session waits for with a hard bound.

pytest-timeout alone cannot bound a lab test: its SIGALRM only raises in the test's main
thread once that thread is back in Python, and the unwinding that follows may wait again
(subprocess.run waits for a killed child without a bound, and a task in an uninterruptible
wait, D state, dies only when that wait ends). In issue 13 one stuck test held the whole lab
run until its 3000 s limit and every later result was lost. A process stuck in the kernel
cannot be made to return, so the bound must live in another process: the session forks one
child per test and waits for it (pidfd, deadline); on expiry it records where the child
and its descendants are stuck (state, wchan, kernel stacks), SIGKILLs the tree, reports the
test failed with that dump, and goes on, without waiting for a child that will not die.

Fork, not a fresh pytest per test: no 0.6 s Python start and no re-import per test under
emulation, and the child runs the very item the session collected. The session process has
no other threads when it forks (the guest's pytest runs nothing else).
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
from _pytest.reports import TestReport
from _pytest.runner import runtestprotocol

from spfs.sys.children import descendants, describe_stuck, process_state

GRACE = float(os.environ.get("SPFS_LAB_WATCHDOG_GRACE", "120"))  # past the test's own timeout: for its teardown to destroy its containers
REAP_WAIT = 10.0  # for the killed tree to go before it is reported as left


@dataclass
class ChildResult:
    reports: list[TestReport] = field(default_factory=list)
    status: int | None = None  # wait status; None if it did not end
    stuck: str = ""  # the dump taken at expiry


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def dump_tree(pid: int) -> str:
    parts = []
    for p in [pid, *descendants(pid)]:
        parts.append(f"== {p} [{process_state(p) or 'gone'}] {_cmdline(p)}\n{describe_stuck(p)}")
    return "\n".join(parts)


def kill_tree(pid: int) -> None:
    """SIGSTOP first so nothing forks more meanwhile, then SIGKILL, children before parent."""
    tree = [pid, *descendants(pid)]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in reversed(tree):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass


def run_forked(item: pytest.Item, limit: float, alarm: float,
               in_child: Callable[[], None]) -> ChildResult:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # the child: run the item, send its reports, never return into pytest
        code = 1
        try:
            os.close(read_end)
            in_child()
            if alarm > 0:  # pytest-timeout's alarm does not survive fork; its handler does
                signal.setitimer(signal.ITIMER_REAL, alarm)
            reports = runtestprotocol(item, log=False, nextitem=None)
            data = json.dumps([item.config.hook.pytest_report_to_serializable(
                config=item.config, report=r) for r in reports]).encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    return _wait_child(item, pid, read_end, limit)


def _wait_child(item: pytest.Item, pid: int, read_end: int, limit: float) -> ChildResult:
    result = ChildResult()
    pidfd = os.pidfd_open(pid)
    data = b""
    deadline = time.monotonic() + limit
    try:
        open_fds = [read_end, pidfd]
        while pidfd in open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                result.stuck = dump_tree(pid)
                kill_tree(pid)
                break
            ready = select.select(open_fds, [], [], min(left, 60))[0]
            if read_end in ready:
                chunk = os.read(read_end, 1 << 16)
                data += chunk
                if not chunk:
                    open_fds.remove(read_end)
            if pidfd in ready:
                open_fds.remove(pidfd)
        while read_end in open_fds and select.select([read_end], [], [], 0)[0]:
            chunk = os.read(read_end, 1 << 16)  # what it wrote just before it exited
            if not chunk:
                break
            data += chunk
        reap_by = time.monotonic() + REAP_WAIT
        while result.status is None and time.monotonic() < reap_by:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                result.status = status
            else:
                select.select([pidfd], [], [], 0.2)
    finally:
        os.close(pidfd)
        os.close(read_end)
    if data and not result.stuck:
        try:
            result.reports = [item.config.hook.pytest_report_from_serializable(
                config=item.config, data=d) for d in json.loads(data)]
        except ValueError:
            pass
    return result


def failure_reports(item: pytest.Item, text: str, seconds: float) -> list[TestReport]:
    """setup passed, call failed with `text`, teardown passed: one failure per stuck test."""
    def report(when: str, outcome: str, longrepr: str | None) -> TestReport:
        return TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, outcome,
                          longrepr, when, duration=seconds if when == "call" else 0.0)
    return [report("setup", "passed", None), report("call", "failed", text),
            report("teardown", "passed", None)]


def save_dump(name: str, text: str) -> Path | None:
    results = os.environ.get("SPFS_LAB_RESULTS")
    if not results:
        return None
    path = Path(results) / "watchdog" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_item(item: pytest.Item, in_child: Callable[[], None] = lambda: None) -> None:
    """pytest_runtest_protocol for one item: run it forked, bounded; log its reports."""
    marker = item.get_closest_marker("timeout")
    timeout = float(marker.args[0]) if marker and marker.args else float(
        item.config.getini("timeout") or 300)
    # pytest-timeout armed its alarm for this item around us: the child re-arms it (fork
    # clears alarms); here it must not fire while we wait
    alarm = signal.setitimer(signal.ITIMER_REAL, 0)[0] or timeout
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    t0 = time.monotonic()
    limit = alarm + GRACE
    result = run_forked(item, limit, alarm, in_child)
    reports = result.reports
    if result.stuck or not reports:
        if result.stuck:
            left = "" if result.status is not None else " (the test process did not die: left)"
            why = (f"lab watchdog: test still running after {limit:.0f} s (timeout "
                   f"{alarm:.0f} s + {GRACE:.0f} s); killed its process tree{left}; where "
                   f"it was stuck:\n{result.stuck}")
        else:
            why = f"lab watchdog: the test process ended without a result (status {result.status})"
        saved = save_dump(re.sub(r"[^A-Za-z0-9_.-]+", "_", item.name), why)
        reports = failure_reports(item, why + (f"\n(saved in {saved})" if saved else ""),
                                  time.monotonic() - t0)
    for report in reports:
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
