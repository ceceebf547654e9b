"""The bridge between CRIU's action script and the `criu-spfs restore` that runs CRIU.

CRIU runs action scripts at each stage; a Python start per stage costs ~0.6 s under
emulation, so the script stays a dash script, and hands the stages that matter to the
waiting criu-spfs through two FIFOs in a private directory (`SPFS_CRIU_CONTROL`): it writes
"STAGE INIT_PID" to `request` and, for setup-namespaces and pre-resume, reads the line
"STAGE ok" (or "STAGE <what went wrong>") from `reply`.

We hold both FIFOs open read-write for the whole restore, so no open of the script's ever
blocks, a request line stays in the pipe while we finish the previous stage, and an answer
waits for its reader. An answer for another stage (one whose script was killed before it
read) is skipped.

Every wait is bounded, on both sides, because CRIU waits for a waited stage's script with
no limit of its own and holds the restored tasks meanwhile:
- here, each stage's handler runs in a worker thread and gets `limits[stage]` seconds; a
  waited stage that is not done by then is answered "failed: STAGE not done in N s" (the
  handler is left to finish on its own: CRIU aborts the restore on that answer);
- in the script, a timer answers "no answer from criu-spfs in N s" itself
  (`SPFS_CRIU_STAGE_TIMEOUTS`, each a little longer than our limit) in case this process cannot
  answer at all (stopped, or wedged in the kernel); if we die, its read ends at EOF (we were
  the only writer), and it checks that we are alive (`SPFS_CRIU_PID`) before it opens `reply`.

post-restore, network-unlock and post-resume are not answered, so CRIU does not wait for
them: what the first two start (detaching the staging mounts, queueing the replaces, the
switch to stub) pre-resume waits for and reports; after post-resume the processes already
run and CRIU could not undo anything. `wait_handled` lets the caller wait for a stage
instead. Handlers run one after the other, in CRIU's order.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

log = logging.getLogger(__name__)

ENV_VAR = "SPFS_CRIU_CONTROL"
PID_VAR = "SPFS_CRIU_PID"
TIMEOUT_VAR = "SPFS_CRIU_STAGE_TIMEOUT"  # the script's default for every waited stage
TIMEOUTS_VAR = "SPFS_CRIU_STAGE_TIMEOUTS"  # "STAGE=SECONDS ..." per waited stage
STAGES = ("setup-namespaces", "post-restore", "network-unlock", "pre-resume", "post-resume")
UNANSWERED = ("post-restore", "network-unlock", "post-resume")
MAX_LINE = 256
DEFAULT_LIMIT = 60.0  # seconds a handler gets unless `limits` says otherwise
SCRIPT_GRACE = 15.0  # the script's own timer: our limit plus this (our answer comes first)
PROGRESS_EVERY = 10.0  # a log line while a handler takes longer than this

StageHandler = Callable[[str, int], None]


class StageServer:
    """Answers the action script's stage requests in a thread, one at a time, each within
    its limit."""

    def __init__(self, directory: Path, handler: StageHandler,
                 limits: Mapping[str, float] | None = None) -> None:
        self.directory = Path(directory)
        self.handler = handler
        self.limits = dict(limits or {})
        self.errors: list[str] = []
        self.handled: list[str] = []
        self.stuck: list[threading.Thread] = []  # handlers still running past their limit
        self.gave_up: dict[str, float] = {}  # stage -> when (boot clock) the script's timer fired
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("request", "reply"):
            path = self.directory / name
            path.unlink(missing_ok=True)
            os.mkfifo(path, 0o600)
        # read-write: never blocks, and the pipes stay while we hold them
        self._requests = os.open(self.directory / "request", os.O_RDWR | os.O_NONBLOCK |
                                 os.O_CLOEXEC)
        self._replies = os.open(self.directory / "reply", os.O_RDWR | os.O_NONBLOCK |
                                os.O_CLOEXEC)

    def limit(self, stage: str) -> float:
        return self.limits.get(stage, DEFAULT_LIMIT)

    def script_timeout(self, stage: str) -> int:
        """How long the script waits for *stage*'s answer before it answers itself."""
        return int(self.limit(stage) + SCRIPT_GRACE + 0.999)

    @property
    def env(self) -> dict[str, str]:
        timeouts = " ".join(f"{s}={self.script_timeout(s)}" for s in STAGES
                            if s not in UNANSWERED)
        return {ENV_VAR: str(self.directory), PID_VAR: str(os.getpid()),
                TIMEOUTS_VAR: timeouts}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="criu-stages", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._serve_lines()
        finally:
            if self._stop.is_set():  # stop() gave up waiting for us: the FIFOs go now
                self._close()

    def _serve_lines(self) -> None:
        pending = b""
        while not self._stop.is_set():
            if not select.select([self._requests], [], [], 0.2)[0]:
                continue
            try:
                pending += os.read(self._requests, 4096)
            except BlockingIOError:
                continue
            while b"\n" in pending:
                raw, pending = pending.split(b"\n", 1)
                line = raw[:MAX_LINE].decode("ascii", "replace").strip()
                stage = line.partition(" ")[0]
                if self._note_gave_up(line):
                    continue
                answer = self._answer(line)
                if stage not in UNANSWERED:
                    self._reply(stage, answer)
                with self._changed:
                    self.handled.append(stage)
                    self._changed.notify_all()
            if len(pending) > MAX_LINE:  # no newline in sight: not our script
                log.error("dropping a stage request without end: %r", pending[:80])
                pending = b""

    def _note_gave_up(self, line: str) -> bool:
        """"STAGE gave-up UPTIME": the script's timer answered for us at that boot-clock
        time and CRIU went on (for pre-resume, CRIU 3.17 resumes the tasks regardless)."""
        parts = line.split()
        if len(parts) != 3 or parts[1] != "gave-up" or parts[0] not in STAGES:
            return False
        try:
            self.gave_up[parts[0]] = float(parts[2])
        except ValueError:
            return False
        log.error("the action script stopped waiting for stage %s (boot clock %s s)",
                  parts[0], parts[2])
        return True

    def wait_handled(self, stage: str, timeout: float) -> bool:
        """Until *stage* has been handled (True) or *timeout* passed (False)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while stage not in self.handled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _reply(self, stage: str, answer: str) -> None:
        line = f"{stage} {answer}".replace("\n", " ").encode()[:MAX_LINE - 1] + b"\n"
        try:
            os.write(self._replies, line)  # a few bytes into a pipe we keep drained
        except OSError as e:
            log.error("cannot answer the action script: %s", e)

    def _answer(self, line: str) -> str:
        stage, _, pid_text = line.partition(" ")
        if stage not in STAGES or not pid_text.isdigit() or int(pid_text) <= 0:
            return f"bad stage request {line[:80]!r}"
        error = self._run_bounded(stage, int(pid_text))
        if error is None:
            return "ok"
        # reported to CRIU (which logs it) and to our caller
        log.error("stage %s failed: %s", stage, error)
        self.errors.append(f"{stage}: {error}")
        return f"failed: {error}".replace("\n", " ")

    def _run_bounded(self, stage: str, pid: int) -> str | None:
        """The handler in a worker thread, waited for at most the stage's limit: its error,
        None when it succeeded, or that it is not done."""
        outcome: list[BaseException | None] = []

        def work() -> None:
            try:
                self.handler(stage, pid)
                outcome.append(None)
            except Exception as e:  # noqa: BLE001 -- handed to the stage's answer
                outcome.append(e)

        worker = threading.Thread(target=work, name=f"criu-stage-{stage}", daemon=True)
        t0 = time.monotonic()
        worker.start()
        limit = self.limit(stage)
        while worker.is_alive():
            left = limit - (time.monotonic() - t0)
            if left <= 0:
                self.stuck.append(worker)
                return f"{stage} not done in {limit:.0f} s"
            worker.join(min(left, PROGRESS_EVERY))
            if worker.is_alive() and time.monotonic() - t0 < limit:
                log.info("stage %s: still being handled after %.0f s (limit %.0f s)", stage,
                         time.monotonic() - t0, limit)
        error = outcome[0] if outcome else RuntimeError("handler ended without a result")
        return None if error is None else str(error)

    def stop(self) -> None:
        """Stop serving; the FIFOs are closed now, or by the serving thread once the handler
        it waits for is done or past its limit."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2)
        if not (self._thread and self._thread.is_alive()):
            self._close()
        for name in ("request", "reply"):
            (self.directory / name).unlink(missing_ok=True)

    def _close(self) -> None:
        with self._changed:
            if self._requests >= 0:
                os.close(self._requests)
                os.close(self._replies)  # a script still reading sees EOF
                self._requests = self._replies = -1
