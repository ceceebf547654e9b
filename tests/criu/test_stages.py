"""The real action script (bash) and criu-spfs's stage server, as CRIU would run the script
at each stage: answers, failures, bounded waits when criu-spfs is gone, post-resume not waited
for."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from spfs.criu.dump import ACTION_SCRIPT
from spfs.criu.stages import StageServer


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail: str | None = None
        self.delay = 0.0
        self.before: Callable[[], object] | None = None

    def __call__(self, stage: str, pid: int) -> None:
        if self.before is not None:
            self.before()
        time.sleep(self.delay)
        self.calls.append((stage, pid))
        if self.fail:
            raise RuntimeError(self.fail)


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[tuple[StageServer, Recorder]]:
    recorder = Recorder()
    server = StageServer(tmp_path / "stages", recorder)
    server.start()
    try:
        yield server, recorder
    finally:
        server.stop()


def run_stage(control: Path, stage: str, pid: int = 4242, criu_spfs_pid: int | None = None,
              script_timeout: str | None = None, timeout: float = 60,
              ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CRTOOLS_SCRIPT_ACTION": stage,
           "CRTOOLS_INIT_PID": str(pid), "SPFS_CRIU_CONTROL": str(control),
           "SPFS_CRIU_PID": str(criu_spfs_pid or os.getpid())}
    if script_timeout is not None:
        env["SPFS_CRIU_STAGE_TIMEOUT"] = script_timeout
    return subprocess.run([str(ACTION_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_for(predicate, timeout: float, what: str, every: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)


RESTORE_STAGES = ("pre-restore", "setup-namespaces", "post-setup-namespaces", "post-restore",
                  "network-unlock", "pre-resume", "post-resume")


def test_the_stages_criu_spfs_needs_reach_the_handler_in_order(bridge) -> None:
    server, recorder = bridge
    for stage in RESTORE_STAGES:  # all of them, as CRIU runs them
        result = run_stage(server.directory, stage)
        assert result.returncode == 0, result.stderr
    assert server.wait_handled("post-resume", 10)
    assert recorder.calls == [(stage, 4242) for stage in (
        "setup-namespaces", "post-restore", "network-unlock", "pre-resume", "post-resume")]
    assert server.errors == []


def test_a_failing_stage_fails_the_script_with_the_reason(bridge) -> None:
    server, recorder = bridge
    recorder.fail = "SPFS would not switch to stub"
    result = run_stage(server.directory, "pre-resume")
    assert result.returncode == 1
    assert "SPFS would not switch to stub" in result.stderr
    assert server.errors and "pre-resume" in server.errors[0]


@pytest.mark.parametrize("stage", ["post-restore", "network-unlock", "post-resume"])
def test_post_stages_are_not_waited_for_but_are_handled(bridge, stage: str) -> None:
    server, recorder = bridge
    release = threading.Event()
    recorder.before = release.wait  # the handler runs until we let it: no clock involved
    try:
        result = run_stage(server.directory, stage)
        assert result.returncode == 0, result.stderr
        # the script is done while its stage's handler still runs
        assert stage not in server.handled and recorder.calls == []
    finally:
        release.set()
    assert server.wait_handled(stage, 10)
    assert recorder.calls == [(stage, 4242)]


def test_a_stage_sent_while_the_previous_is_still_handled_is_not_lost(bridge) -> None:
    server, recorder = bridge
    entered, release = threading.Event(), threading.Event()

    def hold_the_first() -> None:
        if not recorder.calls:
            entered.set()
            release.wait(30)
    recorder.before = hold_the_first
    try:
        assert run_stage(server.directory, "post-restore").returncode == 0
        assert entered.wait(10), "post-restore did not reach its handler"
        # CRIU runs stages in order; this only stresses the FIFO: the second line arrives
        # while the first is in the handler
        assert run_stage(server.directory, "post-resume").returncode == 0
    finally:
        release.set()
    assert server.wait_handled("post-resume", 10)
    assert [c[0] for c in recorder.calls] == ["post-restore", "post-resume"]


def test_criu_spfs_gone_before_the_stage_fails_it_at_once(tmp_path: Path) -> None:
    server = StageServer(tmp_path / "stages", Recorder())
    server.stop()  # as if it had died: the FIFOs' directory is left, nobody holds them
    for name in ("request", "reply"):
        os.mkfifo(server.directory / name, 0o600)
    dead = subprocess.Popen(["true"])
    dead.wait()
    result = run_stage(server.directory, "pre-resume", criu_spfs_pid=dead.pid)
    assert result.returncode == 1 and "is gone" in result.stderr


def serve_in_child(directory: Path, handler) -> int:
    """A StageServer in a forked child (as criu-spfs is to CRIU's script): its pid, once its
    FIFOs are open (it says so on a pipe)."""
    ready_read, ready_write = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            os.close(ready_read)
            server = StageServer(directory, handler)
            server.start()
            os.write(ready_write, b"r")
            time.sleep(600)
        finally:
            os._exit(0)
    os.close(ready_write)
    try:
        assert select.select([ready_read], [], [], 30)[0], "stage server did not start"
        assert os.read(ready_read, 1) == b"r", "stage server failed to start"
    finally:
        os.close(ready_read)
    return child


def end_child(child: int) -> None:
    try:
        os.kill(child, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(child, 0)


def test_criu_spfs_dying_while_the_script_waits_fails_the_stage(tmp_path: Path) -> None:
    """The script's read ends at EOF when the only writer, criu-spfs, dies."""
    directory = tmp_path / "stages"

    def never_answers(stage: str, pid: int) -> None:
        time.sleep(600)
    child = serve_in_child(directory, never_answers)
    try:
        killer = threading.Timer(1.0, os.kill, (child, 9))
        killer.start()
        t0 = time.monotonic()
        result = run_stage(directory, "pre-resume", criu_spfs_pid=child)
        assert result.returncode == 1
        assert "no answer (criu-spfs gone)" in result.stderr
        assert time.monotonic() - t0 < 10
    finally:
        end_child(child)


def timers_left(limit: str) -> list[int]:
    """The script's timer sleeps still running (found by their unusual argument)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[:2] == [b"sleep", limit.encode()]:
            pids.append(int(pid))
    return pids


def test_a_stopped_criu_spfs_fails_the_waited_stage_by_name_in_bounded_time(
        tmp_path: Path) -> None:
    """The post-restore hang of issue 13: CRIU waits for its script, the script for
    criu-spfs, which cannot answer (here: stopped). Without the script's own timer this
    waits forever; now the stage fails, named, at the script's limit."""
    directory = tmp_path / "stages"
    child = serve_in_child(directory, lambda stage, pid: None)
    try:
        os.kill(child, signal.SIGSTOP)
        t0 = time.monotonic()
        try:
            result = run_stage(directory, "pre-resume", criu_spfs_pid=child,
                               script_timeout="2", timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the action script still waits for a stopped criu-spfs after 30 s")
        took = time.monotonic() - t0
        assert result.returncode == 1
        assert "pre-resume: no answer from criu-spfs in 2 s" in result.stderr, result.stderr
        assert 2 <= took < 20, f"the stage failed after {took:.1f} s (limit 2 s)"
        print(f"stage failed after {took:.2f} s (limit 2 s)")
    finally:
        end_child(child)


def test_the_scripts_timer_ends_with_an_answered_stage(bridge) -> None:
    server, _ = bridge
    limit = "47.311"  # the timer's sleep, found by this argument
    result = run_stage(server.directory, "pre-resume", script_timeout=limit)
    assert result.returncode == 0, result.stderr
    wait_for(lambda: not timers_left(limit), 10, "the timer's sleep to end")


def test_a_wedged_handler_fails_its_waited_stage_by_name_within_its_limit(
        tmp_path: Path) -> None:
    """criu-spfs alive but its handler stuck (a wait with no end): the stage is answered
    at the stage's limit, naming it, and the error is kept for criu-spfs's report."""
    release = threading.Event()
    server = StageServer(tmp_path / "stages", lambda stage, pid: release.wait(),
                         limits={"setup-namespaces": 1.0})
    server.start()
    try:
        t0 = time.monotonic()
        try:
            result = run_stage(server.directory, "setup-namespaces", timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the action script still waits for a wedged handler after 30 s")
        took = time.monotonic() - t0
        assert result.returncode == 1
        assert "setup-namespaces not done in 1 s" in result.stderr, result.stderr
        assert server.errors == ["setup-namespaces: setup-namespaces not done in 1 s"]
        assert 1 <= took < 15, f"answered after {took:.1f} s (limit 1 s)"
    finally:
        release.set()
        server.stop()


def test_a_wedged_unanswered_stage_does_not_hold_the_next_one(tmp_path: Path) -> None:
    """post-restore's handler stuck: it is reported at its limit and pre-resume is still
    handled (and fails, as pre-resume reports what post-restore started)."""
    release = threading.Event()
    calls: list[str] = []

    def handler(stage: str, pid: int) -> None:
        calls.append(stage)
        if stage == "post-restore":
            release.wait()

    server = StageServer(tmp_path / "stages", handler,
                         limits={"post-restore": 1.0, "pre-resume": 5.0})
    server.start()
    try:
        assert run_stage(server.directory, "post-restore").returncode == 0
        result = run_stage(server.directory, "pre-resume", timeout=30)
        assert result.returncode == 0, result.stderr
        assert calls == ["post-restore", "pre-resume"]
        assert server.errors == ["post-restore: post-restore not done in 1 s"]
    finally:
        release.set()
        server.stop()


def test_an_answer_left_for_an_earlier_stage_is_skipped(bridge) -> None:
    server, recorder = bridge
    with open(server.directory / "reply", "w") as reply:  # we hold it too: no block
        reply.write("post-restore failed: from a script killed before it read\n")
    result = run_stage(server.directory, "pre-resume")
    assert result.returncode == 0, result.stderr
    assert recorder.calls == [("pre-resume", 4242)]


def test_a_malformed_line_is_answered_not_handled(bridge) -> None:
    server, recorder = bridge
    with open(server.directory / "request", "w") as request:
        request.write("pre-resume notapid\n")
    fd = os.open(server.directory / "reply", os.O_RDWR)
    try:
        deadline = time.monotonic() + 10
        answer = b""
        while not answer.endswith(b"\n") and time.monotonic() < deadline:
            answer += os.read(fd, 256)
    finally:
        os.close(fd)
    assert answer.startswith(b"pre-resume bad stage request")
    assert recorder.calls == []


def test_without_a_control_dir_the_stages_are_no_ops(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "CRTOOLS_SCRIPT_ACTION": "pre-resume"}
    assert subprocess.run([str(ACTION_SCRIPT)], env=env, timeout=30).returncode == 0


def test_setup_namespaces_waits_for_its_answer(bridge) -> None:
    server, recorder = bridge
    recorder.delay = 1.0  # as while SPFS is still being mounted
    t0 = time.monotonic()
    result = run_stage(server.directory, "setup-namespaces")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - t0 >= 1.0  # CRIU goes on only once the mounts are there
    assert recorder.calls == [("setup-namespaces", 4242)]


def test_network_unlock_of_a_dump_is_a_no_op(tmp_path: Path) -> None:
    # CRIU runs network-unlock at the end of a dump too; no criu-spfs restore is listening
    env = {"PATH": os.environ["PATH"], "CRTOOLS_SCRIPT_ACTION": "network-unlock",
           "CRTOOLS_INIT_PID": "4242"}
    result = subprocess.run([str(ACTION_SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0 and result.stderr == ""


def test_the_script_waits_per_stage_as_criu_spfs_says(tmp_path: Path) -> None:
    """criu-spfs's env gives each waited stage its own timer (its limit plus a margin)."""
    server = StageServer(tmp_path / "stages", lambda stage, pid: None,
                         limits={"setup-namespaces": 190.0, "pre-resume": 1.0})
    env = server.env
    assert env["SPFS_CRIU_STAGE_TIMEOUTS"] == "setup-namespaces=205 pre-resume=16"
    server.stop()
    child = serve_in_child(tmp_path / "stages2", lambda stage, pid: None)
    try:
        os.kill(child, signal.SIGSTOP)
        script_env = {"PATH": os.environ["PATH"], "CRTOOLS_SCRIPT_ACTION": "pre-resume",
                      "CRTOOLS_INIT_PID": "4242", "SPFS_CRIU_CONTROL": str(tmp_path / "stages2"),
                      "SPFS_CRIU_PID": str(child),
                      "SPFS_CRIU_STAGE_TIMEOUTS": "setup-namespaces=205 pre-resume=1"}
        result = subprocess.run([str(ACTION_SCRIPT)], env=script_env, capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 1
        assert "pre-resume: no answer from criu-spfs in 1 s" in result.stderr, result.stderr
    finally:
        end_child(child)


def test_a_stage_the_script_gave_up_on_is_reported_with_its_time(tmp_path: Path) -> None:
    """CRIU 3.17 resumes the tasks even when pre-resume fails: the script tells criu-spfs
    when its timer gave up (boot clock), for criu-spfs to judge (restore.py)."""
    release = threading.Event()
    server = StageServer(tmp_path / "stages", lambda stage, pid: release.wait(30),
                         limits={"pre-resume": 30.0})
    server.start()
    try:
        before = time.clock_gettime(time.CLOCK_BOOTTIME)
        result = run_stage(server.directory, "pre-resume", script_timeout="1", timeout=30)
        assert result.returncode == 1
        assert "pre-resume: no answer from criu-spfs in 1 s" in result.stderr
        release.set()  # our handler ends late; then the script's note is read
        wait_for(lambda: "pre-resume" in server.gave_up, 10, "the script's gave-up note")
        # /proc/uptime, the script's clock, has 10 ms steps
        assert before + 1 - 0.01 <= server.gave_up["pre-resume"] <= time.clock_gettime(
            time.CLOCK_BOOTTIME)
        assert server.errors == []  # the handler itself succeeded, late
    finally:
        release.set()
        server.stop()


def test_restore_judges_a_pre_resume_given_up_by_when_spfs_reached_stub(
        tmp_path: Path) -> None:
    from spfs.criu.restore import Restore, RestoreConfig
    r = Restore(RestoreConfig(images=tmp_path))
    r._stub_at = 100.0
    assert r._stages_given_up({"pre-resume": 125.0}) == []  # stub first: resumed on stub
    late = r._stages_given_up({"pre-resume": 99.0})  # tasks resumed before stub: an error
    assert len(late) == 1 and late[0].startswith("pre-resume: the action script stopped")
    r._stub_at = None
    assert r._stages_given_up({"pre-resume": 125.0})[0].startswith("pre-resume:")
    assert r._stages_given_up({"setup-namespaces": 1.0})[0].startswith("setup-namespaces:")
