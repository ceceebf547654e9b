"""The fork server: jobs run in clean workers, see exactly their descriptors, end bounded."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from spfs.sys import forkserver
from spfs.sys.forkserver import Job, JobError
from tests.sys import forkserver_jobs as jobs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def server() -> None:
    forkserver.start()
    assert forkserver.started()


def test_a_job_sees_its_descriptors_under_their_numbers_and_no_other():
    read_end, write_end = os.pipe()
    other = os.open("/", os.O_RDONLY)
    try:
        out = forkserver.call(Job(jobs.open_fds, ([read_end],), fds=(read_end,)), 30).value
        assert out["inodes"] == {read_end: os.fstat(read_end).st_ino}
        assert read_end in out["fds"]
        assert write_end not in out["fds"] and other not in out["fds"], out["fds"]
    finally:
        for fd in (read_end, write_end, other):
            os.close(fd)


def test_hundreds_of_descriptors_travel_in_batches():
    pipes = [os.pipe() for _ in range(300)]
    numbers = [r for r, _ in pipes]
    try:
        out = forkserver.call(Job(jobs.open_fds, (numbers,), fds=tuple(numbers)), 60).value
        assert out["inodes"] == {n: os.fstat(n).st_ino for n in numbers}
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_descriptors_come_back_from_a_job(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    result = forkserver.call(Job(jobs.open_file, (str(path),)), 30)
    assert result.value == "opened" and len(result.fds) == 1
    try:
        assert os.fstat(result.fds[0]).st_ino == path.stat().st_ino
    finally:
        os.close(result.fds[0])


def test_errors_come_back_with_their_errno():
    with pytest.raises(JobError) as failed:
        forkserver.call(Job(jobs.fail_with, (errno.ENOENT,)), 30)
    assert failed.value.errno == errno.ENOENT and "asked to fail" in str(failed.value)
    with pytest.raises(JobError) as crashed:
        forkserver.call(Job(jobs.crash), 30)
    assert crashed.value.errno == errno.EIO and "ValueError" in str(crashed.value)
    assert "a bug in the job" in crashed.value.trace


def test_a_job_past_its_time_is_killed():
    worker = forkserver.spawn(Job(jobs.sleep, (120,)), 30)
    pid = worker.pid
    try:
        with pytest.raises(OSError) as late:
            worker.result(0.5)
        assert late.value.errno == errno.ETIMEDOUT
        assert worker.wait(10), f"worker {pid} still runs"
    finally:
        worker.close()


def test_a_lock_another_thread_holds_does_not_reach_the_worker():
    """The reason for the server: a plain fork now would copy HELD locked, and the job
    would wait for it forever (until the call's bound)."""
    taken, release = threading.Event(), threading.Event()

    def holder() -> None:
        with jobs.HELD:
            taken.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(10)
        assert forkserver.call(Job(jobs.take_the_held_lock), 20).value == "took it"
    finally:
        release.set()
        thread.join(10)


def test_an_import_under_way_in_another_thread_does_not_reach_the_worker():
    """The manager imports the swap engine in a thread for seconds after it starts; a job
    that imports meanwhile must not find the module's import lock taken."""
    thread = threading.Thread(target=lambda: __import__("tests.sys.blocking_import"),
                              name="importer")
    thread.start()
    try:
        assert jobs.IMPORTING.wait(10)
        assert forkserver.call(Job(jobs.import_the_blocking_module), 20).value == \
            "tests.sys.blocking_import"
    finally:
        jobs.FINISH_IMPORT.set()
        thread.join(10)


def test_a_lambda_is_refused_before_anything_starts():
    with pytest.raises(Exception):
        forkserver.spawn(Job(lambda: None), 5)


def _run_program(code: str, pass_fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, pass_fds=pass_fds)


def test_a_program_with_threads_and_no_server_gets_one_by_exec():
    out = _run_program("""
        import os, threading
        from spfs.sys import forkserver
        from spfs.sys.forkserver import Job
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        from tests.sys import forkserver_jobs as jobs
        pid = forkserver.call(Job(os.getppid), 60).value
        opened = forkserver.call(Job(jobs.open_file, ("/",)), 60)
        print(pid != os.getpid(), forkserver.started(), opened.value, len(opened.fds))
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "opened", "1"]
    assert "starting one by exec" in out.stderr


def test_workers_outlive_the_program_that_started_them(tmp_path):
    """A thaw guard or watchdog must act after its program died."""
    read_end, write_end = os.pipe()
    try:
        out = _run_program(f"""
            import os
            from spfs.sys import forkserver
            from spfs.sys.forkserver import Job
            from tests.sys import forkserver_jobs as jobs
            forkserver.start()
            r, w = os.pipe()
            worker = forkserver.spawn(Job(jobs.write_after_reading, (r, {write_end}), fds=(r, {write_end})), 30)
            print(worker.pid, flush=True)
            os._exit(0)  # w closes with us: the worker reads end of file
        """, pass_fds=(write_end,))
        assert out.returncode == 0, out.stderr
        os.close(write_end)
        write_end = -1
        os.set_blocking(read_end, True)
        import select
        assert select.select([read_end], [], [], 30)[0], "the worker did not act after its program exited"
        assert os.read(read_end, 100) == b"still here"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
