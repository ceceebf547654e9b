"""Watchdog process (see cgroup.Watchdog): what a killed manager cannot do any more.

When its stdin closes while a switch is under way, it waits until the manager has fully
exited (the kernel then has detached every task, and each parked task has read the
decision pipe's end of file), puts inotify watches moved to B back on A unless the commit
point was passed, re-sends the signals the engine had held back, and restores the
cgroup's freezer state.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import struct
import sys
import termios
from typing import TextIO

from spfs.swap import inotify, procfs, ptrace
from spfs.swap.cgroup import Freezer

MANAGER_EXIT_WAIT_S = 30.0  # only a manager stuck in its exit (D state) takes longer


def main(argv: list[str]) -> int:
    return serve(int(argv[0]), argv[1], int(argv[2]), sys.stdin, sys.stdout)


def serve_in_worker(manager: int, cgroup: str, decision: int, commands_fd: int, out_fd: int) -> int:
    """In a worker of the fork server (see cgroup.Watchdog): in a session of its own, so that
    a signal to the manager's process group does not reach it."""
    os.setsid()
    with open(commands_fd, "r", closefd=False) as commands, \
            open(out_fd, "w", closefd=False) as out:
        return serve(manager, cgroup, decision, commands, out)


def serve(manager: int, cgroup: str, decision: int, commands: TextIO, out: TextIO) -> int:
    """The watchdog's life: "ready" on *out*, commands from *commands* until EOF, then act
    as the module docstring says. Run by main() or serve_in_worker()."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        manager_fd = os.pidfd_open(manager)
    except ProcessLookupError:
        manager_fd = -1
    armed: str | None = None
    held: list[tuple[int, int, bytes]] = []
    watches: list[tuple[int, int, str, int, set[int]]] = []
    print("ready", file=out, flush=True)
    for line in commands:
        words = line.split()
        if words[:1] == ["arm"]:
            armed = words[1]
        elif words[:1] == ["disarm"]:
            armed, held, watches = None, [], []
        elif words[:1] == ["inotify"]:
            present = set() if words[5] == "-" else {int(wd) for wd in words[5].split(",")}
            watches.append((int(words[1]), int(words[2]), bytes.fromhex(words[3]).decode(), int(words[4]), present))
        elif words[:1] == ["signal"]:
            held.append((int(words[1]), int(words[2]), bytes.fromhex(words[3])))
        elif words[:1] == ["delivered"]:
            held = []
    if armed is None and not held and not watches:
        return 0
    if manager_fd >= 0:
        select.select([manager_fd], [], [], MANAGER_EXIT_WAIT_S)  # readable once it has exited
    status = 0
    if watches and not _committed(decision):
        for ifd, mask, source_path, target_dev, present in watches:  # the tasks undo their tables: watches too
            try:
                inotify.add_watch(ifd, source_path, mask)  # the same wd if it was still there
                for watch in procfs.fdinfo("self", ifd).inotify:
                    if watch.wd not in present and os.makedev(watch.sdev >> 20, watch.sdev & 0xFFFFF) == target_dev:
                        inotify.remove_watch(ifd, watch.wd)
            except OSError as exc:
                print(f"spfs swap watchdog: could not put inotify watch back on {source_path}: {exc}",
                      file=sys.stderr)
                status = 1
    for tgid, tid, raw in held:
        try:
            ptrace.requeue_signal(tgid, tid, ptrace.SigInfo.from_buffer_copy(raw))
        except OSError as exc:
            print(f"spfs swap watchdog: could not re-send signal to {tid}: {exc}", file=sys.stderr)
            status = 1
    if armed is not None and cgroup != "-" and os.path.isdir(cgroup):
        freezer = Freezer(cgroup)
        try:
            freezer.freeze(10) if armed == "frozen" else freezer.thaw(10)
        except Exception as exc:  # noqa: BLE001 - last resort, report and exit
            print(f"spfs swap watchdog: could not restore {freezer.path}: {exc}", file=sys.stderr)
            return 1
        print(f"spfs swap watchdog: manager gone, {freezer.path} {armed}", file=sys.stderr)
    return status


def _committed(decision_read: int) -> bool:
    """The manager writes one byte more than there are tasks to read one: a byte left means
    it passed the commit point."""
    raw = fcntl.ioctl(decision_read, termios.FIONREAD, struct.pack("i", 0))
    return struct.unpack("i", raw)[0] > 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
