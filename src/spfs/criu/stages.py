"""The bridge between CRIU's action script and the `criu-spfs restore` that runs CRIU.

CRIU runs action scripts at each stage; a Python start per stage costs ~0.6 s under
emulation, so the script stays a dash script with no helper process, and hands the stages
that matter to the waiting criu-spfs through two FIFOs in a private directory
(`SPFS_CRIU_CONTROL`): it writes "STAGE INIT_PID" to `request` and, for setup-namespaces
and pre-resume, reads the line "STAGE ok" (or "STAGE <what went wrong>") from `reply`.

We hold both FIFOs open read-write for the whole restore, so no open of the script's ever
blocks, a request line stays in the pipe while we finish the previous stage, and an answer
waits for its reader. The wait is bounded without a timer: every handler here is bounded and
always answered, and if we die the script's read ends at EOF (we were the only writer) and
fails the stage; the script checks we are alive (`SPFS_CRIU_PID`) before it opens `reply`.
An answer for another stage (one whose script was killed before it read) is skipped.

post-restore, network-unlock and post-resume are not answered, so CRIU does not wait for
them: what the first two start (detaching the staging mounts, queueing the replaces, the
switch to stub) pre-resume waits for and reports; after post-resume the processes already
run and CRIU could not undo anything. `wait_handled` lets the caller wait for a stage
instead.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ENV_VAR = "SPFS_CRIU_CONTROL"
PID_VAR = "SPFS_CRIU_PID"
STAGES = ("setup-namespaces", "post-restore", "network-unlock", "pre-resume", "post-resume")
UNANSWERED = ("post-restore", "network-unlock", "post-resume")
MAX_LINE = 256

StageHandler = Callable[[str, int], None]


class StageServer:
    """Answers the action script's stage requests in a thread, one at a time."""

    def __init__(self, directory: Path, handler: StageHandler) -> None:
        self.directory = Path(directory)
        self.handler = handler
        self.errors: list[str] = []
        self.handled: list[str] = []
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
        self._replies = os.open(self.directory / "reply", os.O_RDWR | os.O_CLOEXEC)

    @property
    def env(self) -> dict[str, str]:
        return {ENV_VAR: str(self.directory), PID_VAR: str(os.getpid())}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="criu-stages", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
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
                answer = self._answer(line)
                if stage not in UNANSWERED:
                    self._reply(stage, answer)
                with self._changed:
                    self.handled.append(stage)
                    self._changed.notify_all()
            if len(pending) > MAX_LINE:  # no newline in sight: not our script
                log.error("dropping a stage request without end: %r", pending[:80])
                pending = b""

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
            os.write(self._replies, line)  # a few bytes into an empty pipe: never blocks
        except OSError as e:
            log.error("cannot answer the action script: %s", e)

    def _answer(self, line: str) -> str:
        stage, _, pid_text = line.partition(" ")
        if stage not in STAGES or not pid_text.isdigit() or int(pid_text) <= 0:
            return f"bad stage request {line[:80]!r}"
        try:
            self.handler(stage, int(pid_text))
        except Exception as e:  # reported to CRIU (which logs it) and to our caller
            log.error("stage %s failed: %s", stage, e)
            self.errors.append(f"{stage}: {e}")
            return f"failed: {e}".replace("\n", " ")
        return "ok"

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=2)
        if self._requests >= 0 and not (self._thread and self._thread.is_alive()):
            os.close(self._requests)
            os.close(self._replies)  # a script still reading sees EOF
            self._requests = self._replies = -1
        for name in ("request", "reply"):
            (self.directory / name).unlink(missing_ok=True)
