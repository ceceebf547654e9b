"""`criu-spfs restore`: restore a container dumped by `criu-spfs dump`, with SPFS standing in
for each NFS share until spfs-manager has put the real NFS back, live.

1. Read the dump record (which shares, where); start spfs-manager.
2. `criu restore` with every NFS mount of the dump mapped to a private staging directory of
   the host (a bind's sub-root to the same sub-directory), our action script, and a stage
   bridge. Meanwhile, CRIU reading its images: read and check the images, build each
   share's SPFS manifest (anything hostile or broken is refused here, before anything is
   mounted) and mount one SPFS per share in restore mode on its staging directory.
3. CRIU binds the staging directories only when it builds the container's mount namespace:
   its setup-namespaces stage, just before, waits for the mounts (or fails the restore
   with the reason). post-restore puts back the file offsets CRIU moved (fd_offsets.py)
   and queues a held replace per share (the container's namespaces and cgroup exist
   now), network-unlock (CRIU is done with the files) turns
   every SPFS to stub, pre-resume waits for that, post-resume releases the replaces.
4. The staging mounts are detached (the container holds its own binds); the manager mounts
   NFS in the container, proxies, freezes, swaps and moves mounts, and exits after the last
   SPFS. With `--wait` we follow that to the end; without, a detached watcher does, so the
   timeline JSON in DIR is complete either way.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from spfs.criu.cgroups import freezer_cgroup_of
from spfs.criu.dump import ACTION_SCRIPT
from spfs.criu.fd_offsets import DumpedOffset, offsets_to_put_back, put_back
from spfs.criu.manager_link import (MANAGER_COMMAND, MOUNT_REQUEST_TIMEOUT, ManagerError,
                                    ManagerLink)
from spfs.criu.restorable import (RestoreError, ShareRestore, check_image_names, check_images,
                                   load_shares)
from spfs.criu.runner import CriuError, run_criu
from spfs.criu.stages import StageServer
from spfs.fs.manifest import dump_manifest
from spfs.sys.children import pid_alive, reap_or_kill, terminate
from spfs.sys.daemon import stdio_to_devnull
from spfs.sys.mountapi import MNT_DETACH, MS_BIND, MS_PRIVATE, MS_SHARED, mount, umount2
from spfs.sys.mountinfo import read_mountinfo, top_mount_at
from spfs.timeline import Timeline

log = logging.getLogger(__name__)

TIMELINE_NAME = "criu-spfs-restore.json"
RESTORE_TIMEOUT = 600.0
DONE_PHASES = ("done", "failed", "rolled_back")
STAGE_TIMEOUT = 60.0  # for a stage CRIU ran to be handled here
MOUNT_TIMEOUT = 180.0  # the manager's start and every SPFS mount, while CRIU waits
EXIT_TIMEOUT = 60.0  # after the replace: SPFS exits once unused, the manager after it
# How long each stage's handler may take (then the stage fails, named; CRIU waits for no
# longer): a little more than the bounded waits inside it, whose own errors say more
STAGE_LIMITS = {"setup-namespaces": MOUNT_TIMEOUT + 10, "post-restore": STAGE_TIMEOUT,
                "network-unlock": STAGE_TIMEOUT, "pre-resume": STAGE_TIMEOUT + 10,
                "post-resume": STAGE_TIMEOUT + 10}
PHASE_NOTES = {  # replace phases worth a line of the timeline when they are reached
    "proxy": "NFS mounted in the container; SPFS proxies to it",
    "frozen": "container frozen",
    "thawed": "references and mounts moved; container thawed",
}


@dataclass
class RestoreConfig:
    images: Path
    criu: str = "criu"
    extra: list[str] = field(default_factory=list)
    wait: bool = False
    work_dir: Path | None = None
    freeze_cgroup: str | None = None
    mount_deadline: float = 300.0
    wait_timeout: float = 900.0
    verbose: bool = False
    env: dict[str, str] = field(default_factory=dict)  # for CRIU and its action scripts
    standby: str | None = None  # spfs-standby's socket, used when it answers
    manager_command: list[str] | None = None  # default: spfs.manager.cli in this Python


def criu_restore_argv(criu: str, images: Path, shares: list[ShareRestore],
                      extra: list[str]) -> list[str]:
    argv = [criu, "restore", "-D", str(images), "-o", "restore.log", "-v4", "--file-locks",
            "--action-script", str(ACTION_SCRIPT)]
    for s in shares:
        assert s.staging is not None
        for m in s.share.mounts:
            host = s.staging / m.root.lstrip("/")  # the share's root: the staging dir itself
            argv += ["--external", f"mnt[{m.external_key}]:{host}"]
    return argv + extra


class Background:
    """One call in a thread, waited for at most *timeout*; its exception is kept for
    whoever waits for it."""

    def __init__(self, work: Callable[[], None], name: str, late: str,
                 timeout: float) -> None:
        self._work = work
        self.timeout = timeout
        self._late = f"{late} in {timeout:.0f} s"  # the error if still running at the end
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self._work()
        except BaseException as e:  # handed to the waiter
            self._error = e

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        if self._thread.ident is not None:
            self._thread.join(self.timeout)

    def finish(self) -> None:
        """Wait for it, then raise what it failed with (or that it is still running)."""
        self.join()
        self.raise_error()

    def raise_error(self) -> None:
        if self._thread.is_alive():
            raise RestoreError(self._late)
        if self._error is not None:
            raise self._error

    def error_text(self) -> str | None:
        """What it failed with, once it ended."""
        if self._thread.is_alive() or self._error is None:
            return None
        return str(self._error)


class Restore:
    def __init__(self, config: RestoreConfig, timeline: Timeline | None = None) -> None:
        self.config = config
        self.images = Path(config.images).resolve()
        self.tl = timeline or Timeline()
        self.work = Path(config.work_dir) if config.work_dir else WORK_ROOT / "not-yet"
        self.manager = ManagerLink(self.work / "manager", self.images / "spfs-manager",
                                   command=tuple(config.manager_command or MANAGER_COMMAND))
        self.shares: list[ShareRestore] = []
        self.init_pid = 0
        self.offsets: list[DumpedOffset] = []
        self.frozen_ms: float | None = None
        self.owns_work = False
        self._mounting = Background(self.mount_spfs, "spfs-mounts", "SPFS not mounted",
                                    MOUNT_TIMEOUT)
        self._queueing: Background | None = None
        self._stubbing: Background | None = None
        self._starting = Background(self._start_manager, "manager-start",
                                    "spfs-manager not started", MOUNT_TIMEOUT)
        self._forked = False
        self._stub_at: float | None = None  # boot clock when SPFS reached stub mode

    # -- 1, 2
    def prepare(self) -> None:
        """The work directory, spfs-manager starting meanwhile (it mounts nothing until
        asked), the shares of the record and their staging directories."""
        # first of all (no manager, no mount, no CRIU yet): a FIFO, device or symlink in
        # the image dir would block us or CRIU, or lead either out of it
        check_image_names(self.images)
        if self.config.work_dir is None:
            self.work = _fresh_work_dir()
            self.manager.work_dir = self.work / "manager"
        elif self.work.exists():
            raise RestoreError(f"work directory {self.work} exists: another restore?")
        else:
            self.work.mkdir(mode=0o700, parents=True)
        self.owns_work = True
        # A private mount of its own: SPFS mounted below must not propagate into peer
        # namespaces (each copy would pin SPFS alive after the replace)
        try:
            mount(str(self.work), str(self.work), None, MS_BIND, None)
            mount("none", str(self.work), None, MS_PRIVATE, None)
        except OSError as e:
            raise RestoreError(f"private mount of {self.work}: {e}") from None
        self._starting.start()
        self.shares = load_shares(self.images)
        for s in self.shares:
            s.staging = self.work / s.id / "mnt"
            s.staging.mkdir(parents=True)
            # CRIU's root task copies our mount namespace when it is forked, before the
            # SPFS mounts are there: each staging directory is a shared mount of its own
            # (a peer group of one, in our private work dir) so that the SPFS mounted on it
            # later propagates into that copy, where CRIU binds it from. Detaching it
            # propagates too: no copy keeps SPFS alive.
            try:
                mount(str(s.staging), str(s.staging), None, MS_BIND, None)
                mount("none", str(s.staging), None, MS_SHARED, None)
            except OSError as e:
                raise RestoreError(f"shared mount of {s.staging}: {e}") from None

    def _start_manager(self) -> None:
        self._forked = self.manager.start(self.config.mount_deadline, self.config.verbose,
                                          self.config.standby)
        self.tl.note("spfs-manager started" + (" by spfs-standby" if self._forked else ""))

    def mount_spfs(self) -> None:
        """Check the images, then mount each share's SPFS on its staging directory once
        spfs-manager is up."""
        self.offsets = offsets_to_put_back(check_images(self.images, self.shares))
        self.tl.note(f"images checked: {len(self.shares)} NFS share(s), "
                     f"{sum(len(s.manifest.entries) for s in self.shares if s.manifest)} "
                     f"stub entries")
        for s in self.shares:
            assert s.staging is not None and s.manifest is not None
            dump_manifest(s.manifest, s.staging.parent / "manifest.json")
        self._starting.finish()
        for s in self.shares:
            assert s.staging is not None
            self.manager.request(MOUNT_REQUEST_TIMEOUT, cmd="mount", id=s.id, mode="restore",
                                 mountpoint=str(s.staging),
                                 manifest=str(s.staging.parent / "manifest.json"))
        self.tl.note(f"SPFS mounted in restore mode ({len(self.shares)} share(s))")

    # -- 3
    def run_criu(self) -> None:
        """CRIU starts while the images are checked and SPFS mounted: its start (exec, its
        own reading of the images, the root task) overlaps them, and its setup-namespaces
        stage, before it builds the mount namespace, waits for them."""
        stages = StageServer(self.work / "stages", self._on_stage, STAGE_LIMITS)
        stages.start()
        self._mounting.start()
        argv = criu_restore_argv(self.config.criu, self.images, self.shares, self.config.extra)
        self.tl.note("criu restore started")
        try:
            seconds = run_criu(argv, self.images / "restore.log", RESTORE_TIMEOUT,
                               dict(os.environ) | self.config.env | stages.env)
            if not stages.errors:
                self.tl.note("criu restore done: processes running on SPFS", seconds)
            # CRIU does not wait for post-resume's handling (the release), we do
            if not stages.wait_handled("post-resume", STAGE_TIMEOUT):
                stages.errors.append(f"post-resume not handled in {STAGE_TIMEOUT:.0f} s")
            stages.errors += self._stages_given_up(stages.gave_up)
        except CriuError as e:
            # a stage we failed (images refused, SPFS not mounted, ...) is why CRIU gave up:
            # say so first; so is a refusal of the images CRIU failed on before it waited
            self._mounting.join()
            refused = self._mounting.error_text()
            errors = [*stages.errors, str(e)]
            if refused and not any(refused in err for err in errors):
                errors.insert(0, refused)
            raise RestoreError("; ".join(errors)) from None
        finally:
            stages.stop()
            self._mounting.join()  # CRIU may have failed before it waited
            for work in (self._queueing, self._stubbing):
                if work is not None:
                    work.join()
        if stages.errors:
            # processes run, but not as planned: SPFS may still be in restore mode
            raise RestoreError("action script stages failed: " + "; ".join(stages.errors))

    def _stages_given_up(self, gave_up: dict[str, float]) -> list[str]:
        """Stages whose script stopped waiting for us while CRIU went on: an error, except a
        pre-resume given up after SPFS was in stub mode (the tasks resumed on the stub, as
        planned; CRIU 3.17 resumes them whether pre-resume fails or not)."""
        errors = []
        for stage, when in gave_up.items():
            if stage == "pre-resume" and self._stub_at is not None and self._stub_at <= when:
                self.tl.note("warning: pre-resume's answer came late, but SPFS was in stub "
                             "mode before CRIU resumed the processes")
                continue
            errors.append(f"{stage}: the action script stopped waiting for criu-spfs (no "
                          f"answer within its limit) and CRIU went on without this stage")
        return errors

    def raise_mount_error(self) -> None:
        """A CRIU that ran to the end waited for the mounts; this is for one that did not
        reach setup-namespaces (then its own error was raised first)."""
        self._mounting.raise_error()

    def _on_stage(self, stage: str, pid: int) -> None:
        if stage == "setup-namespaces":
            self._mounting.finish()
        elif stage == "post-restore":
            self.init_pid = pid
            self.tl.note(f"criu: processes restored (init pid {pid})")
            # CRIU has bound every SPFS into the container: the staging mounts go now,
            # before anything copies our mount namespace with them (a copy would keep SPFS
            # alive after the replace). CRIU runs the last --action-script first, so
            # scripts given after ours may already run at this stage, but not at later ones.
            self.detach_staging()
            # done while CRIU cleans up and unlocks the network; pre-resume only waits
            self._queueing = Background(functools.partial(self._after_restore, pid),
                                        "queue-replaces", "replaces not queued",
                                        STAGE_TIMEOUT)
            self._queueing.start()
        elif stage == "network-unlock":
            # CRIU is done with the files (the ghosts are cleaned before this stage); what
            # it still does before pre-resume (creds, sigreturn) overlaps the switch to stub
            self._stubbing = Background(self._to_stub, "spfs-stub", "SPFS not in stub mode",
                                        STAGE_TIMEOUT)
            self._stubbing.start()
        elif stage == "pre-resume":
            self.init_pid = pid
            if self._stubbing is None:
                raise RestoreError("pre-resume without network-unlock")
            self._stubbing.finish()
        elif stage == "post-resume":
            self.tl.note("processes resumed")
            self.manager.request(cmd="replace", all=True, mode="release")
            self.tl.note("replace released (spfs-manager mounts NFS in the container)")

    def _after_restore(self, init_pid: int) -> None:
        # before the switch to stub (which waits for this step): SPFS still answers
        self._put_back_offsets(init_pid)
        self._queue_replaces(init_pid)

    def _put_back_offsets(self, init_pid: int) -> None:
        moved, problems = put_back(self.offsets, init_pid)
        if moved:
            self.tl.note(f"{moved} file offset(s) put back where they were dumped (CRIU "
                         f"moved them while checking ELF build-ids)")
        for problem in problems:
            self.tl.note(f"warning: a file offset may be off: {problem}")

    def _to_stub(self) -> None:
        # (setup-namespaces waited for the mounts already; CRIU skips that stage for a tree
        # without namespaces of its own, which has no external mounts to bind either)
        self._mounting.finish()
        if self._queueing is None:
            raise RestoreError("network-unlock without post-restore")
        self._queueing.finish()
        self.manager.request(cmd="mode", all=True, mode="stub")
        self._stub_at = time.clock_gettime(time.CLOCK_BOOTTIME)  # the script's clock
        self.tl.note("SPFS in stub mode: NFS access blocks until the real NFS is back")

    def _queue_replaces(self, pid: int) -> None:
        cgroup = self.config.freeze_cgroup or freezer_cgroup_of(pid)
        for s in self.shares:
            sh = s.share
            primary = sh.primary
            self.manager.request(
                cmd="replace", id=s.id, source=sh.source, type=sh.fstype, flags=primary.flags,
                freeze_cgroup=cgroup, mode="hold", data=sh.mount_data, ns_pid=pid,
                ns_mountpoint=primary.mountpoint,
                bindmounts=[m.mountpoint for m in sh.mounts if m is not primary] or None,
                path_map={r.silly: r.remap for r in s.remaps} or None,
                remove_after=[r.remap for r in s.remaps] or None)
        log.info("replaces queued (held) for pid %d, freezer cgroup %s", pid, cgroup)

    def detach_staging(self) -> None:
        """The container has its own binds of each SPFS; the host's staging mounts (SPFS
        and the shared bind under it) go (by the syscall: an umount process would hold the
        restore for its start)."""
        for s in self.shares:
            if s.staging is None:
                continue
            for _ in range(STAGING_LAYERS):
                if not _mounted_at(s.staging):
                    break
                try:
                    umount2(str(s.staging), MNT_DETACH)
                except OSError as e:
                    log.warning("detaching %s: %s", s.staging, e)
                    break

    # -- 4
    def follow(self) -> bool:
        """Until every share is real NFS again and spfs and the manager have exited."""
        deadline = time.monotonic() + self.config.wait_timeout
        seen: dict[str, set[str]] = {}
        final: dict[str, dict] = {}
        ok = True
        while len(final) < len(self.shares):
            if time.monotonic() > deadline:
                raise RestoreError(f"replace not finished in {self.config.wait_timeout:.0f} s")
            try:
                mounts = self.manager.status()
            except OSError:
                # the manager exited (after its last SPFS went): how the replaces we did
                # not see end ended is in what it left
                for m in self.manager.final_status():
                    if m["id"] not in final:
                        ok &= self._note_progress(m, seen.setdefault(m["id"], set()), final)
                break
            for m in mounts:
                ok &= self._note_progress(m, seen.setdefault(m["id"], set()), final)
            time.sleep(0.1)
        spfs_pids = [m.get("spfs_pid") for m in final.values() if m.get("spfs_pid")]
        self._wait_exit(spfs_pids, deadline)
        return ok and len(final) == len(self.shares)

    def _note_progress(self, m: dict, seen: set[str], final: dict[str, dict]) -> bool:
        replace = m.get("replace") or {}
        phase = replace.get("phase")
        # each at the time the manager entered it, not when our poll saw it
        entered = {t["phase"]: t.get("started_at") for t in replace.get("timings_ms") or []}
        for done in [*entered, phase]:
            if done in PHASE_NOTES and done not in seen:
                seen.add(done)
                self.tl.note(f"{m['id']}: {PHASE_NOTES[done]}", when=entered.get(done))
        if phase in DONE_PHASES and m["id"] not in final:
            final[m["id"]] = m
            timings = {t["phase"]: t["ms"] for t in replace.get("timings_ms") or []}
            frozen = sum(timings.get(p, 0) for p in ("frozen", "swapping", "mounts_moved"))
            self.frozen_ms = max(self.frozen_ms or 0, frozen)
            if phase == "done":
                self.tl.note(f"{m['id']}: replaced by {m['real_fs']['source']} "
                             f"(frozen window {frozen:.0f} ms)")
                for warning in replace.get("warnings") or []:  # e.g. tasks still on SPFS
                    self.tl.note(f"{m['id']}: {warning}")
                return True
            self.tl.note(f"{m['id']}: replace {phase}: {replace.get('error')}")
            return False
        return True

    def _wait_exit(self, spfs_pids: list[int], deadline: float) -> None:
        deadline = min(deadline, time.monotonic() + EXIT_TIMEOUT)
        while any(pid_alive(p) for p in spfs_pids) or self.manager.alive():
            if time.monotonic() > deadline:
                raise RestoreError("spfs or spfs-manager still running after the replace")
            time.sleep(0.1)
        self.tl.note("spfs and spfs-manager exited")

    # -- failure
    def abort(self) -> None:
        """No SPFS mount, daemon or staging dir left behind by a failed restore."""
        self._starting.join()  # a manager still starting is stopped too
        self._mounting.join()
        self.detach_staging()
        spfs_pids = []
        if self.manager.alive():
            try:
                spfs_pids = [m["spfs_pid"] for m in self.manager.status() if m.get("spfs_pid")]
            except OSError:
                pass
            self.manager.stop()
        deadline = time.monotonic() + 10
        for pid in spfs_pids:
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            # SIGTERM, then SIGKILL: a stopped or stuck SPFS must not outlive the restore
            if not terminate(pid, 5.0):
                log.warning("spfs %d ignored SIGTERM for 5 s: killed it", pid)
        self.cleanup_work()

    def cleanup_work(self) -> None:
        if not self.owns_work or not self.work.exists():
            return
        for s in self.shares:
            if s.staging is not None and _mounted_at(s.staging):
                log.warning("%s still mounted: leaving %s", s.staging, self.work)
                return
        # (a bind of a directory onto itself: os.path.ismount cannot tell)
        try:
            umount2(str(self.work), MNT_DETACH)
        except OSError as e:
            log.warning("detaching %s: %s", self.work, e)
        shutil.rmtree(self.work, onerror=lambda _f, path, exc: log.warning(
            "cleaning %s: %s", path, exc[1]))

    def save_timeline(self, **extra: object) -> Path:
        path = self.images / TIMELINE_NAME
        self.tl.save(path, init_pid=self.init_pid, frozen_window_ms=self.frozen_ms, **extra)
        return path


WORK_ROOT = Path("/run/criu-spfs")
STAGING_LAYERS = 2  # SPFS on the staging directory's own shared bind


def _mounted_at(path: Path) -> bool:
    """By mountinfo: os.path.ismount cannot tell a bind of a directory onto itself."""
    return top_mount_at(read_mountinfo(), str(path)) is not None


def _fresh_work_dir() -> Path:
    WORK_ROOT.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="restore-", dir=WORK_ROOT))


def retry_hint(images: Path) -> str:
    """A restore that failed before the processes ran changed no image: it can be run again."""
    return (f"Nothing was restored and the images in {images} are unchanged: once the cause "
            f"is fixed, run criu-spfs restore -D {images} again")


def restore(config: RestoreConfig, timeline: Timeline | None = None) -> Restore:
    """Returns once processes run (config.wait: once NFS is back and the helpers exited)."""
    r = Restore(config, timeline)
    try:
        r.prepare()
        r.run_criu()
        r.raise_mount_error()
    except (RestoreError, ManagerError, OSError) as e:
        r.tl.note(f"restore failed: {e}")
        r.abort()
        r.save_timeline(ok=False, error=str(e))
        raise RestoreError(f"{e}. {retry_hint(config.images)}") from None
    except BaseException as e:  # the caller's timeout, ^C: still leave nothing behind
        r.tl.note(f"restore interrupted: {e!r}")
        r.abort()
        r.save_timeline(ok=False, error=f"interrupted: {e!r}")
        raise
    r.detach_staging()
    if config.wait:
        ok = r.follow()
        r.cleanup_work()
        r.save_timeline(ok=ok)
        if not ok:
            raise RestoreError("a replace failed: processes keep running on SPFS (proxy); "
                               f"see {r.manager.log_dir}")
    else:
        r.save_timeline(ok=True, pending=True)
        _follow_in_background(r)
    return r


def _follow_in_background(r: Restore) -> None:
    """A detached child follows the replace and completes the timeline JSON. It is a fork of
    this whole program, which is safe only while it has one thread: the stage handlers have
    ended by now, unless one is stuck past its limit, and then nobody follows (the manager
    finishes the replace all the same; its status tells how it ended)."""
    if threading.active_count() > 1:
        running = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        r.tl.note(f"not following the replace in the background: threads still run ({running}); "
                  f"spfs-manager's status tells how it ends")
        r.save_timeline(ok=True, pending=True, followed=False)
        return
    child = os.fork()
    if child != 0:
        reap_or_kill(child, 10.0)  # the intermediate exits at once
        return
    try:
        os.setsid()
        if os.fork() != 0:
            os._exit(0)
        stdio_to_devnull()
        try:
            ok = r.follow()
            r.cleanup_work()
            r.save_timeline(ok=ok)
        except Exception as e:
            r.save_timeline(ok=False, error=str(e))
    finally:
        os._exit(0)
