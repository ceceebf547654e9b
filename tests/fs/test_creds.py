"""Caller credentials on the daemon's thread: set around a request, nothing left after.

Runs the real syscalls on a real thread of this (root) process; the request context is a
stand-in object because pyfuse3 only makes RequestContexts inside a FUSE request, and the
supplementary groups come from a real process, as they do for a real caller.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

import pytest

from spfs.fs.creds import CallerCredentials
from spfs.fs.daemon import DaemonConfig, StartupError, run
from spfs.fs.modes import Mode
from spfs.sys import thread_creds as tc

from spfs_testlib import NOBODY, is_mounted, run_as


@dataclasses.dataclass
class Caller:
    uid: int
    gid: int
    pid: int


def thread_creds() -> tuple[str, str, str]:
    """(FsUid, FsGid, Groups) of the calling thread, from the kernel."""
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text().splitlines())
    return (fields["Uid"].split()[3], fields["Gid"].split()[3], fields["Groups"].strip())


@pytest.fixture
def process_with_groups() -> Iterator[Callable[[list[int]], int]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(groups: list[int]) -> int:
        # Lives (paused) until the fixture kills it: no lifetime to guess.
        code = f"import os, signal; os.setgroups({groups!r}); print(flush=True); signal.pause()"
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"\n"
        return proc.pid
    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def on_a_thread(action: Callable[[], object]) -> object:
    """Run *action* on a fresh thread (credentials are per thread) and return its result."""
    result: list[object] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(action())
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(20)
    assert not thread.is_alive()
    if errors:
        raise errors[0]
    return result[0]


def test_groups_and_fs_ids_are_set_for_the_request_and_dropped_after(
        process_with_groups: Callable[[list[int]], int]) -> None:
    member = Caller(NOBODY, NOBODY, process_with_groups([4242, 4243]))
    outsider = Caller(NOBODY, NOBODY, process_with_groups([]))

    def requests() -> list[tuple[str, str, str]]:
        creds = CallerCredentials()
        seen = [thread_creds()]
        for caller in (member, outsider, member, member):
            with creds.of(caller):  # type: ignore[arg-type]
                seen.append(thread_creds())
            seen.append(thread_creds())
        return seen
    seen = on_a_thread(requests)
    assert isinstance(seen, list)
    initial, member_in, after1, outsider_in, after2, member_again, after3, member_3, after4 = seen
    assert member_in == (str(NOBODY), str(NOBODY), "4242 4243")
    assert outsider_in == (str(NOBODY), str(NOBODY), "")
    assert member_again == member_3 == member_in
    assert after1 == after2 == after3 == after4 == ("0", "0", "")
    assert initial[:2] == ("0", "0")


def test_root_callers_run_as_the_daemon() -> None:
    def request() -> tuple[str, str, str]:
        with CallerCredentials().of(Caller(0, 0, os.getpid())):  # type: ignore[arg-type]
            return thread_creds()
    assert on_a_thread(request)[:2] == ("0", "0")  # type: ignore[index]


def test_a_thread_left_switched_is_reset_before_a_root_request(
        process_with_groups: Callable[[list[int]], int]) -> None:
    # A worker thread serves many callers in turn. Should switching back after a request
    # ever fail, the thread keeps that caller's identity; a root request (which switches
    # nothing) must not then run with it. A real switch back as root cannot be made to
    # fail, so the failure is stood in for by leaving out the switch back (__exit__).
    member = Caller(NOBODY, NOBODY, process_with_groups([4242]))

    def requests() -> tuple[tuple[str, str, str], tuple[str, str, str]]:
        creds = CallerCredentials()
        creds.of(member).__enter__()  # type: ignore[arg-type]
        left = thread_creds()
        with creds.of(Caller(0, 0, os.getpid())):  # type: ignore[arg-type]
            return left, thread_creds()
    left, as_root = on_a_thread(requests)  # type: ignore[misc]
    assert left == (str(NOBODY), str(NOBODY), "4242")
    assert as_root == ("0", "0", "")


def _fsuid_in_kernel() -> int:
    """The calling thread's fsuid as the kernel shows it: 4th field of the Uid line."""
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[4])
    raise AssertionError("no Uid line")


def test_fsuid_switch_takes_effect_on_this_thread_only() -> None:
    switched = threading.Event()
    release = threading.Event()
    seen: dict[str, int] = {}

    def switch() -> None:
        tc.set_thread_fsuid(1000)
        seen["kernel"], seen["read_back"] = _fsuid_in_kernel(), tc.current_fsuid()
        switched.set()
        release.wait(20)
        tc.set_thread_fsuid(0)
        seen["after"] = _fsuid_in_kernel()

    thread = threading.Thread(target=switch)
    thread.start()
    try:
        assert switched.wait(20)
        assert seen == {"kernel": 1000, "read_back": 1000}
        assert _fsuid_in_kernel() == 0  # this thread kept its own
    finally:
        release.set()
        thread.join(20)
    assert not thread.is_alive() and seen["after"] == 0


def test_a_switch_the_kernel_refuses_is_reported() -> None:
    # A real refusal: a process without CAP_SETUID may not set its fsuid to 0 (setfsuid
    # still returns success, the previous fsuid); the read-back must catch it.
    result = run_as(NOBODY, "from spfs.sys import thread_creds as tc\n"
                            "try:\n    tc.set_thread_fsuid(0)\n"
                            "except tc.CredentialSwitchError as e:\n    print('refused:', e)\n")
    assert result.returncode == 0, result.stderr
    assert f"refused: setfsuid(0) left this thread's fsuid at {NOBODY}" in result.stdout


def test_the_start_probe_fails_where_the_switch_does_not_work() -> None:
    result = run_as(NOBODY, "from spfs.sys import thread_creds as tc\n"
                            "try:\n    tc.probe()\n"
                            "except tc.CredentialSwitchError as e:\n    print('refused:', e)\n")
    assert result.returncode == 0, result.stderr
    assert "refused: the per-thread credential switch does not work here" in result.stdout
    tc.probe()  # and works as root, on this (known) architecture


def test_an_unknown_architecture_is_refused_before_any_syscall() -> None:
    with pytest.raises(tc.UnsupportedArchitecture, match="'sparc64'.*aarch64, x86_64"):
        tc.probe("sparc64")


def test_the_daemon_refuses_to_start_on_an_unknown_architecture(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "ctl.sock"
    config = DaemonConfig(str(mnt), Mode.STUB, socket_path=str(sock), machine="sparc64")
    with pytest.raises(StartupError, match="no per-thread setgroups syscall number known "
                                           "for 'sparc64'"):
        run(config)
    assert not is_mounted(mnt) and not sock.exists()
