"""A readable, timed list of steps, printed as it happens and kept for a JSON dump."""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, TextIO


@dataclass
class Step:
    at: float        # seconds since the timeline started
    what: str
    seconds: float | None = None


@dataclass
class Timeline:
    out: TextIO = field(default_factory=lambda: sys.stdout)  # the current one, not import-time
    started: float = field(default_factory=time.monotonic)
    steps: list[Step] = field(default_factory=list)

    def note(self, what: str, seconds: float | None = None, when: float | None = None) -> None:
        """*when*: the time.monotonic() it happened at, if not now (another process's
        report: CLOCK_MONOTONIC is one clock for the whole machine)."""
        at = (time.monotonic() if when is None else when) - self.started
        step = Step(round(at, 2), what, None if seconds is None else round(seconds, 2))
        self.steps.append(step)
        self.steps.sort(key=lambda s: s.at)  # stable: notes made now stay in their order
        took = f"  ({step.seconds:.2f} s)" if step.seconds is not None else ""
        print(f"[{step.at:7.2f} s] {what}{took}", file=self.out, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.note(what, time.monotonic() - t0)

    def as_list(self) -> list[dict]:
        return [asdict(s) for s in self.steps]

    def save(self, path: Path, **extra: object) -> None:
        doc: object = self.as_list() if not extra else {"steps": self.as_list(), **extra}
        tmp = path.with_name(path.name + ".new")
        # it may go into an image dir from another host: a symlink (or anything) left at
        # the temporary name is replaced, never written through
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(doc, indent=2))
        tmp.replace(path)
