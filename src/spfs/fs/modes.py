"""The SPFS work modes and the transitions allowed between them."""

from __future__ import annotations

import enum


class Mode(enum.Enum):
    RESTORE = "restore"
    STUB = "stub"
    PROXY = "proxy"


# Restore content can never come back once left: CRIU has finished with it and the
# applications must only ever see the target from then on. PROXY -> PROXY re-points the
# filesystem at another directory; STUB -> STUB is refused rather than silently ignored so
# that a confused caller notices.
ALLOWED_TRANSITIONS: frozenset[tuple[Mode, Mode]] = frozenset({
    (Mode.RESTORE, Mode.STUB),
    (Mode.RESTORE, Mode.PROXY),
    (Mode.STUB, Mode.PROXY),
    (Mode.PROXY, Mode.PROXY),
    (Mode.PROXY, Mode.STUB),
})


class ModeError(Exception):
    """A mode change that the state machine does not allow, or that failed to prepare."""


def check_transition(current: Mode, wanted: Mode) -> None:
    if (current, wanted) not in ALLOWED_TRANSITIONS:
        allowed = sorted(b.value for a, b in ALLOWED_TRANSITIONS if a is current)
        raise ModeError(f"mode change {current.value} -> {wanted.value} is not allowed "
                        f"(from {current.value}: {', '.join(allowed) or 'nothing'})")


def parse_mode(text: str) -> Mode:
    try:
        return Mode(text)
    except ValueError:
        raise ModeError(f"unknown mode {text!r} (expected restore, stub or proxy)") from None
