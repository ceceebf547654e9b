"""The manager's state: its SPFS mounts, and what each request does to them.

`Manager.handle` takes a validated request and returns a `Reply`; it is called from the
control server's connection threads.  Replaces run in their own threads (the text protocol
answers `replace` before doing anything, as the C manager does); `status` reports the real
outcome.  `reap` notices SPFS daemons that exited and implements --exit-with-spfs.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from spfs.manager.interfaces import ReferenceSwapper, SpfsHandle, SpfsLauncher, SpfsSpec
from spfs.sys.nsexec import Namespaces
from spfs.manager.phases import ReplacePhase, ReplaceProgress
from spfs.manager.protocol import (HoldMode, ModeRequest, MountRequest, ReplaceAllRequest,
                                   ReplaceRequest, Reply, Request, SpfsMode, StatusRequest,
                                   SwitchRequest)
from spfs.manager.realmount import RealFs
from spfs.manager.replace import ReplaceJob, ReplacePipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ManagerConfig:
    work_dir: str
    log_dir: str
    verbosity: int = 0
    exit_with_spfs: bool = False


@dataclass
class ManagedSpfs:
    request: MountRequest
    handle: SpfsHandle
    target: Namespaces | None
    mode: SpfsMode
    released: threading.Event = field(default_factory=threading.Event)
    freeze_cgroup: str | None = None
    bindmounts: list[str] = field(default_factory=list)
    ns_mountpoint: str | None = None  # set by a replace that names the container
    job: ReplaceJob | None = None
    thread: threading.Thread | None = None

    @property
    def id(self) -> str:
        return self.request.id

    def replace_active(self) -> bool:
        return self.job is not None and not self.job.progress.phase.terminal

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "mountpoint": self.request.mountpoint,
            "ns_mountpoint": self.ns_mountpoint or self.request.container_mountpoint,
            "ns_pid": self.target.pid if self.target else None,
            "mode": self.mode.value,
            "spfs_pid": self.handle.pid,
            "spfs_running": not self.handle.exited(),
            "hold": "release" if self.released.is_set() else "hold",
            "freeze_cgroup": self.freeze_cgroup,
            "bindmounts": list(self.bindmounts),
            "replace": self.job.progress.snapshot() if self.job else None,
            "real_fs": dataclasses.asdict(self.job.real_fs) if self.job else None,
        }


class Manager:
    def __init__(self, config: ManagerConfig, launcher: SpfsLauncher,
                 pipeline: ReplacePipeline, swapper: ReferenceSwapper) -> None:
        self.config = config
        self.launcher = launcher
        self.pipeline = pipeline
        self.swapper = swapper
        self.mounts: dict[str, ManagedSpfs] = {}
        # the last status of each SPFS that exited: a client that looked too late (the
        # replace done, SPFS gone, we about to exit) still learns how it ended
        self.gone: dict[str, dict[str, Any]] = {}
        self.finished = threading.Event()  # set when --exit-with-spfs says we are done
        self._lock = threading.Lock()
        self._starting: set[str] = set()
        self._had_mounts = False
        self._handlers: dict[type, Callable[[Any], Reply]] = {
            MountRequest: self._mount,
            ModeRequest: self._mode,
            ReplaceRequest: self._replace,
            ReplaceAllRequest: self._replace_all,
            SwitchRequest: self._switch,
            StatusRequest: self._status,
        }

    def handle(self, request: Request) -> Reply:
        try:
            return self._handlers[type(request)](request)
        except OSError as exc:
            log.error("%s failed: %s", type(request).__name__, exc)
            return Reply.error(exc.errno or errno.EIO, str(exc))

    # -- mount
    def _mount(self, req: MountRequest) -> Reply:
        with self._lock:
            if req.id in self.mounts or req.id in self._starting:
                return Reply.error(errno.EEXIST, f"SPFS {req.id} already exists")
            self._starting.add(req.id)
        try:
            target = Namespaces(req.ns_pid, root=req.root) if req.ns_pid else None
            spec = SpfsSpec(
                id=req.id, mode=req.mode, mountpoint=req.mountpoint, target=target,
                work_dir=os.path.join(self.config.work_dir, f"spfs-{req.id}"),
                log_path=os.path.join(self.config.log_dir, f"spfs-{req.id}.log"),
                proxy_dir=req.proxy_dir, proxy_ns_pid=req.ns_pid if req.proxy_dir else None,
                verbosity=self.config.verbosity, manifest=req.manifest)
            handle = self.launcher.start(spec)
            with self._lock:
                self.mounts[req.id] = ManagedSpfs(req, handle, target, req.mode)
                self._had_mounts = True
        finally:
            with self._lock:
                self._starting.discard(req.id)
        log.info("SPFS %s (%s) mounted at %s", req.id, req.mode.value, req.mountpoint)
        return Reply(data={"id": req.id, "spfs_pid": handle.pid})

    def _find(self, mount_id: str) -> ManagedSpfs:
        with self._lock:
            found = self.mounts.get(mount_id)
        if found is None:
            raise OSError(errno.ENOENT, f"no SPFS with id {mount_id}")
        return found

    def _selected(self, mount_id: str | None) -> list[ManagedSpfs]:
        if mount_id is not None:
            return [self._find(mount_id)]
        with self._lock:
            return list(self.mounts.values())

    # -- mode
    def _mode(self, req: ModeRequest) -> Reply:
        for spfs in self._selected(req.id):
            if req.mode is SpfsMode.STUB and spfs.mode is SpfsMode.STUB:
                continue  # already there; the C manager treats this as a no-op too
            if spfs.replace_active() and spfs.job and \
                    spfs.job.progress.phase is not ReplacePhase.HELD:
                raise OSError(errno.EBUSY, f"SPFS {spfs.id} is being replaced")
            spfs.handle.set_mode(req.mode, req.proxy_dir, req.ns_pid)
            spfs.mode = req.mode
            log.info("SPFS %s switched to %s", spfs.id, req.mode.value)
        return Reply()

    # -- replace
    def _replace(self, req: ReplaceRequest) -> Reply:
        spfs = self._find(req.id)
        with self._lock:
            if spfs.replace_active():
                return Reply.error(errno.EBUSY, f"SPFS {req.id} is already being replaced")
            if spfs.job is not None and spfs.job.progress.phase is ReplacePhase.DONE:
                return Reply.error(errno.EALREADY, f"SPFS {req.id} was already replaced")
            if req.freeze_cgroup is not None:
                if spfs.freeze_cgroup not in (None, req.freeze_cgroup):
                    return Reply.error(errno.EEXIST, f"SPFS {req.id} already has freezer "
                                                     f"cgroup {spfs.freeze_cgroup}")
                spfs.freeze_cgroup = req.freeze_cgroup
            if spfs.freeze_cgroup is None:
                return Reply.error(errno.EINVAL, "freeze_cgroup wasn't provided")
            if req.ns_pid is not None:
                # SPFS was mounted outside the container (criu-spfs: CRIU bound it in);
                # only now, after restore, are the container's namespaces known
                if spfs.target is not None and spfs.target.pid != req.ns_pid:
                    return Reply.error(errno.EEXIST, f"SPFS {req.id} already belongs to the "
                                                     f"namespaces of pid {spfs.target.pid}")
                spfs.target = Namespaces(req.ns_pid, root=spfs.request.root)
                spfs.ns_mountpoint = req.ns_mountpoint or spfs.ns_mountpoint
            spfs.bindmounts.extend(b for b in req.bindmounts if b not in spfs.bindmounts)
            self._apply_hold(spfs, req.hold)
            spfs.job = ReplaceJob(
                mount_id=req.id, spfs=spfs.handle, target=spfs.target,
                mountpoint=spfs.ns_mountpoint or spfs.request.container_mountpoint,
                bindmounts=tuple(spfs.bindmounts), freeze_cgroup=spfs.freeze_cgroup,
                real_fs=RealFs(req.source, req.fstype, req.flags, req.data),
                progress=ReplaceProgress(req.id), released=spfs.released,
                path_map=req.path_map, remove_after=req.remove_after)
            spfs.thread = threading.Thread(target=self._run_replace, args=(spfs,),
                                           name=f"replace-{req.id}", daemon=True)
            spfs.thread.start()
        log.info("replace of SPFS %s by %s (%s) queued, %s", req.id, req.source, req.fstype,
                 req.hold.value)
        return Reply(data={"id": req.id, "phase": ReplacePhase.HELD.value})

    def _run_replace(self, spfs: ManagedSpfs) -> None:
        assert spfs.job is not None
        self.pipeline.run(spfs.job)
        if spfs.job.spfs_mode_after is not None:
            spfs.mode = spfs.job.spfs_mode_after

    @staticmethod
    def _apply_hold(spfs: ManagedSpfs, hold: HoldMode) -> None:
        if hold is HoldMode.RELEASE:
            spfs.released.set()
        else:
            spfs.released.clear()

    def _replace_all(self, req: ReplaceAllRequest) -> Reply:
        for spfs in self._selected(None):
            self._apply_hold(spfs, req.hold)
        log.info("replace: %s for all SPFS", req.hold.value)
        return Reply()

    # -- switch
    def _switch(self, req: SwitchRequest) -> Reply:
        report = self.swapper.switch(req.source, req.device, req.target, req.freeze_cgroup,
                                     req.ns_pid)
        return Reply(data={"report": report})

    # -- status
    def _status(self, req: StatusRequest) -> Reply:
        """Running SPFS and, as they ended, those that exited (a client that looks after a
        done SPFS went still learns how its replace ended)."""
        with self._lock:
            gone = {i: s for i, s in self.gone.items() if i not in self.mounts}
        if req.id is not None and req.id in gone:
            mounts = [gone[req.id]]
        else:
            mounts = [spfs.status() for spfs in self._selected(req.id)]
            if req.id is None:
                mounts = [*gone.values(), *mounts]
        return Reply(code=self._outcome_code(mounts), message="status", data={"mounts": mounts})

    @staticmethod
    def _outcome_code(mounts: list[dict[str, Any]]) -> int:
        """The text form has only an int: a failure's errno, EINPROGRESS, or 0."""
        pending = False
        for mount in mounts:
            replace = mount["replace"]
            if replace is None:
                continue
            if replace["error_code"] and replace["phase"] != ReplacePhase.DONE.value:
                return int(replace["error_code"])
            if replace["phase"] not in ("done", "failed", "rolled_back"):
                pending = True
        return errno.EINPROGRESS if pending else 0

    # -- lifecycle
    def reap(self) -> None:
        """Forget SPFS daemons that exited; with --exit-with-spfs, finish after the last."""
        with self._lock:
            gone = [s for s in self.mounts.values() if s.handle.exited()]
        for spfs in gone:
            if spfs.job is not None:
                spfs.job.cancelled.set()
                if spfs.thread is not None:
                    spfs.thread.join(timeout=1.0)
                if spfs.thread is not None and spfs.thread.is_alive():
                    continue  # the pipeline is still unwinding; look again next time
                if spfs.job.real_fd is not None:
                    os.close(spfs.job.real_fd)
                    spfs.job.real_fd = None
            with self._lock:
                self.mounts.pop(spfs.id, None)
                self.gone[spfs.id] = spfs.status()
            log.info("SPFS %s (pid %s) exited", spfs.id, spfs.handle.pid)
        with self._lock:
            if self.config.exit_with_spfs and self._had_mounts and not self.mounts \
                    and not self._starting:
                self.finished.set()

    def final_statuses(self) -> list[dict[str, Any]]:
        """Every SPFS this manager had: the exited ones as they ended, then the others."""
        with self._lock:
            running = list(self.mounts.values())
            ended = list(self.gone.values())
        return ended + [spfs.status() for spfs in running]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop held replaces; running ones get `timeout` to finish.  SPFS daemons stay:
        the container's files live on them."""
        with self._lock:
            mounts = list(self.mounts.values())
        for spfs in mounts:
            if spfs.job is not None and spfs.job.progress.phase is ReplacePhase.HELD:
                spfs.job.cancelled.set()
        for spfs in mounts:
            if spfs.thread is not None:
                spfs.thread.join(timeout)
