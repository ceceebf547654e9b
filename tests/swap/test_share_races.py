"""A hostile container races the swap on its own share (issue 12).

Real FUSE (SPFS proxying onto a tmpfs "real share" B, as in a replace), the real swap
engine and real processes. A victim holds a file, a FIFO, a bound unix socket, a shared
mapping and its cwd on the share; an attacker process, acting through SPFS as the
container would, flips a directory the swap will touch between the real directory and a
symlink to a host directory holding objects of the same names (or renames a parent, or
mounts a host directory over it) in a tight loop, while the test switches the victim
between SPFS and B again and again.

Each run must either complete with every reference on the right object of the share,
or abort with the victim untouched on the side it was on. The host objects must never
be opened, changed, unlinked or handed to the victim: an inotify watch on them must stay
silent, and their inode, contents, owner and socket stay as they were.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from spfs import swap
from spfs.swap import procfs, unixsock
from tests.fs.spfs_testlib import SpfsMount, is_mounted, start_spfs

RUNS_PER_KIND = int(os.environ.get("SPFS_RACE_RUNS", "200"))
IN_ALL_EVENTS = 0xFFF
_libc = ctypes.CDLL(None, use_errno=True)

VICTIM = textwrap.dedent("""
    import json, mmap, os, signal, socket, sys
    root = sys.argv[1]
    fd = os.open(f"{root}/d/f", os.O_RDWR)
    fifo = os.open(f"{root}/p/fifo", os.O_RDWR)
    mf = os.open(f"{root}/m/map", os.O_RDWR)
    mapping = mmap.mmap(mf, 4096, mmap.MAP_SHARED)
    os.close(mf)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{root}/s/sock")
    listener.listen(4)
    os.chdir(f"{root}/c")
    print(json.dumps({"fd": fd, "fifo": fifo, "sock": listener.fileno()}), flush=True)
    while True:
        signal.pause()
""")

# The attacker: flips one directory of the share until told to stop, then puts the share
# back as it was and says so. It acts through SPFS, as a process in the container does.
ATTACKER = textwrap.dedent("""
    import os, select, subprocess, sys
    kind, share, real, host = sys.argv[1:5]
    name = {"file": "d", "fifo": "p", "socket": "s", "cwd": "c", "mapping": "m",
            "rename": "d", "mount": "d"}[kind]
    host_dir = {"file": "etc", "fifo": "etc", "socket": "run", "cwd": "dir", "mapping": "etc",
                "rename": "etc", "mount": "etc"}[kind]
    path, aside, decoy = f"{share}/{name}", f"{share}/{name}.aside", f"{share}/decoy"
    flips = 0

    def attack():
        global flips
        if kind == "rename":          # a parent renamed, a decoy of the same shape in its place
            os.rename(path, aside)    # (renames only: an unlink on NFS may leave .nfs files)
            os.rename(decoy, path)
            os.rename(path, decoy)
            os.rename(aside, path)
        elif kind == "mount":         # a host directory mounted over it, on either side
            for where in (path, f"{real}/{name}"):
                if subprocess.run(["mount", "--bind", f"{host}/{host_dir}", where]).returncode == 0:
                    subprocess.run(["umount", "-l", where])
        else:                         # the directory swapped for a symlink to a host directory
            os.rename(path, aside)
            os.symlink(f"{host}/{host_dir}", path)
            os.unlink(path)
            os.rename(aside, path)
        flips += 1

    def put_back():  # the share as it was, from wherever an attack was cut short
        if os.path.islink(path):
            os.unlink(path)
        if os.path.lexists(aside):
            if os.path.isdir(path):       # the decoy stands in its place
                os.rename(path, decoy)
            os.rename(aside, path)

    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        os.set_blocking(0, False)
        while True:
            try:
                attack()
            except OSError:
                put_back()  # the swap moved things under us: start again from the top
            if select.select([0], [], [], 0)[0]:
                break
        os.set_blocking(0, True)
        put_back()
        intact = os.path.isdir(path) and not os.path.islink(path) and not os.path.lexists(aside)
        assert intact, os.listdir(share)
        sys.stdin.readline()  # the "stop" that ended the burst
        print(f"stopped {flips}", flush=True)
""")



@dataclass
class Host:
    """Objects outside the share that the container would like the manager to touch."""

    root: Path
    inotify_fd: int
    listener: socket.socket
    before: dict[str, tuple[int, int, int, int, bytes]]

    def snapshot(self) -> dict[str, tuple[int, int, int, int, bytes]]:
        out = {}
        for path in sorted(self.root.rglob("*")):
            st = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(path)] = (st.st_ino, st.st_mode, st.st_uid, st.st_gid, data)
        return out

    def events(self) -> list[tuple[int, int, str]]:
        got = []
        while select.select([self.inotify_fd], [], [], 0)[0]:
            buf = os.read(self.inotify_fd, 65536)
            offset = 0
            while offset < len(buf):
                wd, mask, _cookie, length = struct.unpack_from("iIII", buf, offset)
                name = buf[offset + 16: offset + 16 + length].rstrip(b"\0").decode()
                got.append((wd, mask, name))
                offset += 16 + length
        return got


@contextlib.contextmanager
def share_arena(mount_real: list[str] | None = None) -> Iterator[tuple[Path, Path, Path, SpfsMount]]:
    """tmp/real (the 'NFS': a tmpfs here, `mount_real` + its path in the lab), tmp/mnt
    (SPFS proxying onto it, as in a replace), and tmp itself for the host's objects."""
    tmp = Path(tempfile.mkdtemp(prefix="spfs-race-"))
    tmp.chmod(0o755)
    real = tmp / "real"
    real.mkdir()
    subprocess.run([*(mount_real or ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs"]), str(real)],
                   check=True)
    mount = None
    try:
        for sub in "dpscm":
            (real / sub).mkdir()
        (real / "d" / "f").write_text("the share's file")
        os.mkfifo(real / "p" / "fifo")
        (real / "m" / "map").write_bytes(b"share map".ljust(4096, b"\0"))
        (real / "c" / "marker").write_text("the share's cwd")
        (real / "decoy").mkdir()
        (real / "decoy" / "f").write_text("a decoy")
        mount = start_spfs(tmp / "mnt", "stub", tmp, ready_timeout=120)
        mount.set_mode("proxy", proxy_dir=real)
        yield tmp, real, tmp / "mnt", mount
    finally:
        if mount is not None:
            mount.stop()
        for sub in (tmp / "mnt", real):
            if is_mounted(sub):
                subprocess.run(["umount", "-l", str(sub)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def host_objects(tmp: Path) -> Iterator[Host]:
    root = tmp / "host"
    for sub in ("etc", "run", "dir"):
        (root / sub).mkdir(parents=True)
    (root / "etc" / "f").write_text("host secret")
    (root / "etc" / "map").write_bytes(b"host map".ljust(4096, b"\0"))
    os.mkfifo(root / "etc" / "fifo")
    (root / "dir" / "marker").write_text("host dir")
    os.chown(root / "etc" / "f", 0, 0)
    os.chmod(root / "etc" / "f", 0o600)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(root / "run" / "sock"))
    listener.listen(4)
    os.chmod(root / "run" / "sock", 0o600)
    ifd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert ifd >= 0
    for sub in (root, root / "etc", root / "run", root / "dir"):
        assert _libc.inotify_add_watch(ifd, os.fsencode(sub), IN_ALL_EVENTS) >= 0
    host = Host(root, ifd, listener, {})
    host.before = host.snapshot()
    host.events()  # the snapshot itself read the files: start from a clean slate
    try:
        yield host
    finally:
        listener.close()
        os.close(ifd)


class Attacker:
    def __init__(self, kind: str, share: Path, real: Path, host: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ATTACKER, kind, str(share), str(real), str(host)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._line() == "ready"
        self.flips = 0

    def _line(self, timeout: float = 30.0) -> str:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the attacker did not answer"
        return self.proc.stdout.readline().strip()

    def go(self) -> None:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        answer = self._line()
        assert answer.startswith("stopped"), answer
        self.flips = int(answer.split()[1])

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait(10)


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def references(pid: int, fds: dict[str, int]) -> dict[str, tuple[int, int]]:
    """The (device, inode) of every share object the victim holds; its socket's file is
    found through sock_diag (a socket fd's own inode says nothing of where it is bound)."""
    refs = {"file": _identity(f"/proc/{pid}/fd/{fds['fd']}"),
            "fifo": _identity(f"/proc/{pid}/fd/{fds['fifo']}"),
            "cwd": _identity(f"/proc/{pid}/cwd")}
    vma = next(v for v in procfs.maps(pid) if v.path.endswith("/m/map"))
    refs["mapping"] = _identity(f"/proc/{pid}/map_files/{vma.start:x}-{vma.end:x}")
    sock_ino = int(os.readlink(f"/proc/{pid}/fd/{fds['sock']}")[8:-1])
    bound = unixsock.bound_on(refs["file"][0]).get(sock_ino)
    if bound is not None:  # else: not bound on the side its file is on, a mismatch below
        refs["socket"] = (refs["file"][0], bound.file_ino)
    return refs


def expected(side: Path) -> dict[str, tuple[int, int]]:
    """The share's own objects as seen on `side` (looked up while nothing races)."""
    return {"file": _identity(f"{side}/d/f"), "fifo": _identity(f"{side}/p/fifo"),
            "cwd": _identity(f"{side}/c"), "mapping": _identity(f"{side}/m/map"),
            "socket": (os.lstat(f"{side}/s/sock").st_dev, os.lstat(f"{side}/s/sock").st_ino)}


KINDS = ["file", "fifo", "socket", "cwd", "mapping", "rename", "mount"]


def race(kind: str, runs: int, mount_real: list[str] | None = None,
         must_complete: bool = True) -> dict[str, object]:
    """`runs` switches of a victim between SPFS and the real share, alternating, while an
    attacker of `kind` races them; fails on the first run that touched a host object or
    left a reference on the wrong object. `must_complete`: some run must also have switched
    (so that the check of where every reference ended up was made on a completed switch).
    Returns the record of the runs."""
    with share_arena(mount_real) as (tmp, real, spfs, _mount), host_objects(tmp) as host:
        victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(spfs)], stdout=subprocess.PIPE, text=True)
        attacker = None
        try:
            fds = json.loads(victim.stdout.readline())
            attacker = Attacker(kind, spfs, real, host.root)
            sides = {"spfs": spfs, "real": real}
            where = "spfs"
            outcomes: Counter[str] = Counter()
            errors: Counter[str] = Counter()
            for run in range(runs):
                other = "real" if where == "spfs" else "spfs"
                attacker.go()
                report = swap.switch(str(sides[where]), str(sides[other]), pids=[victim.pid], timeout=10.0)
                attacker.stop()
                assert victim.poll() is None, f"run {run}: the victim died"
                now = references(victim.pid, fds)
                if report.ok:
                    outcomes["switched"] += 1
                    where = other
                else:
                    outcomes["aborted"] += 1
                    errors[_reason(report.error)] += 1
                assert now == expected(sides[where]), (
                    f"run {run} ({kind}, {'switched' if report.ok else 'aborted: ' + str(report.error)}): "
                    f"the victim holds {now}, the share's objects on {where} are {expected(sides[where])}")
                events = host.events()
                assert not events, f"run {run}: host objects touched: {events} ({report.error})"
            assert host.snapshot() == host.before, "a host object changed"
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(str(host.root / "run" / "sock"))  # still the host's own listener
            probe.close()
            host.listener.accept()[0].close()
            record = {"kind": kind, "runs": runs, **outcomes, "attacker_flips": attacker.flips,
                      "abort_reasons": dict(errors)}
            print(f"\n{json.dumps(record)}")
            # the race was real: the attacker was busy during the runs, and some completed
            assert attacker.flips >= runs
            assert outcomes["switched"] > 0 or not must_complete, f"no run ever completed: {dict(errors)}"
            return record
        finally:
            if attacker is not None:
                attacker.close()
            victim.kill()
            victim.wait(10)


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_container_never_reaches_the_host(kind: str) -> None:
    race(kind, RUNS_PER_KIND)


def _reason(error: str | None) -> str:
    """The class of an abort, for the record: which check stopped it."""
    text = error or ""
    for needle in ("leads off the share", "no longer the", "is on device", "No such file",
                   "not a ", "after discovery", "cannot be moved"):
        if needle in text:
            return needle
    return text[:80]
