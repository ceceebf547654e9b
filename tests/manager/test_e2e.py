"""The whole product on the host: a live spfs-manager starting the real spfs (issue 3) in a
"container" (private mount namespace + cgroup), a workload blocked on the stub, then the real
replace with the real swap engine (issue 4), tmpfs standing in for NFS (the pipeline is
fs-agnostic; NFS is for the lab)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manager_helpers import (kill_and_reap, read_count, start_daemon, stop_daemon, unmount_below,
                             wait_for)
from spfs.fs import control_client
from spfs.manager.protocol import FINAL_STATUS_NAME
from spfs.sys.mountinfo import read_mountinfo, top_mount_at

TERMINAL = {"done", "failed", "rolled_back"}

WORKER = """
import os, sys, time
beat, log_path = sys.argv[1], sys.argv[2]
open(beat, "w").write("started")
f = open(log_path, "a")          # blocks while SPFS is a stub
os.chdir(os.path.dirname(log_path))
n = 0
while True:
    n += 1
    f.write(f"{n}\\n"); f.flush()
    open(beat, "w").write(str(n))
    time.sleep(0.01)
"""


def _replace_status(daemon, mount_id: str) -> dict:
    return daemon.status()[mount_id]["replace"] or {}


def _final_phase(daemon, mount_id: str, timeout: float = 30.0) -> dict:
    """Wait for the end of a replace, on the manager's status (which keeps an exited SPFS
    as it ended), or once the manager itself has exited, on the status it left."""
    last: dict = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            mount = daemon.status().get(mount_id)
        except OSError:  # exited with its last SPFS (--exit-with-spfs)
            assert daemon.proc.wait(20) == 0
            final = json.loads((daemon.work_dir / FINAL_STATUS_NAME).read_text())["mounts"]
            mount = {m["id"]: m for m in final}.get(mount_id)
        assert mount is not None, f"the manager forgot mount {mount_id}"
        last = mount["replace"] or {}
        if last.get("phase") in TERMINAL:
            return last
        time.sleep(0.01)
    raise TimeoutError(f"replace {mount_id} did not end: {last}")


def test_stub_then_live_replace_by_the_real_fs(tmp_path, container, cgroup):
    mp, bind = container.base / "mp", container.base / "bind"
    mp.mkdir()
    bind.mkdir()
    os.chmod(mp, 0o751)
    os.chown(mp, 1234, 4321)
    daemon = start_daemon(tmp_path, "--exit-with-spfs", "--spfs-ready-timeout", "5",
                          spfs_command=None)
    try:
        assert daemon.text(f"mount;id=1;mode=stub;mountpoint={mp};ns_pid={container.pid}") == 0
        assert top_mount_at(container.mounts(), str(mp)).fstype.startswith("fuse")
        st = container.stat(str(mp))  # the root of SPFS looks like the mountpoint it covers
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o751, 1234, 4321)
        spfs_pid = daemon.status()["1"]["spfs_pid"]
        # as when CRIU starts things inside the container's cgroup: frozen with it, the
        # spfs daemon would leave every FUSE request hanging
        cgroup.add(spfs_pid)
        container.run("mount", "--bind", str(mp), str(bind))

        beat = tmp_path / "beat"
        worker = container.spawn(WORKER.replace("sys.argv[1], sys.argv[2]",
                                                f"{str(beat)!r}, {str(mp / 'w.log')!r}"))
        cgroup.add(worker.pid)
        wait_for(lambda: beat.exists() and beat.read_text() == "started", what="worker")
        sock = str(daemon.work_dir / "spfs-1" / "spfs.sock")
        wait_for(lambda: control_client.status(sock)["parked"] >= 1, 15, "the worker parked")
        assert beat.read_text() == "started"  # blocked on the stub

        assert daemon.text(f"replace;id=1;source=realfs;type=tmpfs;flags=0;"
                           f"bindmounts={bind},;freeze_cgroup={cgroup.path};",
                           "size=16m,mode=755") == 0
        assert daemon.text("mode;all;mode=stub") == 0
        assert daemon.text("replace;all;mode=release") == 0
        result = _final_phase(daemon, "1")
        assert result["phase"] == "done", result
        assert result["details"]["moved_out_of_cgroup"] == [spfs_pid]
        swap = result["details"]["swap"]
        print("phase timings (ms):", {t["phase"]: t["ms"] for t in result["timings_ms"]},
              "swap stop window (ms):", round(swap["stop_window_s"] * 1000, 2))

        # every path is the real fs, one superblock; the worker's fd and cwd are on it
        mounts = container.mounts()
        assert top_mount_at(mounts, str(mp)).source == "realfs"
        assert top_mount_at(mounts, str(bind)).source == "realfs"
        real_dev = container.stat(str(mp)).st_dev
        assert container.stat(str(bind)).st_dev == real_dev
        fds = [os.stat(f"/proc/{worker.pid}/fd/{fd}") for fd in os.listdir(
            f"/proc/{worker.pid}/fd")]
        assert any(st.st_dev == real_dev for st in fds)
        assert os.stat(f"/proc/{worker.pid}/cwd").st_dev == real_dev
        # the workload kept writing, without gaps, into the real fs
        wait_for(lambda: read_count(beat) > 20, what="worker progress")
        lines = (Path(f"/proc/{container.pid}/root{mp}") / "w.log").read_text().split()
        assert lines[:20] == [str(i) for i in range(1, 21)]
        assert not cgroup.frozen()
        # nothing uses SPFS any more: it exits, and the manager after it
        wait_for(lambda: not os.path.exists(f"/proc/{spfs_pid}"), 20, "spfs exit")
        assert daemon.proc.wait(20) == 0
        # what it leaves for a client that polled too late: how each replace ended
        final = json.loads((daemon.work_dir / FINAL_STATUS_NAME).read_text())["mounts"]
        assert [(m["id"], m["replace"]["phase"], m["spfs_running"]) for m in final] == \
            [("1", "done", False)]
    finally:
        stop_daemon(daemon)


def test_two_shares_blocked_on_each_other_do_not_deadlock(tmp_path, container, cgroup):
    """Share A is released while share B is still held: a task parked on B's stub keeps the
    cgroup from freezing, so A retries its freeze (thawing in between) instead of failing or
    waiting forever; once B is released both finish."""
    paths = {name: container.base / name for name in ("a", "b")}
    for path in paths.values():
        path.mkdir()
    daemon = start_daemon(tmp_path, "--exit-with-spfs", "--freeze-timeout", "0.3",
                          spfs_command=None)
    try:
        for mount_id, name in (("1", "a"), ("2", "b")):
            assert daemon.text(f"mount;id={mount_id};mode=stub;mountpoint={paths[name]};"
                               f"ns_pid={container.pid}") == 0
        beats = {}
        for name, path in paths.items():
            beats[name] = tmp_path / f"beat-{name}"
            worker = container.spawn(WORKER.replace(
                "sys.argv[1], sys.argv[2]", f"{str(beats[name])!r}, {str(path / 'w.log')!r}"))
            cgroup.add(worker.pid)
        for mount_id, name in (("1", "a"), ("2", "b")):
            mode = "release" if name == "a" else "hold"
            assert daemon.text(f"replace;id={mount_id};source=real-{name};type=tmpfs;flags=0;"
                               f"freeze_cgroup={cgroup.path};mode={mode}") == 0
        wait_for(lambda: "trying again" in daemon.log(), 15, "freeze retries")
        assert _replace_status(daemon, "1")["phase"] == "frozen"
        assert _replace_status(daemon, "2")["phase"] == "held"
        wait_for(lambda: read_count(beats["a"]) > 0, what="A's worker running")
        assert beats["b"].read_text() == "started"
        assert daemon.text("replace;all;mode=release") == 0
        results = [_final_phase(daemon, i) for i in ("1", "2")]
        assert [r["phase"] for r in results] == ["done", "done"], results
        mounts = container.mounts()
        assert [top_mount_at(mounts, str(paths[n])).source for n in "ab"] == ["real-a", "real-b"]
        assert not cgroup.frozen()
        assert daemon.proc.wait(20) == 0  # both spfs exited, then the manager
    finally:
        stop_daemon(daemon)


def _spares(manager_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(manager_pid), "-f", "spfs.fs.warm"],
                         capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("warm", [False, True])
def test_spfs_on_the_host_for_criu_to_bind_in(tmp_path, cgroup, warm):
    """Without ns_pid= SPFS is mounted on the host (CRIU binds it into the container as an
    external mount); the replace then works in the manager's own namespaces. With
    --warm-spfs the mount is served by the waiting spare, and a new spare takes its place;
    the manager still exits with its last SPFS, and the spare with it."""
    mp = tmp_path / "host-mp"
    mp.mkdir()
    daemon = start_daemon(tmp_path, "--exit-with-spfs", *(["--warm-spfs"] if warm else []),
                          spfs_command=None)
    worker = None
    try:
        spare = []
        if warm:
            wait_for(lambda: len(_spares(daemon.proc.pid)) == 1, what="a warm spare")
            spare = _spares(daemon.proc.pid)
        assert daemon.text(f"mount;id=h;mode=stub;mountpoint={mp}") == 0
        spfs_pid = daemon.status()["h"]["spfs_pid"]
        assert (spfs_pid in spare) if warm else not _spares(daemon.proc.pid)
        def next_spares() -> list[int]:
            return [p for p in _spares(daemon.proc.pid) if p != spfs_pid]

        if warm:
            wait_for(lambda: next_spares(), what="the next spare")
            spares_left = set(next_spares())
        assert top_mount_at(read_mountinfo(), str(mp)).fstype.startswith("fuse")
        beat = tmp_path / "beat"
        worker = subprocess.Popen([sys.executable, "-c", WORKER.replace(
            "sys.argv[1], sys.argv[2]", f"{str(beat)!r}, {str(mp / 'w.log')!r}")])
        cgroup.add(worker.pid)
        wait_for(lambda: beat.exists(), what="worker")
        assert daemon.text(f"replace;id=h;source=host-real;type=tmpfs;flags=0;"
                           f"freeze_cgroup={cgroup.path};mode=release") == 0
        assert _final_phase(daemon, "h")["phase"] == "done"
        assert top_mount_at(read_mountinfo(), str(mp)).source == "host-real"
        wait_for(lambda: read_count(beat) > 5, what="worker progress")
        assert os.stat(f"/proc/{worker.pid}/cwd").st_dev == os.stat(mp).st_dev
        assert daemon.proc.wait(20) == 0
        if warm:  # the spare ends with the manager (a zombie has no command line left)
            wait_for(lambda: not spares_left & set(map(int, subprocess.run(
                ["pgrep", "-f", "spfs.fs.warm"], capture_output=True, text=True).stdout.split())),
                what="the spare to exit")
    finally:
        if worker is not None:
            kill_and_reap(worker)
        stop_daemon(daemon)
        unmount_below(tmp_path)
