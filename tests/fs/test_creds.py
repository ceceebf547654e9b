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

from spfs_testlib import NOBODY


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
        code = f"import os, time; os.setgroups({groups!r}); print(flush=True); time.sleep(60)"
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
