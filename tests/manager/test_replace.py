"""The replace pipeline on the host, driven through Manager.handle with the exact request
strings: real namespaces, real cgroups (v1 and v2), real tmpfs as the real filesystem, real
mount moves.  To inspect and break single steps, most tests use stand-ins: for the SPFS
daemon standin_spfs.py (a tmpfs that records its modes), for the swap engine a recorder that
checks it runs while the cgroup is frozen.  The tests marked "real" use issue 3's spfs or
issue 4's engine."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from manager_helpers import (STANDIN_SPFS, advances, kill_and_reap, read_count, stands_still,
                             wait_for)
from spfs.fs import control_client
from spfs.manager.freezer import CgroupFreezer, FreezePolicy, FreezerLocks
from spfs.manager.interfaces import SwapJob
from spfs.manager.manager import Manager, ManagerConfig
from spfs.sys.mountinfo import top_mount_at
from spfs.manager.protocol import parse_packet
from spfs.manager.realmount import RetryPolicy
from spfs.manager.replace import ReplacePipeline, ReplaceTimeouts
from spfs.manager.spfs_daemon import SpfsProcessLauncher
from spfs.manager.steps import NamespaceMountMover, NamespaceRealFsMounter
from spfs.manager.swapper import SwapEngineAdapter

TERMINAL = {"done", "failed", "rolled_back"}


class RecordingSwapper:
    """Stands in for the swap engine: records each job and whether the cgroup was frozen."""

    def __init__(self, fail: OSError | None = None, delay: float = 0.0) -> None:
        self.fail = fail
        self.delay = delay
        self.calls: list[tuple[SwapJob, bool]] = []
        self.abandoned: list[str] = []
        self.prepared_while_frozen: bool | None = None

    def prepare(self, job: SwapJob) -> str:
        self.prepared_while_frozen = CgroupFreezer(job.cgroup).is_frozen()
        return "plan"

    def abandon(self, prepared: str) -> None:
        self.abandoned.append(prepared)

    def settle(self, job: SwapJob, timeout: float) -> dict:
        return {"pending_tasks": 0, "pending_pids": []}

    def swap(self, job: SwapJob, prepared: str) -> dict:
        assert prepared == "plan"
        self.calls.append((job, CgroupFreezer(job.cgroup).is_frozen()))
        time.sleep(self.delay)
        if self.fail:
            raise self.fail
        return {"recorded": True}

    def switch(self, *args) -> None:
        raise OSError(errno.ENOSYS, "not here")


class Harness:
    def __init__(self, tmp_path: Path, container, cgroup, swapper: RecordingSwapper,
                 mount_deadline: float = 5.0, spfs_command: str = STANDIN_SPFS,
                 lock_timeout: float = 20.0) -> None:
        self.container = container
        self.cgroup = cgroup
        self.swapper = swapper
        work = tmp_path / "mgr"
        work.mkdir()
        pipeline = ReplacePipeline(
            NamespaceRealFsMounter(RetryPolicy(deadline=mount_deadline, first_delay=0.05)),
            NamespaceMountMover(), swapper, FreezerLocks(),
            ReplaceTimeouts(hold=20, freeze=FreezePolicy(lock_timeout=lock_timeout, attempt=5,
                                                         deadline=10, thaw=5)))
        self.pipeline = pipeline
        self.manager = Manager(ManagerConfig(str(work), str(work)),
                               SpfsProcessLauncher(command=tuple(spfs_command.split())),
                               pipeline, swapper)

    def text(self, request: str, data: str | None = None) -> int:
        packet = request.encode() + b"\0" + (data.encode() + b"\0" if data else b"")
        return -self.manager.handle(parse_packet(packet).request).code

    def status(self, mount_id: str) -> dict:
        reply = self.manager.handle(parse_packet(f"status;id={mount_id}".encode()).request)
        return reply.data["mounts"][0]

    def wait_terminal(self, mount_id: str, timeout: float = 20.0) -> dict:
        wait_for(lambda: (self.status(mount_id)["replace"] or {}).get("phase") in TERMINAL,
                 timeout, "replace end")
        return self.status(mount_id)["replace"]

    def modes(self, mount_id: str) -> list[str]:
        path = Path(self.manager.config.work_dir) / f"spfs-{mount_id}" / "spfs.sock.modes"
        return [line.split()[0] for line in path.read_text().splitlines()]

    def close(self) -> None:
        self.manager.shutdown(timeout=10)
        for spfs in list(self.manager.mounts.values()):
            spfs.handle.stop()
            if spfs.job and spfs.job.real_fd is not None:
                os.close(spfs.job.real_fd)


@pytest.fixture
def make_harness(tmp_path, container, cgroup):
    made = []

    def make(swapper=None, **kw) -> Harness:
        harness = Harness(tmp_path, container, cgroup, swapper or RecordingSwapper(), **kw)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def _worker(container, cgroup, tmp_path: Path, setup: str = "", each: str = "") -> tuple:
    """A task of the container, in its cgroup, that shows whether it runs: it runs `setup`
    once, then `each` and a heartbeat every 10 ms."""
    beat = tmp_path / "beat"
    worker = container.spawn("import os, sys, time\n"
                             f"{setup}\n"
                             "n = 0\n"
                             "while True:\n"
                             f"    n += 1; {each or 'pass'}\n"
                             f"    open({str(beat)!r}, 'w').write(str(n))\n"
                             "    time.sleep(0.01)\n")
    cgroup.add(worker.pid)
    wait_for(lambda: beat.exists() and beat.read_text(), what="worker")
    return beat, worker


def _mount_spfs(h: Harness, mount_id: str = "87") -> tuple[str, str]:
    base = h.container.base
    mp, bind = str(base / f"mp{mount_id}"), str(base / f"bind{mount_id}")
    os.mkdir(mp)
    os.mkdir(bind)
    os.chmod(mp, 0o750)
    assert h.text(f"mount;id={mount_id};mode=stub;mountpoint={mp};ns_mountpoint={mp};"
                  f"ns_pid={h.container.pid}") == 0
    h.container.run("sh", "-ec", f"mkdir {mp}/sub; mount --bind {mp}/sub {bind}; "
                                 f"mount -o remount,bind,ro {bind}")
    return mp, bind


def _replace(h: Harness, mount_id: str, bind: str, source: str = "realfs",
             fstype: str = "tmpfs", mode: str = "") -> int:
    return h.text(f"replace;id={mount_id};source={source};type={fstype};flags=6;"
                  f"bindmounts={bind},;freeze_cgroup={h.cgroup.path};{mode}", "size=4m")


def test_replace_end_to_end(make_harness, container, cgroup, tmp_path):
    h = make_harness()
    beat, _ = _worker(container, cgroup, tmp_path)
    mp, bind = _mount_spfs(h)
    top = top_mount_at(container.mounts(), mp)
    assert top.source == "spfs-standin"
    assert container.stat(mp).st_mode & 0o7777 == 0o750  # root stat as the original
    assert _replace(h, "87", bind) == 0
    assert h.status("87")["replace"]["phase"] == "held"
    assert h.text("mode;all;mode=stub") == 0
    assert h.text("replace;all;mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == "done", result
    assert [t["phase"] for t in result["timings_ms"]] == [
        "held", "mounting_target", "proxy", "frozen", "swapping", "mounts_moved", "thawed",
        "done"]
    # the swap engine ran while the cgroup was frozen, with the SPFS paths and device
    (job, was_frozen), = h.swapper.calls
    assert was_frozen and job.spfs_paths == (mp, bind)
    assert h.swapper.prepared_while_frozen is False  # the slow part ran before the freeze
    # the real fs is at the mountpoint and the bind, one superblock, flags kept
    mounts = container.mounts()
    at_mp, at_bind = top_mount_at(mounts, mp), top_mount_at(mounts, bind)
    assert at_mp.source == at_bind.source == "realfs"
    assert container.stat(mp).st_dev == container.stat(bind).st_dev
    assert job.spfs_dev != container.stat(mp).st_dev
    assert at_bind.root == "/sub" and "ro" in at_bind.options
    assert {"nosuid", "nodev"} <= set(at_mp.options)  # flags=6 recorded in the request
    # SPFS was switched to proxy onto the detached real mount, which it could reach
    assert h.modes("87") == ["stub", "proxy"]
    assert h.status("87")["mode"] == "proxy"  # detached, serving what was not moved
    assert (Path(f"/proc/{container.pid}/root{mp}") / "proxied-by-standin").exists()
    assert not cgroup.frozen() and advances(beat)


def test_hold_blocks_until_release(make_harness, container, cgroup):
    h = make_harness()
    mp, bind = _mount_spfs(h)
    assert _replace(h, "87", bind) == 0
    # a share released after it has gone all the way: the held one had the time to move
    _, other = _mount_spfs(h, "88")
    assert _replace(h, "88", other, mode="mode=release") == 0
    assert h.wait_terminal("88")["phase"] == "done"
    assert h.status("87")["replace"]["phase"] == "held"
    assert h.text("status;id=87") == -errno.EINPROGRESS
    assert top_mount_at(container.mounts(), mp).source == "spfs-standin"
    assert h.text("replace;all;mode=release") == 0
    assert h.wait_terminal("87")["phase"] == "done"
    assert h.text("status;id=87") == 0


def test_replace_with_release_in_the_request_starts_at_once(make_harness):
    h = make_harness()
    _, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, mode="mode=release") == 0
    assert h.wait_terminal("87")["phase"] == "done"


def test_mount_failure_leaves_spfs_in_stub_and_nothing_frozen(make_harness, container, cgroup):
    h = make_harness(mount_deadline=1.0)
    mp, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, fstype="nfs4", mode="mode=release") == 0  # no NFS here
    result = h.wait_terminal("87")
    assert result["phase"] == "failed" and result["failed_in"] == "mounting_target"
    assert result["error_code"] == errno.ENODEV
    assert h.text("status;id=87") == -errno.ENODEV
    assert h.status("87")["mode"] == "stub" and h.modes("87") == ["stub"]
    assert top_mount_at(container.mounts(), mp).source == "spfs-standin"
    assert not h.swapper.calls and not cgroup.frozen()


def test_swap_failure_rolls_back_to_proxy_and_thaws(make_harness, container, cgroup,
                                                    tmp_path):
    h = make_harness(RecordingSwapper(fail=OSError(errno.EIO, "swap broke")))
    beat, _ = _worker(container, cgroup, tmp_path)
    mp, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, mode="mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == "rolled_back" and result["failed_in"] == "swapping"
    assert "swap broke" in result["error"]
    # SPFS stays in place, proxying onto the real mount that exists; container runs
    assert h.status("87")["mode"] == "proxy"
    mounts = container.mounts()
    assert top_mount_at(mounts, mp).source == top_mount_at(mounts, bind).source == \
        "spfs-standin"
    assert not cgroup.frozen() and advances(beat)


def test_missing_bind_rolls_back_before_freezing(make_harness, container, cgroup):
    h = make_harness()
    _mount_spfs(h)
    not_a_mount = str(container.base)
    assert _replace(h, "87", not_a_mount + "/nothing", mode="mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == "rolled_back" and result["failed_in"] == "proxy"
    assert result["error_code"] == errno.ENOENT
    assert not h.swapper.calls and not cgroup.frozen()
    assert h.swapper.prepared_while_frozen is None  # failed before preparing the swap


def test_a_failed_replace_can_be_retried(make_harness, container):
    h = make_harness(mount_deadline=0.5)
    mp, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, fstype="nosuchfs", mode="mode=release") == 0
    assert h.wait_terminal("87")["phase"] == "failed"
    assert _replace(h, "87", bind, mode="mode=release") == 0
    assert h.wait_terminal("87")["phase"] == "done"
    assert _replace(h, "87", bind) == -errno.EALREADY


def test_two_shares_of_one_container_do_not_deadlock(make_harness, container, cgroup,
                                                     tmp_path):
    h = make_harness(RecordingSwapper(delay=0.3))
    beat, _ = _worker(container, cgroup, tmp_path)
    _, bind_a = _mount_spfs(h, "1")
    _, bind_b = _mount_spfs(h, "2")
    assert _replace(h, "1", bind_a) == 0 and _replace(h, "2", bind_b) == 0
    assert h.text("replace;all;mode=release") == 0
    assert h.wait_terminal("1")["phase"] == "done"
    assert h.wait_terminal("2")["phase"] == "done"
    assert all(frozen for _, frozen in h.swapper.calls) and len(h.swapper.calls) == 2
    assert not cgroup.frozen() and advances(beat)


def test_replace_request_errors(make_harness, container, cgroup):
    h = make_harness()
    _, bind = _mount_spfs(h)
    assert h.text("replace;id=404;source=s;type=tmpfs;flags=0;freeze_cgroup=/x") == \
        -errno.ENOENT
    assert h.text("replace;id=87;source=s;type=tmpfs;flags=0") == -errno.EINVAL  # no cgroup
    assert _replace(h, "87", bind) == 0
    assert _replace(h, "87", bind) == -errno.EBUSY
    assert h.text("replace;id=87;source=s;type=tmpfs;flags=0;freeze_cgroup=/other") == \
        -errno.EBUSY
    assert h.text(f"mount;id=87;mode=stub;mountpoint={container.base}") == -errno.EEXIST


def test_real_swap_engine_moves_the_workload(make_harness, container, cgroup, tmp_path):
    """Issue 4's engine in the SWAPPING phase: the worker's fd and cwd end on the real fs."""
    h = make_harness(SwapEngineAdapter())
    mp, bind = _mount_spfs(h)
    log_path = f"{mp}/sub/w.log"
    _, worker = _worker(container, cgroup, tmp_path,
                        setup=f"f = open({log_path!r}, 'a'); os.chdir({mp + '/sub'!r})",
                        each="f.write(f'{n}\\n'); f.flush()")
    spfs_dev = container.stat(mp).st_dev
    assert _replace(h, "87", bind, mode="mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == "done", result
    assert result["details"]["swap"]["ok"] and result["details"]["swap"]["fds_moved"] >= 1
    real_dev = container.stat(mp).st_dev
    assert real_dev != spfs_dev and container.stat(bind).st_dev == real_dev
    fd_devs = {os.stat(f"/proc/{worker.pid}/fd/{fd}").st_dev
               for fd in os.listdir(f"/proc/{worker.pid}/fd")}
    assert real_dev in fd_devs and spfs_dev not in fd_devs
    assert os.stat(f"/proc/{worker.pid}/cwd").st_dev == real_dev
    real_log = Path(f"/proc/{container.pid}/root{log_path}")
    size = real_log.stat().st_size
    wait_for(lambda: real_log.stat().st_size > size, what="writes on the real fs")
    assert not cgroup.frozen()


def test_manager_killed_while_frozen_leaves_the_container_running(container, cgroup,
                                                                  tmp_path):
    """SIGKILL of the manager in SWAPPING (cgroup frozen): the thaw guard thaws it."""
    beat, _ = _worker(container, cgroup, tmp_path)
    mp = container.base / "mp"
    mp.mkdir()
    work = tmp_path / "killed"
    work.mkdir()
    script = Path(__file__).parent / "replace_until_killed.py"
    proc = subprocess.Popen([sys.executable, str(script), str(work), str(container.pid),
                             str(mp), str(cgroup.path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent)
    spfs_pid = None
    try:
        spfs_pid = int(proc.stdout.readline().split()[1])
        assert proc.stdout.readline().strip() == "swapping"
        assert cgroup.frozen() and stands_still(beat)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not cgroup.frozen(), 5, "thaw by the guard")
        assert advances(beat)
    finally:
        kill_and_reap(proc)
        if spfs_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(spfs_pid, signal.SIGKILL)


def test_real_spfs_stays_proxying_after_a_rollback(make_harness, container, cgroup,
                                                   tmp_path):
    """Issue 3's spfs: a workload blocked on the stub continues once the replace reaches
    PROXY; the swap then fails, and the rollback leaves SPFS in place, proxying onto the real
    mount: the workload keeps writing into the real fs through it, and is not frozen."""
    h = make_harness(RecordingSwapper(fail=OSError(errno.EIO, "swap broke")),
                     spfs_command=f"{sys.executable} -m spfs.fs.cli")
    mp = str(container.base / "mp")
    os.mkdir(mp)
    assert h.text(f"mount;id=3;mode=stub;mountpoint={mp};ns_pid={container.pid}") == 0
    beat, _ = _worker(container, cgroup, tmp_path, each="None")
    writer_beat = tmp_path / "writer"
    container.spawn("import time\n"
                    f"f = open({mp + '/w.log'!r}, 'a')\n"  # blocks on the stub
                    "n = 0\n"
                    "while True:\n"
                    "    n += 1; f.write(f'{n}\\n'); f.flush()\n"
                    f"    open({str(writer_beat)!r}, 'w').write(str(n))\n"
                    "    time.sleep(0.01)\n")
    # parked on the stub, so the check below means something
    sock = h.manager.mounts["3"].handle.socket_path
    wait_for(lambda: control_client.status(sock)["parked"] >= 1, 15, "the writer parked")
    assert not writer_beat.exists()
    assert _replace(h, "3", mp, mode="mode=release") == 0
    result = h.wait_terminal("3")
    assert result["phase"] == "rolled_back" and result["failed_in"] == "swapping"
    assert h.status("3")["mode"] == "proxy"
    assert top_mount_at(container.mounts(), mp).fstype.startswith("fuse")
    wait_for(lambda: writer_beat.exists() and read_count(writer_beat) > 5, what="writer")
    real_fd = h.manager.mounts["3"].job.real_fd
    real_log = Path(f"/proc/self/fd/{real_fd}/w.log")
    size = real_log.stat().st_size
    wait_for(lambda: real_log.stat().st_size > size, what="writes reaching the real fs")
    assert not cgroup.frozen() and advances(beat)


class BuggySwapper(RecordingSwapper):
    def swap(self, job: SwapJob, prepared: str) -> dict:
        raise KeyError("a bug, not an OSError")


class PendingSwapper(RecordingSwapper):
    """Stand-in for an engine whose swapped tasks do not finish once thawed (the engine's
    side of that is tested for real in tests/swap/test_freeze_errors.py)."""

    def settle(self, job: SwapJob, timeout: float) -> dict:
        self.settled_while_frozen = CgroupFreezer(job.cgroup).is_frozen()
        return {"pending_tasks": 1, "pending_pids": [4321]}


def test_tasks_still_pending_after_the_thaw_are_on_the_status(make_harness, container, cgroup):
    swapper = PendingSwapper()
    h = make_harness(swapper)
    _, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, mode="mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == "done" and result["error"] is None
    assert result["details"]["pending_tasks"] == 1 and result["details"]["pending_pids"] == [4321]
    assert any("4321" in w and "still hold SPFS" in w for w in result["warnings"]), result["warnings"]
    assert swapper.settled_while_frozen is False and not cgroup.frozen()


def test_status_still_tells_how_the_replace_of_an_exited_spfs_ended(make_harness, container, cgroup):
    h = make_harness()
    _, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, mode="mode=release") == 0
    assert h.wait_terminal("87")["phase"] == "done"
    spfs = h.manager.mounts["87"]
    spfs.handle.stop()

    def forgotten() -> bool:
        h.manager.reap()
        return "87" not in h.manager.mounts
    wait_for(forgotten, 20, "the manager to notice SPFS exited")
    mount = h.status("87")
    assert mount["replace"]["phase"] == "done" and mount["spfs_running"] is False
    listed = h.manager.handle(parse_packet(b"status").request).data["mounts"]
    assert [(m["id"], m["replace"]["phase"]) for m in listed] == [("87", "done")]


def test_a_bug_in_a_step_still_ends_the_replace_thawed(make_harness, container, cgroup):
    h = make_harness(BuggySwapper())
    _, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, mode="mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == "rolled_back" and result["failed_in"] == "swapping"
    assert "internal error" in result["error"] and not cgroup.frozen()


def test_unlisted_binds_of_spfs_are_replaced_too(make_harness, container):
    h = make_harness()
    mp, bind = _mount_spfs(h)
    extra = str(container.base / "extra")
    os.mkdir(extra)
    container.run("mount", "--bind", f"{mp}/sub", extra)
    assert _replace(h, "87", bind, mode="mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == "done" and result["details"]["paths"] == [mp, bind, extra]
    mounts = container.mounts()
    assert top_mount_at(mounts, extra).source == "realfs"
    assert top_mount_at(mounts, extra).root == "/sub"
    assert container.stat(extra).st_dev == container.stat(mp).st_dev
    (job, _), = h.swapper.calls
    assert job.spfs_paths == (mp, bind, extra)


def test_freezer_held_by_another_replace_too_long(make_harness, container, cgroup):
    """The cgroup's lock is bounded too; the prepared swap plan is released."""
    h = make_harness(lock_timeout=0.5)
    _, bind = _mount_spfs(h)
    lock = h.pipeline.locks.lock_for(str(cgroup.path))
    with lock:
        assert _replace(h, "87", bind, mode="mode=release") == 0
        result = h.wait_terminal("87")
    # still proxying: the replace is FROZEN only once the lock is its own and it freezes
    assert result["phase"] == "rolled_back" and result["failed_in"] == "proxy"
    assert result["error_code"] == errno.EBUSY
    assert h.swapper.abandoned == ["plan"] and not h.swapper.calls
    assert h.status("87")["mode"] == "proxy" and not cgroup.frozen()


class ListenerBusySwapper(RecordingSwapper):
    """Stand-in for an engine that finds a listener's queue not empty at the stop (its own
    refusal is tested for real in tests/swap/test_sockets.py) the first `busy` times; it
    records the worker's heartbeat at each try, so the test sees the tasks ran between."""

    def __init__(self, beat: Path, busy: int) -> None:
        super().__init__()
        self.beat, self.busy = beat, busy
        self.beats: list[int] = []
        self.given: list[str | None] = []

    def swap(self, job: SwapJob, prepared: str | None) -> dict:
        self.given.append(prepared)
        self.calls.append((job, CgroupFreezer(job.cgroup).is_frozen()))
        self.beats.append(read_count(self.beat))
        if len(self.calls) <= self.busy:
            from spfs.manager.interfaces import TasksMustRun
            raise TasksMustRun(errno.EAGAIN, "listening socket s has connections not yet accepted")
        return {"recorded": True}


@pytest.mark.parametrize("busy, phase", [(2, "done"), (4, "rolled_back")])
def test_a_busy_listener_gets_the_tasks_thawed_a_moment_then_a_fresh_plan(
        make_harness, container, cgroup, tmp_path, busy, phase):
    beat, _ = _worker(container, cgroup, tmp_path)
    swapper = ListenerBusySwapper(beat, busy)
    h = make_harness(swapper)
    _, bind = _mount_spfs(h)
    assert _replace(h, "87", bind, mode="mode=release") == 0
    result = h.wait_terminal("87")
    assert result["phase"] == phase, result
    tries = min(busy + 1, 4)  # the first plan, then one per thaw (at most 3 thaws)
    assert len(swapper.calls) == tries and all(frozen for _, frozen in swapper.calls)
    assert swapper.given == ["plan"] + [None] * (tries - 1)  # planned anew inside the freeze
    # the worker ran between the tries: the thaws let it (a beat every 10 ms; 50 ms, then
    # 100 ms, ... of thaw). A worker frozen in the middle of rewriting its beat reads 0.
    seen = [b for b in swapper.beats if b]
    assert len(seen) >= 2 and max(seen) > min(seen), swapper.beats
    assert result["details"].get("thawed_for_listeners") == min(busy, 3)
    assert not cgroup.frozen() and advances(beat)
