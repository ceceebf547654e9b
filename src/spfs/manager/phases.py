"""The replace state machine of one SPFS mount: phases, allowed transitions, timing, error.

A phase names the step *in progress*; it is entered when its step starts and its duration is
the time spent in it (see docs/manager.md for the table).  DONE, FAILED and ROLLED_BACK are
terminal: FAILED means the container and SPFS were not touched (SPFS still in its previous
mode), ROLLED_BACK means changes were undone (SPFS in place, proxy if the real mount exists,
container thawed).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger(__name__)


class ReplacePhase(enum.Enum):
    HELD = "held"  # waiting for "release"
    MOUNTING_TARGET = "mounting_target"  # mounting the real fs in the container's namespaces
    PROXY = "proxy"  # switching SPFS to proxy onto the real fs
    FROZEN = "frozen"  # freezing the container cgroup (includes waiting for its lock)
    SWAPPING = "swapping"  # swap engine moving references from SPFS to the real fs
    MOUNTS_MOVED = "mounts_moved"  # detaching SPFS, attaching the real fs at every path
    THAWED = "thawed"  # thawing the cgroup and letting SPFS go
    DONE = "done"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in (ReplacePhase.DONE, ReplacePhase.FAILED, ReplacePhase.ROLLED_BACK)


P = ReplacePhase
ALLOWED_TRANSITIONS: dict[ReplacePhase, frozenset[ReplacePhase]] = {
    P.HELD: frozenset({P.MOUNTING_TARGET, P.FAILED}),
    P.MOUNTING_TARGET: frozenset({P.PROXY, P.FAILED}),
    P.PROXY: frozenset({P.FROZEN, P.FAILED, P.ROLLED_BACK}),
    P.FROZEN: frozenset({P.SWAPPING, P.ROLLED_BACK}),
    P.SWAPPING: frozenset({P.MOUNTS_MOVED, P.ROLLED_BACK}),
    P.MOUNTS_MOVED: frozenset({P.THAWED, P.ROLLED_BACK}),
    P.THAWED: frozenset({P.DONE}),
    P.DONE: frozenset(),
    P.FAILED: frozenset(),
    P.ROLLED_BACK: frozenset(),
}


class TransitionError(RuntimeError):
    pass


@dataclass
class PhaseTiming:
    phase: ReplacePhase
    started: float  # time.monotonic()
    seconds: float | None = None  # None while the phase lasts


@dataclass
class ReplaceProgress:
    """What status reports about one mount's replace; safe to read from other threads."""

    mount_id: str
    phase: ReplacePhase = ReplacePhase.HELD
    timings: list[PhaseTiming] = field(default_factory=list)
    error: str | None = None
    error_code: int = 0
    failed_in: ReplacePhase | None = None
    rollback_errors: list[str] = field(default_factory=list)
    # what went wrong without ending the replace (e.g. tasks still holding SPFS after it)
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the swap engine's report
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.timings:
            self.timings.append(PhaseTiming(self.phase, time.monotonic()))

    def advance(self, new: ReplacePhase) -> None:
        with self._lock:
            old = self.phase
            if new not in ALLOWED_TRANSITIONS[old]:
                raise TransitionError(f"replace {self.mount_id}: {old.name} -> {new.name}")
            now = time.monotonic()
            current = self.timings[-1]
            current.seconds = now - current.started
            self.phase = new
            self.timings.append(PhaseTiming(new, now, 0.0 if new.terminal else None))
        log.info("replace %s: %s took %.1f ms -> %s", self.mount_id, old.name,
                 current.seconds * 1000, new.name)
        _notify(self.mount_id, new)

    def fail(self, phase: ReplacePhase, code: int, message: str) -> None:
        """Record the first error; the phase it happened in is kept for status."""
        with self._lock:
            if self.error is None:
                self.error, self.error_code, self.failed_in = message, code, phase
        log.error("replace %s failed in %s: %s", self.mount_id, phase.name, message)

    def warn(self, message: str) -> None:
        with self._lock:
            self.warnings.append(message)
        log.warning("replace %s: %s", self.mount_id, message)

    def seconds_in(self, phase: ReplacePhase) -> float | None:
        with self._lock:
            for timing in self.timings:
                if timing.phase is phase:
                    return timing.seconds
        return None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            now = time.monotonic()
            return {
                "phase": self.phase.value,
                "error": self.error,
                "error_code": self.error_code,
                "failed_in": self.failed_in.value if self.failed_in else None,
                "rollback_errors": list(self.rollback_errors),
                "warnings": list(self.warnings),
                "details": dict(self.details),
                "timings_ms": [
                    {
                        "phase": t.phase.value,
                        "ms": round(1000 * (t.seconds if t.seconds is not None
                                            else now - t.started), 3),
                        # time.monotonic(): one clock for every process of the machine
                        "started_at": t.started,
                    }
                    for t in self.timings
                ],
            }


PhaseObserver = Callable[[str, ReplacePhase], None]
_observers: list[PhaseObserver] = []


def observe(observer: PhaseObserver) -> None:
    """`observer(mount_id, phase)` runs in the replace's thread on entering each phase, after
    the transition is logged (a test can hold a replace in a phase to kill the manager there)."""
    _observers.append(observer)


def _notify(mount_id: str, phase: ReplacePhase) -> None:
    for observer in _observers:
        observer(mount_id, phase)
