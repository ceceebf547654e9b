"""The replace state machine: only the documented transitions, timing per phase."""

import time

import pytest

from spfs.manager.phases import (ALLOWED_TRANSITIONS, ReplacePhase as P, ReplaceProgress,
                                 TransitionError)

HAPPY_PATH = [P.MOUNTING_TARGET, P.PROXY, P.FROZEN, P.SWAPPING, P.MOUNTS_MOVED, P.THAWED,
              P.DONE]


def test_happy_path_records_every_phase_with_its_time():
    progress = ReplaceProgress("1")
    for phase in HAPPY_PATH:
        if phase is P.SWAPPING:
            time.sleep(0.02)
        progress.advance(phase)
    snap = progress.snapshot()
    assert snap["phase"] == "done" and snap["error"] is None
    assert [t["phase"] for t in snap["timings_ms"]] == ["held"] + [p.value for p in HAPPY_PATH]
    assert progress.seconds_in(P.FROZEN) >= 0.02  # time spent before SWAPPING began


@pytest.mark.parametrize("start, bad", [
    (P.HELD, P.FROZEN), (P.HELD, P.DONE), (P.MOUNTING_TARGET, P.ROLLED_BACK),
    (P.FROZEN, P.FAILED), (P.THAWED, P.ROLLED_BACK), (P.DONE, P.HELD),
])
def test_forbidden_transitions(start, bad):
    progress = ReplaceProgress("1")
    for phase in HAPPY_PATH[:HAPPY_PATH.index(start) + 1] if start is not P.HELD else []:
        progress.advance(phase)
    with pytest.raises(TransitionError):
        progress.advance(bad)
    assert progress.phase is start


def test_terminal_phases_have_no_way_out():
    for phase in (P.DONE, P.FAILED, P.ROLLED_BACK):
        assert phase.terminal and not ALLOWED_TRANSITIONS[phase]


def test_every_non_terminal_phase_can_end_in_a_failure_or_done():
    for phase, targets in ALLOWED_TRANSITIONS.items():
        if not phase.terminal:
            assert targets & {P.FAILED, P.ROLLED_BACK, P.DONE}, phase


def test_first_error_is_kept():
    progress = ReplaceProgress("1")
    progress.advance(P.MOUNTING_TARGET)
    progress.fail(P.MOUNTING_TARGET, 19, "no such device")
    progress.fail(P.MOUNTING_TARGET, 5, "later")
    progress.advance(P.FAILED)
    snap = progress.snapshot()
    assert (snap["error"], snap["error_code"], snap["failed_in"]) == \
        ("no such device", 19, "mounting_target")


def test_an_observer_sees_each_phase_entered_after_it_is_recorded(monkeypatch):
    from spfs.manager import phases
    monkeypatch.setattr(phases, "_observers", [])
    progress = ReplaceProgress("7")
    seen = []
    phases.observe(lambda mount_id, phase: seen.append((mount_id, phase, progress.phase)))
    for phase in HAPPY_PATH:
        progress.advance(phase)
    assert seen == [("7", p, p) for p in HAPPY_PATH]  # recorded before the observer runs
