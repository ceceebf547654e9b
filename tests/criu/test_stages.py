"""The real action script (bash) and criu-spfs's stage server, as CRIU would run the script
at each stage: answers, failures, bounded waits when criu-spfs is gone, post-resume not waited
for."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from spfs.criu.dump import ACTION_SCRIPT
from spfs.criu.stages import StageServer


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.fail: str | None = None
        self.delay = 0.0

    def __call__(self, stage: str, pid: int) -> None:
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
              ) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "CRTOOLS_SCRIPT_ACTION": stage,
           "CRTOOLS_INIT_PID": str(pid), "SPFS_CRIU_CONTROL": str(control),
           "SPFS_CRIU_PID": str(criu_spfs_pid or os.getpid())}
    return subprocess.run([str(ACTION_SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60)


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
    recorder.delay = 2.0
    t0 = time.monotonic()
    result = run_stage(server.directory, stage)
    took = time.monotonic() - t0
    assert result.returncode == 0, result.stderr
    assert took < 1.5, f"the script waited {took:.2f} s for the handler"
    assert not server.wait_handled(stage, 0.1)  # still being handled
    assert server.wait_handled(stage, 10)
    assert recorder.calls == [(stage, 4242)]


def test_a_stage_sent_while_the_previous_is_still_handled_is_not_lost(bridge) -> None:
    server, recorder = bridge
    recorder.delay = 0.5
    first = threading.Thread(target=run_stage, args=(server.directory, "post-restore"))
    first.start()
    time.sleep(0.1)
    # CRIU runs stages in order; this only stresses the FIFO: the second line arrives while
    # the first is in the handler
    assert run_stage(server.directory, "post-resume").returncode == 0
    first.join(10)
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


def test_criu_spfs_dying_while_the_script_waits_fails_the_stage(tmp_path: Path) -> None:
    """The script's read ends at EOF when the only writer, criu-spfs, dies: no timer."""
    directory = tmp_path / "stages"
    child = os.fork()
    if child == 0:
        def never_answers(stage: str, pid: int) -> None:
            time.sleep(600)
        server = StageServer(directory, never_answers)
        server.start()
        time.sleep(600)
        os._exit(0)
    try:
        wait_for_fifos(directory)
        killer = threading.Timer(1.0, os.kill, (child, 9))
        killer.start()
        t0 = time.monotonic()
        result = run_stage(directory, "pre-resume", criu_spfs_pid=child)
        assert result.returncode == 1
        assert "no answer (criu-spfs gone)" in result.stderr
        assert time.monotonic() - t0 < 10
    finally:
        try:
            os.kill(child, 9)
        except ProcessLookupError:
            pass
        os.waitpid(child, 0)


def wait_for_fifos(directory: Path) -> None:
    deadline = time.monotonic() + 10
    while not (directory / "reply").exists():
        assert time.monotonic() < deadline, "stage server did not start"
        time.sleep(0.01)
    time.sleep(0.2)  # the FIFOs are opened right after they are made


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
