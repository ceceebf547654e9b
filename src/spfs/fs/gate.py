"""Where requests wait while SPFS is in stub mode (or between two modes).

Waiting is event driven: every parked request awaits one trio.Event that a mode change
sets, so thousands of parked requests cost one trio task each (about 8 KiB) and no CPU.
The number of requests that can be parked at once is bounded by pyfuse3's max_tasks; past
that the kernel keeps further requests queued in /dev/fuse.
"""

from __future__ import annotations

import errno
import logging
import math

import trio
from pyfuse3 import FUSEError

from spfs.fs.modes import Mode

log = logging.getLogger(__name__)


class ModeGate:
    def __init__(self, mode: Mode, stub_timeout: float | None = None) -> None:
        self.mode = mode
        self.switching = False        # a mode change is in progress: park everything
        self.shutting_down = False    # fail parked and new stub waits with EIO
        self.stub_timeout = stub_timeout
        self.parked = 0
        self._changed = trio.Event()
        self.opened_at = 0.0       # trio clock when the gate last opened
        self.last_unparked = 0.0   # trio clock when a request that had parked last finished

    @property
    def open(self) -> bool:
        return not self.switching and self.mode is not Mode.STUB

    async def wait(self) -> Mode:
        """Return the mode to serve the request in, parking while there is none."""
        deadline = trio.current_time() + (self.stub_timeout if self.stub_timeout is not None
                                          else math.inf)
        while not self.open:
            if self.shutting_down:
                raise FUSEError(errno.EIO)
            self.parked += 1
            try:
                with trio.move_on_at(deadline):
                    await self._changed.wait()
            finally:
                self.parked -= 1
            if trio.current_time() >= deadline and not self.open:
                log.warning("stub wait exceeded %.1f s: answering EIO", self.stub_timeout)
                raise FUSEError(errno.EIO)
        return self.mode

    def _wake(self) -> None:
        event, self._changed = self._changed, trio.Event()
        event.set()

    def begin_switch(self) -> None:
        self.switching = True

    def finish_switch(self, mode: Mode) -> None:
        self.mode = mode
        self.switching = False
        self.opened_at = trio.current_time()
        self._wake()

    def note_unparked(self) -> None:
        self.last_unparked = trio.current_time()

    @property
    def release_seconds(self) -> float | None:
        """How long the requests released by the last switch took to be answered."""
        if self.last_unparked < self.opened_at:
            return None
        return self.last_unparked - self.opened_at

    def abort_switch(self) -> None:
        self.switching = False
        self._wake()

    def shut_down(self) -> None:
        self.shutting_down = True
        self._wake()
