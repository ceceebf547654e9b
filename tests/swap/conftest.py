"""Fixtures for swap tests: real tmpfs mounts A and B, real cgroups, C victims built with gcc."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from spfs.sys.mountinfo import read_mountinfo

VICTIMS = Path(__file__).parent / "victims"


def cgroup_roots() -> dict[str, Path]:
    """Where this host mounts the cgroup v1 freezer ("v1") and the cgroup2 hierarchy ("v2"),
    from mountinfo: /sys/fs/cgroup/unified on a hybrid host, /sys/fs/cgroup on a unified-only
    one (Debian 12), elsewhere on others."""
    roots: dict[str, Path] = {}
    for m in read_mountinfo():
        if m.fstype == "cgroup2" and m.root == "/":
            roots.setdefault("v2", Path(m.mountpoint))
        elif m.fstype == "cgroup" and "freezer" in m.super_options.split(",") and m.root == "/":
            roots.setdefault("v1", Path(m.mountpoint))
    return roots


@pytest.fixture(scope="session")
def victim_bin(tmp_path_factory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the test victims")
    out = tmp_path_factory.mktemp("bin") / "victim"
    subprocess.run(["gcc", "-O1", "-Wall", "-o", str(out), str(VICTIMS / "victim.c"), "-lpthread"], check=True)
    return out


@pytest.fixture(scope="session")
def exe_reader_bin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "exe_reader"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(VICTIMS / "exe_reader.c")], check=True)
    return out


@pytest.fixture(scope="session")
def many_maps_bin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bin") / "many_maps"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(out), str(VICTIMS / "many_maps.c")], check=True)
    return out


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@dataclass
class Mounts:
    root: Path
    a: Path
    b: Path
    ctrl: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def populate(self, records: int = 200000, sub: str = "") -> Path:
        where = self.a / sub
        where.mkdir(exist_ok=True)
        with open(where / "ro.txt", "w") as f:
            f.write("".join(f"{i:08d}\n" for i in range(records)))
        os.mkfifo(where / "fifo")
        os.mkfifo(where / "fifo2")
        return where

    def add_mapped_files(self, where: Path | None = None) -> None:
        """The files the victim maps with its "maps" option."""
        where = where or self.a
        (where / "shared.map").write_bytes(bytes(4 * 4096))
        (where / "private.map").write_bytes(bytes(i % 251 for i in range(4 * 4096)))

    def install_binary(self, binary: Path, where: Path | None = None) -> Path:
        """A copy of the victim on the mount, so that /proc/PID/exe is there too."""
        copy = (where or self.a) / binary.name
        copy.write_bytes(binary.read_bytes())
        copy.chmod(0o755)
        return copy

    def mirror(self) -> None:
        """Make B an exact copy of A (the way SPFS and the NFS export hold the same data)."""
        subprocess.run(["cp", "-a", f"{self.a}/.", f"{self.b}/"], check=True)

    def sync_contents(self) -> None:
        """Copy file contents A -> B into the existing B inodes (run while tasks are stopped)."""
        for src in self.a.rglob("*"):
            dst = self.b / src.relative_to(self.a)
            if src.is_file() and not src.is_fifo():
                if dst.exists():
                    with open(src, "rb") as fin, open(dst, "r+b") as fout:
                        data = fin.read()
                        fout.write(data)
                        fout.truncate(len(data))
                else:
                    shutil.copy2(src, dst)

    def spawn(self, binary: Path, *args: str, cgroup: Path | None = None, workdir: Path | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        def enter_cgroup() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        proc = subprocess.Popen([str(binary), str(workdir or self.a), str(self.ctrl), *args], preexec_fn=enter_cgroup,
                                cwd=cwd)
        self.procs.append(proc)
        return proc

    def wait_ready(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(1 for n in os.listdir(self.ctrl) if n.startswith("ready.")) < count:
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                raise AssertionError(f"victim {dead[0].pid} exited early with {dead[0].returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("victims did not get ready")
            time.sleep(0.01)

    def progress(self, pid: int) -> int | None:
        """victim.c's loop count (CTRL_DIR/progress.PID); None for another kind of victim."""
        try:
            data = (self.ctrl / f"progress.{pid}").read_bytes()
        except FileNotFoundError:
            return None
        return int.from_bytes(data, sys.byteorder) if len(data) == 8 else None

    def wait_iterations(self, more: int = 3, timeout: float = 30.0) -> None:
        """Until every running victim.c (each progress.PID in CTRL_DIR of a live process,
        also one in a pid namespace of its own) has gone `more` times round its loop from
        where it is now: its references work (after a switch: on B)."""
        want = {}
        for path in self.ctrl.glob("progress.*"):
            pid = int(path.name.split(".")[1])
            n = self.progress(pid)
            if n is not None and _running(pid):
                want[pid] = n + more
        deadline = time.monotonic() + timeout
        while any((self.progress(pid) or 0) < n for pid, n in want.items()):
            stopped = [pid for pid in want if not _running(pid)]
            if stopped:
                raise AssertionError(f"victim {stopped[0]} exited while it was waited for")
            if time.monotonic() > deadline:
                raise TimeoutError(f"victims not moving: { {pid: self.progress(pid) for pid in want} }")
            time.sleep(0.005)

    def stop_victims(self, timeout: float = 15.0) -> None:
        (self.ctrl / "stop").touch()
        for p in self.procs:
            p.wait(timeout)

    def reports(self) -> dict[int, dict[str, str]]:
        out = {}
        for path in self.ctrl.glob("report.*"):
            out[int(path.name.split(".")[1])] = dict(line.split("=", 1) for line in path.read_text().splitlines())
        return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (by its host pid)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture
def mounts(tmp_path) -> Mounts:
    root = tmp_path
    a, b, ctrl = root / "A", root / "B", root / "ctrl"
    for d in (a, b, ctrl):
        d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "spfs-test-a", str(a)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "spfs-test-b", str(b)], check=True)
    m = Mounts(root, a, b, ctrl)
    try:
        yield m
    finally:
        (ctrl / "stop").touch()
        for p in m.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for d in (a, b):
            if os.path.ismount(d):
                _umount(d)


def _kill_cgroup(path: Path) -> None:
    for _ in range(50):
        pids = [int(x) for x in (path / "cgroup.procs").read_text().split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@pytest.fixture(params=["v1", "v2"])
def cgroup(request) -> Path:
    name = f"spfs-swap-test-{uuid.uuid4().hex[:8]}"
    roots = cgroup_roots()
    if not roots:
        pytest.fail("neither a cgroup v1 freezer nor a cgroup2 hierarchy in mountinfo")
    if request.param not in roots:  # a host has only one kind: the other half cannot run
        pytest.skip(f"no cgroup {request.param} {'freezer ' if request.param == 'v1' else ''}"
                    f"hierarchy on this host (mountinfo)")
    path = roots[request.param] / name
    path.mkdir()
    if request.param == "v2" and not (path / "cgroup.freeze").exists():
        path.rmdir()
        pytest.skip("cgroup2 without cgroup.freeze")
    try:
        yield path
    finally:
        if request.param == "v1":
            (path / "freezer.state").write_text("THAWED")
        else:
            (path / "cgroup.freeze").write_text("0")
        _kill_cgroup(path)
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)
