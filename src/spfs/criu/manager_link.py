"""criu-spfs's side of spfs-manager: start the daemon, send it JSON requests, watch it."""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spfs.manager.client_cmd import send_request
from spfs.manager.protocol import FINAL_STATUS_NAME
from spfs.standby import client as standby_client
from spfs.sys.children import pid_alive, run_bounded, terminate

log = logging.getLogger(__name__)

MANAGER_COMMAND = (sys.executable, "-m", "spfs.manager.cli")
REQUEST_TIMEOUT = 60.0
START_TIMEOUT = 60.0
# for each SPFS the manager starts (its default, 30 s, failed a lab restore at
# setup-namespaces on a host loaded to 40); within restore.MOUNT_TIMEOUT
SPFS_READY_TIMEOUT = 120.0
MOUNT_REQUEST_TIMEOUT = SPFS_READY_TIMEOUT + 20.0


class ManagerError(RuntimeError):
    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ManagerLink:
    work_dir: Path
    log_dir: Path
    pid: int = 0
    # the program to run; another one (a wrapper of spfs.manager.cli) is never forked by
    # the standby, which only knows the real one
    command: tuple[str, ...] = MANAGER_COMMAND

    @property
    def socket_path(self) -> str:
        return str(self.work_dir / "spfs-manager.sock")

    def start(self, mount_deadline: float | None = None, verbose: bool = False,
              standby: str | None = None) -> bool:
        """The daemon detaches (-d) once its socket accepts connections and exits by itself
        after the last SPFS it mounted is gone (--exit-with-spfs). Forked by spfs-standby
        when one answers at *standby* (then True), else started as a new Python."""
        self.work_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        args = ["--exit-with-spfs", "--warm-spfs", "-w", str(self.work_dir),
                "-s", self.socket_path, "--log-dir", str(self.log_dir),
                "--spfs-ready-timeout", str(SPFS_READY_TIMEOUT)]
        if mount_deadline is not None:
            args += ["--mount-deadline", str(mount_deadline)]
        if verbose:
            args.append("-v")
        code, stderr, forked = None, "", False
        if standby is not None and os.path.exists(standby) and self.command == MANAGER_COMMAND:
            code, stderr = self._start_by_standby(standby, [*args, "--standby", standby])
            forked = code is not None
        if code is None:
            code, stderr = self._start_process([*self.command, "-d", *args])
        if code != 0:
            raise ManagerError(f"spfs-manager failed to start ({code}): {stderr.strip()[-2000:]}")
        self.pid = int((self.work_dir / "spfs-manager.pid").read_text())
        log.info("spfs-manager %d listening on %s%s", self.pid, self.socket_path,
                 " (forked by spfs-standby)" if forked else "")
        return forked

    @staticmethod
    def _start_process(argv: list[str]) -> tuple[int, str]:
        try:
            proc = run_bounded(argv, START_TIMEOUT, stdin=subprocess.DEVNULL)
        except TimeoutError as e:
            raise ManagerError(f"spfs-manager did not start: {e}") from None
        return proc.returncode, proc.stderr

    @staticmethod
    def _start_by_standby(standby: str, args: list[str]) -> tuple[int | None, str]:
        """(0, "") once the manager, forked by the standby (already in a session of its own:
        no detaching fork), says on its ready fd that its socket accepts connections; (its
        exit status, its stderr) if it ended before; (None, "") when the standby cannot do
        it, so the caller starts the manager itself."""
        err_read, err_write = os.pipe()
        ready_read, ready_write = os.pipe()
        try:
            child = standby_client.spawn(standby, "spfs-manager", [*args, "--ready-fd", "3"],
                                         fds={2: err_write, 3: ready_write}, new_session=True)
        except (standby_client.StandbyUnavailable, standby_client.StandbyError) as exc:
            log.warning("%s; starting spfs-manager ourselves", exc)
            os.close(err_read)
            os.close(ready_read)
            return None, ""
        finally:
            os.close(err_write)
            os.close(ready_write)
        try:
            with os.fdopen(ready_read, "rb") as ready, os.fdopen(err_read, "rb") as err:
                if not select.select([ready], [], [], START_TIMEOUT)[0]:
                    child.kill()
                    raise ManagerError(f"spfs-manager did not start in {START_TIMEOUT:.0f} s")
                if ready.read(1) == b"R":
                    return 0, ""
                # it ended before it was ready: its stderr (EOF with the exit) says why
                try:
                    code = child.wait(START_TIMEOUT)
                except subprocess.TimeoutExpired:
                    child.kill()
                    raise ManagerError("spfs-manager closed its ready fd but did not exit") \
                        from None
                return code or 1, err.read(65536).decode(errors="replace")
        finally:
            child.close()

    def _send(self, fields: dict[str, Any], timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        packet = json.dumps({k: v for k, v in fields.items() if v is not None}).encode()
        return json.loads(send_request(self.socket_path, packet, timeout))

    def request(self, timeout: float = REQUEST_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """One command; `timeout` bounds the wait for its answer (a mount waits for the
        daemon to be ready: MOUNT_REQUEST_TIMEOUT, so that the manager's own bound, which
        names the cause, comes first)."""
        try:
            reply = self._send(fields, timeout)
        except (OSError, ValueError) as e:
            raise ManagerError(f"spfs-manager {fields.get('cmd')}: {e}") from None
        if reply.get("code") != 0:
            raise ManagerError(f"spfs-manager {fields.get('cmd')} {fields.get('id', '')}: "
                               f"{reply.get('error')}: {reply.get('message')}",
                               int(reply.get("code") or 0))
        return reply.get("data") or {}

    def status(self) -> list[dict[str, Any]]:
        """The manager's status (failures included: the code of a failed replace is not an
        error of the request)."""
        reply = self._send({"cmd": "status"})
        return list((reply.get("data") or {}).get("mounts") or [])

    def final_status(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """After the manager exited: the status it left, with the SPFS that ended before
        anyone looked ([] if it died without writing it)."""
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        try:
            doc = json.loads((self.work_dir / FINAL_STATUS_NAME).read_text())
        except (OSError, ValueError):
            return []
        return list(doc.get("mounts") or [])

    def alive(self) -> bool:
        return self.pid > 0 and pid_alive(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        if self.pid > 0 and not terminate(self.pid, timeout):
            log.warning("spfs-manager %d ignored SIGTERM for %.0f s: killed it", self.pid,
                        timeout)
