"""Helpers of the manager tests: a "container" (private mount namespace), cgroups, a live daemon."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from spfs.manager.client_cmd import send_request, text_packet
from spfs.sys.mountinfo import read_mountinfo
from spfs.manager.protocol import decode_text_reply

HERE = Path(__file__).parent
STANDIN_SPFS = f"{sys.executable} {HERE / 'standin_spfs.py'}"
FREEZER_V1 = Path("/sys/fs/cgroup/freezer")
CGROUP_V2 = Path("/sys/fs/cgroup/unified")


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout} s")
        time.sleep(0.01)


def kill_and_reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def unmount_below(path: Path) -> None:
    """Last-resort cleanup of host mounts a failed test may have left under `path`."""
    for entry in reversed(read_mountinfo()):
        if entry.mountpoint.startswith(str(path)):
            subprocess.run(["umount", "-l", entry.mountpoint], check=False)


@dataclass
class Container:
    """A process in its own (private) mount namespace, plus helpers to act inside it."""

    proc: subprocess.Popen
    base: Path
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "--", *argv],
                              check=True, capture_output=True, text=True, timeout=20)

    def spawn(self, code: str) -> subprocess.Popen:
        """A Python worker inside the container's mount namespace."""
        worker = subprocess.Popen(["nsenter", "-t", str(self.pid), "-m", "--", sys.executable,
                                   "-c", code], stdout=subprocess.PIPE, text=True)
        self.workers.append(worker)
        return worker

    def mounts(self):
        return read_mountinfo(self.pid)

    def stat(self, path: str) -> os.stat_result:
        return os.stat(f"/proc/{self.pid}/root{path}")


class Cgroup:
    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.version = version

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def frozen(self) -> bool:
        if self.version == "v1":
            return (self.path / "freezer.state").read_text().strip() != "THAWED"
        return "frozen 1" in (self.path / "cgroup.events").read_text()

    def thaw(self) -> None:
        if self.version == "v1":
            (self.path / "freezer.state").write_text("THAWED")
        else:
            (self.path / "cgroup.freeze").write_text("0")


@dataclass
class Daemon:
    proc: subprocess.Popen
    socket_path: str
    work_dir: Path

    def text(self, request: str, data: str | None = None) -> int:
        return decode_text_reply(send_request(self.socket_path, text_packet(request, data), 30))

    def json(self, request: dict) -> dict:
        return json.loads(send_request(self.socket_path, json.dumps(request).encode(), 30))

    def status(self) -> dict:
        return {m["id"]: m for m in self.json({"cmd": "status"})["data"]["mounts"]}

    def log(self) -> str:
        return (self.work_dir / "spfs-manager.log").read_text()


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        try:
            sock.connect(path)
            return True
        except OSError:
            return False


def start_daemon(tmp_path: Path, *extra: str, env: dict | None = None,
                 spfs_command: str | None = STANDIN_SPFS) -> Daemon:
    work_dir = tmp_path / "wd"
    socket_path = str(work_dir / "control.sock")
    proc = subprocess.Popen([sys.executable, "-m", "spfs.manager.cli", "--work-dir",
                             str(work_dir), "--socket-path", socket_path, "-v",
                             *(["--spfs-command", spfs_command] if spfs_command else []),
                             *extra],
                            env={**os.environ, **(env or {})})
    try:
        wait_for(lambda: _accepts(socket_path) or proc.poll() is not None,
                 what="manager socket")
    except BaseException:
        kill_and_reap(proc)
        raise
    if proc.poll() is not None:
        raise RuntimeError(f"spfs-manager exited with {proc.returncode}")
    return Daemon(proc, socket_path, work_dir)


def stop_daemon(daemon: Daemon) -> None:
    spfs_pids = []
    if daemon.proc.poll() is None:
        try:
            spfs_pids = [m["spfs_pid"] for m in daemon.status().values()]
        except OSError:
            pass
        daemon.proc.send_signal(signal.SIGTERM)
        try:
            daemon.proc.wait(15)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait(5)
    for pid in spfs_pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass




def read_count(path: Path) -> int:
    """A heartbeat file a worker keeps rewriting: it may be caught empty (0)."""
    text = path.read_text()
    return int(text) if text.isdigit() else 0


def advances(path: Path, within: float = 3.0) -> bool:
    """Does the worker writing `path` make progress (within a generous time, for loaded
    machines)?"""
    deadline = time.monotonic() + within
    start = read_count(path)
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if read_count(path) > start:
            return True
    return False


def stands_still(path: Path, seconds: float = 0.2) -> bool:
    start = read_count(path)
    time.sleep(seconds)
    return read_count(path) <= start
