"""Helpers for the spfs tests: start the real daemon, run code as another user."""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from spfs.fs import control_client

SPFS = [sys.executable, "-m", "spfs.fs.cli"]
NOBODY = 65534


def is_mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as handle:
        return any(line.split()[4] == target for line in handle)


@dataclasses.dataclass
class SpfsMount:
    mountpoint: Path
    target: Path
    socket: str
    log: Path
    proc: subprocess.Popen[bytes]

    def control(self, **payload: Any) -> Any:
        return control_client.request(self.socket, payload)

    def set_mode(self, mode: str, proxy_dir: Path | str | None = None) -> dict[str, Any]:
        return control_client.set_mode(self.socket, mode,
                                        str(proxy_dir) if proxy_dir is not None else None)

    def status(self) -> dict[str, Any]:
        return control_client.status(self.socket)

    def exit_status(self, timeout: float = 10.0) -> int:
        """Wait for the daemon to exit; a non-zero status fails with its stderr and log tail,
        which are the only record of why (an uncaught exception goes to stderr)."""
        code = self.proc.wait(timeout)
        if code != 0:
            stderr = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            log = self.log.read_text(errors="replace") if self.log.exists() else ""
            raise AssertionError(f"spfs exited {code}\n--- stderr\n{stderr[-4000:]}"
                                 f"\n--- log\n{log[-4000:]}")
        return code

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        return self.proc.returncode


def start_spfs(mountpoint: Path, mode: str, tmp: Path, *extra: str,
               wait_ready: bool = True, ready_timeout: float = 90) -> SpfsMount:
    mountpoint.mkdir(exist_ok=True)
    socket_path = str(tmp / "ctl" / "ctl.sock")  # the daemon makes ctl/ 0700 (tmp is 0755)
    log = tmp / "spfs.log"
    read_end, write_end = os.pipe()
    cmd = [*SPFS, str(mountpoint), "--mode", mode, "--socket-path", socket_path,
           "--ready-fd", str(write_end), "--log", str(log), "--foreground", *extra]
    proc = subprocess.Popen(cmd, pass_fds=[write_end], stderr=subprocess.PIPE)
    os.close(write_end)
    mount = SpfsMount(mountpoint=mountpoint, target=tmp / "target", socket=socket_path, log=log,
                      proc=proc)
    try:
        if wait_ready:
            # a Python start on a host loaded to 40 on 2 cores can take well over 20 s
            ready, _, _ = select.select([read_end], [], [], ready_timeout)
            assert ready and os.read(read_end, 1) == b"", "spfs did not become ready"
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    except BaseException:
        mount.stop()
        raise
    finally:
        os.close(read_end)
    return mount


def write_manifest(path: Path, entries: list[dict[str, Any]], **top: Any) -> Path:
    path.write_text(json.dumps({"version": 1, "entries": entries, **top}))
    return path


def run_as(uid: int, code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run Python *code* as *uid* (gid = uid, no supplementary groups)."""
    def drop() -> None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    return subprocess.run([sys.executable, "-c", code], preexec_fn=drop, capture_output=True,
                          text=True, timeout=timeout)


def fusectl_dir(mountpoint: Path) -> Path:
    """The FUSE connection's fusectl directory, named after the mount's device minor
    (read from mountinfo: a stat of the mount would be a request to its daemon)."""
    control = Path("/sys/fs/fuse/connections")
    if not os.path.ismount(control):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], check=True)
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            if fields[4] == str(mountpoint):
                return control / fields[2].split(":")[1]
    raise AssertionError(f"{mountpoint} is not mounted")


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")
