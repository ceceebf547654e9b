"""Boot a fresh lab guest, run one command in it, stream its output, return its status.

The guest sees the host's root read-only (with a tmpfs overlay) so the checkout, its venv and
Debian's NFS/CRIU userspace are at the same paths inside. A writable run dir is shared for the
command script, results and the exit status. Output comes back on a virtio serial port; the
serial console (kernel and boot messages) goes to a file whose tail is shown on failure.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from spfs.lab.kernel import current_kernel
from spfs.lab.paths import CHECKOUT, GUEST_DIR, LabPaths
from spfs.sys.libc import libc

log = logging.getLogger(__name__)

EXIT_TIMEOUT = 124   # like timeout(1)
EXIT_LAB_ERROR = 125  # the lab itself failed (boot, qemu), not the command
PASSED_ENV_PREFIXES = ("SPFS_", "PYTEST_")
PASSED_ENV = ("TERM", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "CI")


class LabError(RuntimeError):
    pass


@dataclass
class RunSpec:
    argv: list[str]
    timeout: float = 900.0
    mem_mib: int = 2048
    cpus: int = 2
    cwd: Path = field(default_factory=Path.cwd)
    env: dict[str, str] = field(default_factory=dict)
    run_dir: Path | None = None


@dataclass
class RunResult:
    status: int
    run_dir: Path
    boot_seconds: float | None
    wall_seconds: float

    @property
    def results(self) -> Path:
        return self.run_dir / "results"

    @property
    def console(self) -> Path:
        return self.run_dir / "console.log"


def new_run_dir(paths: LabPaths) -> Path:
    paths.runs.mkdir(parents=True, exist_ok=True)
    name = time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}"
    run = paths.runs / name
    n = 0
    while True:
        try:
            run.mkdir()
            return run
        except FileExistsError:
            n += 1
            run = paths.runs / f"{name}.{n}"


def _command_script(spec: RunSpec) -> str:
    env = {k: v for k, v in os.environ.items()
           if k.startswith(PASSED_ENV_PREFIXES) or k in PASSED_ENV}
    env.update(spec.env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    lines = ["# written by spfs-lab run"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())
              if k.isidentifier()]
    lines.append(f"cd {shlex.quote(str(spec.cwd))} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(a) for a in spec.argv))
    return "\n".join(lines) + "\n"


def _die_with_parent() -> None:
    # qemu must not outlive spfs-lab, whatever kills spfs-lab.
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def qemu_command(spec: RunSpec, paths: LabPaths, run_dir: Path, out_sock: Path) -> list[str]:
    kernel = current_kernel(paths)
    if not kernel.vmlinuz.exists() or not paths.initramfs.exists():
        raise LabError("the lab is not built: run `make setup`")
    append = " ".join([
        "console=ttyS0", "quiet", "loglevel=4", "panic=-1", "mitigations=off",
        f"spfs.boot={GUEST_DIR / 'boot.sh'}", f"spfs.run={run_dir}",
        f"spfs.kernel={kernel.root}", f"spfs.checkout={CHECKOUT}",
    ])
    return [
        shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        "-accel", "tcg,thread=multi", "-cpu", "max",
        "-m", str(spec.mem_mib), "-smp", str(spec.cpus),
        "-kernel", str(kernel.vmlinuz), "-initrd", str(paths.initramfs),
        "-append", append,
        "-display", "none", "-monitor", "none", "-no-reboot",
        "-serial", f"file:{run_dir / 'console.log'}",
        # No NIC at all: nothing the guest does can reach any network.
        "-nic", "none",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=passthrough,"
                   "readonly=on,multidevs=remap",
        "-virtfs", f"local,path={run_dir},mount_tag=runshare,security_model=passthrough,"
                   "multidevs=remap",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=spfsout,path={out_sock}",
        "-device", "virtserialport,bus=vser0.0,chardev=spfsout,name=spfs.out",
    ]


def run(spec: RunSpec, paths: LabPaths | None = None, out: BinaryIO | None = None) -> RunResult:
    """Boot, run, stream, reap. Never waits longer than spec.timeout (plus a few seconds)."""
    paths = paths or LabPaths.default()
    out = out or sys.stdout.buffer
    run_dir = spec.run_dir or new_run_dir(paths)
    (run_dir / "results").mkdir(parents=True, exist_ok=True)
    (run_dir / "cmd.sh").write_text(_command_script(spec))
    sock_path = run_dir / "out.sock"
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    started = time.monotonic()
    deadline = started + spec.timeout
    qemu_log = open(run_dir / "qemu.log", "wb")
    proc = subprocess.Popen(qemu_command(spec, paths, run_dir, sock_path),
                            stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    timed_out = False
    try:
        timed_out = not _pump(listener, proc, out, deadline)
    finally:
        listener.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        qemu_log.close()
        sock_path.unlink(missing_ok=True)
    wall = time.monotonic() - started
    boot = _boot_seconds(run_dir)
    if timed_out:
        _report_failure(run_dir, f"timed out after {spec.timeout:.0f} s")
        return RunResult(EXIT_TIMEOUT, run_dir, boot, wall)
    status_file = run_dir / "exit-status"
    if not status_file.exists():
        err = run_dir / "boot-error"
        why = err.read_text().strip() if err.exists() else \
            f"the guest stopped without running the command (qemu exit {proc.returncode})"
        _report_failure(run_dir, why)
        return RunResult(EXIT_LAB_ERROR, run_dir, boot, wall)
    return RunResult(int(status_file.read_text().strip() or EXIT_LAB_ERROR), run_dir, boot, wall)


def _pump(listener: socket.socket, proc: subprocess.Popen, out: BinaryIO,
          deadline: float) -> bool:
    """Copy the guest's command output to `out` until qemu exits; False on timeout."""
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    conn: socket.socket | None = None
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if proc.poll() is not None:
                break
            for key, _ in sel.select(timeout=min(remaining, 0.2)):
                if key.data == "accept":
                    conn, _ = listener.accept()
                    sel.unregister(listener)
                    sel.register(conn, selectors.EVENT_READ, "data")
                elif conn is not None:
                    data = conn.recv(65536)
                    if not data:
                        sel.unregister(conn)
                        continue
                    out.write(data)
                    out.flush()
        if conn is not None:  # drain what qemu wrote before it exited
            conn.setblocking(False)
            while True:
                try:
                    data = conn.recv(65536)
                except BlockingIOError:
                    break
                if not data:
                    break
                out.write(data)
            out.flush()
        return True
    finally:
        if conn is not None:
            conn.close()
        sel.close()


def _boot_seconds(run_dir: Path) -> float | None:
    timeline = run_dir / "boot-timeline"
    if not timeline.exists():
        return None
    for line in timeline.read_text().splitlines():
        stamp, _, what = line.partition(" ")
        if what == "running command":
            return float(stamp)
    return None


def console_tail(run_dir: Path, lines: int = 40) -> str:
    path = run_dir / "console.log"
    if not path.exists():
        return "(no console output)"
    text = path.read_text(errors="replace").replace("\r", "")
    return "\n".join(text.splitlines()[-lines:])


def _report_failure(run_dir: Path, why: str) -> None:
    print(f"spfs-lab: {why}\n--- guest console (last lines, {run_dir / 'console.log'}) ---\n"
          f"{console_tail(run_dir)}\n--- end of console ---", file=sys.stderr, flush=True)
