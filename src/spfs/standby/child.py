"""What a forked child does before it becomes the program: take the client's descriptors,
environment, directory and session, drop everything else the standby held, run main(argv)."""

from __future__ import annotations

import fcntl
import os
import sys
from types import ModuleType
from typing import Callable

from spfs.standby.protocol import SpawnRequest
from spfs.sys.fds import close_all_but


def _install_fds(received: list[int], targets: list[int]) -> None:
    """Put each received descriptor at its target number and close every other one: the
    child must not keep the standby's socket, other clients' lifelines or their fds."""
    # first out of the way of every target, so no dup2 below clobbers a descriptor still to
    # be placed (not at a fixed high number: RLIMIT_NOFILE may be 1024)
    scratch = max([*targets, *received, 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, scratch) for fd in received]
    for fd, target in zip(moved, targets):
        os.dup2(fd, target)  # dup2 leaves the target inheritable, as a spawned program's
    for std in (0, 1, 2):  # a program may always write to stdout and stderr
        if std not in targets:
            null = os.open(os.devnull, os.O_RDWR)
            if null != std:
                os.dup2(null, std)
                os.close(null)
    close_all_but({*targets, 0, 1, 2})


def _name_process(program: str) -> None:
    """Its command line stays the standby's; ps and pgrep show this name (comm) instead."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(program[:15])
    except OSError:
        pass


def run_child(module: ModuleType, request: SpawnRequest, received: list[int],
              leave_standby: Callable[[], None] = lambda: None) -> int:
    """*leave_standby* runs once the descriptors are in place: until then a failure can
    still be logged where the standby logs."""
    _install_fds(received, request.fds)
    leave_standby()
    _name_process(request.program)
    if request.new_session:
        os.setsid()
    os.chdir(request.cwd)
    os.environ.clear()
    os.environ.update(request.env)
    sys.argv = [module.__name__, *request.argv]
    try:
        code = module.main(request.argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    return int(code or 0)
