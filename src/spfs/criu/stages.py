"""The bridge between CRIU's action script and the `criu-spfs restore` that runs CRIU.

CRIU runs action scripts at each stage; a Python start per stage costs ~0.6 s under
emulation, so the script stays shell and hands the stages that matter to the waiting
criu-spfs through two FIFOs in a private directory (`SPFS_CRIU_CONTROL`): it writes
"STAGE INIT_PID" to `request` and reads one line, "ok" or an error, from `reply`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

ENV_VAR = "SPFS_CRIU_CONTROL"
STAGES = ("post-restore", "pre-resume", "post-resume")
MAX_LINE = 256

StageHandler = Callable[[str, int], None]


class StageServer:
    """Answers the action script's stage requests in a thread, one at a time."""

    def __init__(self, directory: Path, handler: StageHandler) -> None:
        self.directory = Path(directory)
        self.handler = handler
        self.errors: list[str] = []
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("request", "reply"):
            path = self.directory / name
            path.unlink(missing_ok=True)
            os.mkfifo(path, 0o600)

    @property
    def env(self) -> dict[str, str]:
        return {ENV_VAR: str(self.directory)}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="criu-stages", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with open(self.directory / "request", "rb") as f:  # blocks until a writer comes
                line = f.readline(MAX_LINE).decode("ascii", "replace").strip()
            if self._stop.is_set():
                return
            answer = self._answer(line)
            self._reply(answer)

    def _reply(self, answer: str, timeout: float = 30.0) -> None:
        """The script opens the reply FIFO right after writing; if it gave up meanwhile
        nobody ever will, so the open is non-blocking and retried to a deadline."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(self.directory / "reply", os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO or time.monotonic() > deadline:
                    log.error("cannot answer the action script: %s", e)
                    return
                time.sleep(0.01)
        try:
            os.write(fd, answer.encode()[:MAX_LINE - 1] + b"\n")
        finally:
            os.close(fd)

    def _answer(self, line: str) -> str:
        stage, _, pid_text = line.partition(" ")
        if stage not in STAGES or not pid_text.isdigit() or int(pid_text) <= 0:
            return f"bad stage request {line[:80]!r}"
        self.seen.append(stage)
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
            # wake the blocked open() with an empty request
            try:
                fd = os.open(self.directory / "request", os.O_WRONLY | os.O_NONBLOCK)
                os.close(fd)
            except OSError:
                pass
            self._thread.join(timeout=2)
        for name in ("request", "reply"):
            (self.directory / name).unlink(missing_ok=True)
