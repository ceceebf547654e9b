"""Cgroup freezer (v1 freezer.state or v2 cgroup.freeze), with bounded waits and a
watchdog process that thaws the group again if the manager dies while it is frozen."""

from __future__ import annotations

import ctypes
import logging
import os
import select
import time
from pathlib import Path
from typing import BinaryIO

from spfs.sys import forkserver
from spfs.sys.forkserver import Job

log = logging.getLogger(__name__)


class FreezerError(RuntimeError):
    pass


class Freezer:
    def __init__(self, path: str):
        self.path = Path(path)
        if (self.path / "cgroup.freeze").exists():
            self.version = 2
        elif (self.path / "freezer.state").exists():
            self.version = 1
        else:
            raise FreezerError(f"{path} is neither a v1 freezer cgroup nor a v2 cgroup with cgroup.freeze")

    def is_frozen(self) -> bool:
        if self.version == 1:
            return (self.path / "freezer.state").read_text().strip() == "FROZEN"
        return _v2_frozen(self.path)

    def freeze(self, timeout: float) -> None:
        self._write(True)
        self._wait(True, timeout)

    def thaw(self, timeout: float = 5.0) -> None:
        self._write(False)
        self._wait(False, timeout)

    def _write(self, frozen: bool) -> None:
        if self.version == 1:
            (self.path / "freezer.state").write_text("FROZEN" if frozen else "THAWED")
        else:
            (self.path / "cgroup.freeze").write_text("1" if frozen else "0")

    def _wait(self, frozen: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.0001
        while True:
            if self.version == 1:
                state = (self.path / "freezer.state").read_text().strip()
                done = state == ("FROZEN" if frozen else "THAWED")
            else:
                done = _v2_frozen(self.path) == frozen
            if done:
                return
            if time.monotonic() >= deadline:
                if frozen:
                    self._write(False)
                raise FreezerError(f"{self.path} did not {'freeze' if frozen else 'thaw'} within {timeout} s "
                                   "(a task may be blocked in an uninterruptible wait, e.g. on a stub FUSE mount)")
            time.sleep(delay)
            delay = min(delay * 2, 0.005)


def _v2_frozen(path: Path) -> bool:
    for line in (path / "cgroup.events").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "frozen":
            return value.strip() == "1"
    return False


class WatchdogProcess:
    """What Watchdog needs of subprocess.Popen, for a worker of the fork server."""

    def __init__(self, worker: forkserver.Worker, stdin: BinaryIO, stdout: BinaryIO) -> None:
        self.worker = worker
        self.pid = worker.pid
        self.stdin: BinaryIO | None = stdin
        self.stdout: BinaryIO | None = stdout

    @property
    def returncode(self) -> int | None:
        return self.worker.returncode

    def poll(self) -> int | None:
        return self.worker.poll()


WATCHDOG_START_TIMEOUT = 30.0


def _start_watchdog(cgroup: str, decision_read: int, inotify_fds: tuple[int, ...]) -> WatchdogProcess:
    """The watchdog as a worker of the fork server, not a new Python: under emulation an
    interpreter and its imports take seconds, and a re-plan inside a freeze would wait for
    them. It holds only its pipes, the decision pipe and the inotify copies (a copy of
    another pipe's write end, such as an fd donor's, would keep its reader waiting)."""
    from spfs.swap import watchdog
    commands_read, commands_write = os.pipe2(os.O_CLOEXEC)
    out_read, out_write = os.pipe2(os.O_CLOEXEC)
    try:
        worker = forkserver.spawn(Job(watchdog.serve_in_worker,
                                      (os.getpid(), cgroup, decision_read, commands_read, out_write),
                                      fds=(commands_read, out_write, decision_read, *inotify_fds),
                                      name="swap watchdog"), WATCHDOG_START_TIMEOUT)
    except BaseException:
        os.close(commands_write)
        os.close(out_read)
        raise
    finally:
        os.close(commands_read)
        os.close(out_write)
    return WatchdogProcess(worker, open(commands_write, "wb"), open(out_read, "rb"))


NOT_READY_EXIT_WAIT = 10.0


class Watchdog:
    """A child process that outlives us: if we die during a switch, it re-sends the signals
    the engine had held back and restores the cgroup's freezer state.

    Protocol on its stdin (see watchdog.py): "arm <state>" = on EOF write <state>;
    "disarm"; "signal TGID TID HEX" = a held-back signal; "delivered" = we re-sent them
    ourselves; "inotify FD MASK HEXPATH DEV WDS" = a watch about to move; EOF = wait for our exit,
    then act, then exit.
    """

    def __init__(self, freezer: Freezer | None, decision_read: int, inotify_fds: tuple[int, ...] = ()):
        """decision_read: the decision pipe's read end (bytes left in it after our death =
        the commit point was passed); inotify_fds: our copies of the tasks' inotify fds, to
        put watches back on A if we die before the commit point."""
        self.freezer = freezer
        self.proc = _start_watchdog(str(freezer.path) if freezer else "-", decision_read,
                                   inotify_fds)
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        """Wait (bounded) until the child runs, so that its start-up does not compete with
        the stop window.  Not ready in time is not an error: whatever we write waits in the
        pipe and it acts on it when it gets there.  A child that died is."""
        if self.ready:
            return True
        assert self.proc.stdout is not None
        poller = select.poll()
        poller.register(self.proc.stdout, select.POLLIN)
        if not poller.poll(timeout * 1000):
            if self.proc.poll() is not None:
                raise FreezerError(f"the swap watchdog exited with {self.proc.returncode}")
            return False
        if self.proc.stdout.readline().strip() != b"ready":
            raise FreezerError("the swap watchdog did not start")
        self.ready = True
        return True

    def arm(self, restore_frozen: bool) -> None:
        self._send(f"arm {'frozen' if restore_frozen else 'thawed'}")

    def disarm(self) -> None:
        self._send("disarm")

    def hold_signal(self, tgid: int, tid: int, info: ctypes.Structure) -> None:
        try:
            self._send(f"signal {tgid} {tid} {bytes(info).hex()}")
        except OSError as exc:  # we still re-send it ourselves; only our death would lose it
            log.error("could not hand a held-back signal to the watchdog: %s", exc)

    def signals_delivered(self) -> None:
        self._send("delivered")

    def watch_moving(self, inotify_fd: int, mask: int, source_path: str, target_dev: int, present: list[int]) -> None:
        """Told before a watch moves; undone if we die before the commit point: watch the
        source path again, drop any new watch on the target's device (not in `present`)."""
        present_list = ",".join(map(str, present)) or "-"
        self._send(f"inotify {inotify_fd} {mask} {source_path.encode().hex()} {target_dev} {present_list}")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.disarm()
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass
        # Disarmed, it exits on EOF by itself: a ready one is not waited for (that keeps
        # its exit off the switch's latency). One that never said it was ready may not have
        # closed what it inherited at the fork yet, the source's descriptors among them,
        # which would keep the source busy after the switch: that one is waited for.
        if self.ready:
            self.proc.poll()
            return
        deadline = time.monotonic() + NOT_READY_EXIT_WAIT
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.proc.returncode is None:
            log.warning("the swap watchdog %d, never ready, has not exited in %.0f s",
                        self.proc.pid, NOT_READY_EXIT_WAIT)


def pin_to_cpu(tids: list[int], cpu: int) -> dict[int, set[int]]:
    """Put tasks on one CPU: a ptrace round trip is 3-4x cheaper than across CPUs."""
    saved = {}
    for tid in tids:
        try:
            saved[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            continue
    return saved


def restore_affinity(saved: dict[int, set[int]]) -> None:
    for tid, cpus in saved.items():
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            continue
