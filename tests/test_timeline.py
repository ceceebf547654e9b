"""The timeline places a step reported late (by another process's clock reading) at the time
it happened, between the steps noted around it."""

from __future__ import annotations

import io
import time

from spfs.timeline import Timeline


def test_a_step_noted_late_takes_its_own_time_and_place() -> None:
    tl = Timeline(out=io.StringIO())
    tl.note("first")
    happened = time.monotonic()
    time.sleep(0.05)
    tl.note("second, noted now")
    tl.note("between, reported late", when=happened)
    assert [s.what for s in tl.steps] == ["first", "between, reported late", "second, noted now"]
    assert tl.steps[1].at <= tl.steps[2].at - 0.04
