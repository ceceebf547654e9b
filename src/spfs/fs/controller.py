"""Mode changes, status and the other control-socket commands, on the trio loop.

A mode change (all steps logged with their durations):
 1. check the transition and open the new target (nothing changes if that fails);
 2. invalidate the kernel caches the new mode must not see (attributes of every inode; the page cache of every file when leaving restore mode, changing the
    target or entering stub) while the old mode still answers, so the invalidation cannot
    wait on a parked request;
 3. park new requests (switching), invalidate attributes again, and when leaving restore
    mode the page cache of files read or written during step 2;
 4. re-bind inodes and restore-mode handles to the new target, then open the gate:
    parked requests run in the new mode. Backend calls of the old target still running
    are waited for first (bounded: one stuck on a dead target must not block the switch
    away from it), and the openat2 per inode runs in a worker, so the loop keeps serving
    the control socket, FORGET and RELEASE while requests stay parked.

Every command that changes something (a mode change, invalidate, add_manifest_entries)
holds the controller's lock: one never runs in the middle of another. status does not.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any

import trio

from spfs.fs import invalidation
from spfs.fs.inode_budget import InodeBudget
from spfs.fs.inodes import ROOT_INODE
from spfs.fs.manifest import ManifestEntry, ManifestError, load_manifest, parse_entries
from spfs.fs.modes import Mode, ModeError, check_transition
from spfs.fs.operations import SpfsOperations
from spfs.fs.proxy_backend import ProxyBackend
from spfs.fs.restore_backend import RestoreBackend
from spfs.fs import rebind
from spfs.fs.rebind import RebindResult, drop_restore_nodes
from spfs.fs.target_dir import TargetDir, open_target
from spfs.fs.workers import WorkerPool
from spfs.sys.fds import close_quietly

log = logging.getLogger(__name__)

INVALIDATE_TIMEOUT_S = 10.0
OPEN_TARGET_TIMEOUT_S = 30.0
# How long a switch waits for backend calls of the old target to end before re-binding
# anyway (their results are then dropped: the old backend is retired).
DRAIN_TIMEOUT_S = 5.0
# A re-bind that makes no progress for this long (the new target hangs) fails the switch.
REBIND_STALL_S = 30.0
# Reading a manifest file named on the control socket (up to 512 MiB of JSON).
MANIFEST_TIMEOUT_S = 300.0


@dataclasses.dataclass
class SwitchRecord:
    old: str
    new: str
    proxy_dir: str | None
    seconds: float = 0.0
    invalidate_seconds: float = 0.0
    rebind_seconds: float = 0.0
    released: int = 0
    rebound: int = 0
    stale: int = 0
    reopened: int = 0
    broken: int = 0
    invalidation_complete: bool = True


class FsController:
    def __init__(self, ops: SpfsOperations, budget: InodeBudget | None = None,
                 target: TargetDir | None = None) -> None:
        self.ops = ops
        self.pool: WorkerPool = ops.pool
        self.budget = budget
        self.target = target
        # --proxy-dir given while starting in another mode: the target of a later switch
        # to proxy that names none (not opened before then: it may not be there yet).
        self.default_target: tuple[str, int | None] | None = None
        self.last_switch: SwitchRecord | None = None
        self.switches = 0
        self._lock = trio.Lock()

    @property
    def mode(self) -> Mode:
        return self.ops.gate.mode

    def install_target(self, target: TargetDir) -> None:
        """Make *target* the proxy backend (used at start and by switches)."""
        self.target = target
        self.ops.proxy = ProxyBackend(self.ops.table, self.ops.handles, self.ops.timeouts,
                                      self.pool, target.fd, target.path, self.budget)

    # -- mode changes --------------------------------------------------------------------
    async def set_mode(self, wanted: Mode, proxy_dir: str | None = None,
                       ns_pid: int | None = None) -> SwitchRecord:
        async with self._lock:
            return await self._set_mode(wanted, proxy_dir, ns_pid)

    async def _open_target(self, proxy_dir: str | None, ns_pid: int | None) -> TargetDir:
        if not proxy_dir:
            raise ModeError("proxy mode needs a proxy directory")
        with trio.move_on_after(OPEN_TARGET_TIMEOUT_S):
            return await trio.to_thread.run_sync(open_target, proxy_dir, ns_pid,
                                                 abandon_on_cancel=True)
        raise ModeError(f"opening proxy directory {proxy_dir} timed out after "
                        f"{OPEN_TARGET_TIMEOUT_S:.0f} s")

    async def _set_mode(self, wanted: Mode, proxy_dir: str | None,
                        ns_pid: int | None) -> SwitchRecord:
        if wanted is Mode.PROXY and not proxy_dir and self.default_target is not None:
            proxy_dir, ns_pid = self.default_target
        gate, ops = self.ops.gate, self.ops
        old = gate.mode
        check_transition(old, wanted)
        start = time.monotonic()
        record = SwitchRecord(old=old.value, new=wanted.value, proxy_dir=proxy_dir)
        target = await self._open_target(proxy_dir, ns_pid) if wanted is Mode.PROXY else None
        log.info("mode change %s -> %s%s started (%d parked requests, %d open handles)",
                 old.value, wanted.value, f" ({proxy_dir})" if proxy_dir else "",
                 gate.parked, len(ops.handles))
        same_target = (target is not None and self.target is not None
                       and (target.dev, target.ino) == (self.target.dev, self.target.ino)
                       and old is not Mode.RESTORE)
        # Page cache to drop: restore bytes, an old target's bytes, and anything a stub
        # would otherwise serve without parking.
        drop_data = (old is Mode.RESTORE or wanted is Mode.STUB
                     or (old is Mode.PROXY and not same_target))

        # Step 2: with the old mode still answering.
        inv_start = time.monotonic()
        if old is not Mode.STUB:
            ops.cache_fills = set()
            target_changes = old is Mode.RESTORE or (old is Mode.PROXY and target is not None
                                                      and not same_target)
            result = await invalidation.invalidate(
                self._batch(data=drop_data, file_entries=target_changes), INVALIDATE_TIMEOUT_S)
            record.invalidation_complete = result.completed
        # Step 3: park, then catch what was cached meanwhile. Only restore bytes are worth
        # a wait here (it can be held up by a read parked on that inode); a page cached
        # from a target in that instant holds that target's real bytes.
        gate.begin_switch()
        try:
            fills, ops.cache_fills = ops.cache_fills or set(), None
            if old is not Mode.STUB:  # nothing was cached while everything was parked
                invalidation.invalidate_attrs_now(list(ops.table.inodes))
            if old is Mode.RESTORE and fills:
                result = await invalidation.invalidate(
                    invalidation.InvalidationBatch(data_inodes=sorted(fills)), INVALIDATE_TIMEOUT_S)
                record.invalidation_complete &= result.completed
            record.invalidate_seconds = time.monotonic() - inv_start
            # Step 4.
            rebind_start = time.monotonic()
            if target is not None:
                await self._switch_target(old, target, same_target, record)
            record.rebind_seconds = time.monotonic() - rebind_start
        except BaseException:
            if target is not None and target is not self.target:
                close_quietly(target.fd)
            gate.abort_switch()
            raise
        record.released = gate.parked
        gate.finish_switch(wanted)
        if wanted is Mode.PROXY:
            self._close_deferred()
        record.seconds = time.monotonic() - start
        self.last_switch = record
        self.switches += 1
        log.info("mode change %s -> %s done in %.1f ms (invalidate %.1f ms, rebind %.1f ms; "
                 "released %d parked, rebound %d, stale %d, reopened %d, broken %d%s)",
                 old.value, wanted.value, record.seconds * 1e3, record.invalidate_seconds * 1e3,
                 record.rebind_seconds * 1e3, record.released, record.rebound, record.stale,
                 record.reopened, record.broken,
                 "" if record.invalidation_complete else ", invalidation still pending")
        return record

    async def _switch_target(self, old: Mode, target: TargetDir, same_target: bool,
                             record: SwitchRecord) -> None:
        ops = self.ops
        if same_target:
            close_quietly(target.fd)  # nothing moves: keep every binding as it is
            return
        previous = ops.proxy
        await self.pool.drain(DRAIN_TIMEOUT_S, "switch")
        if previous is not None:
            # From here on, what its calls still running find is not bound (they answer EIO).
            previous.retired = True
        try:
            result = await self._rebind(target)
        except BaseException:
            if previous is not None:
                previous.retired = False
            raise
        if old is Mode.RESTORE or ops.restore is not None:
            drop_restore_nodes(ops.table)
            ops.restore = None
        self.install_target(target)
        if previous is not None:
            previous.close()
        record.rebound, record.stale = result.rebound, result.stale
        record.reopened, record.broken = result.reopened, result.broken

    async def _rebind(self, target: TargetDir) -> RebindResult:
        """Re-bind every inode and handle to *target*: the lookups in a worker, bounded by
        REBIND_STALL_S without progress; nothing changes if it fails."""
        ops = self.ops
        planned = rebind.plan(ops.table, ops.handles, target)
        progress = rebind.Progress(len(planned.to_open))
        if len(planned.to_open) > 1000:
            log.info("re-binding %d inodes and %d handles to %s", len(planned.to_open),
                     len(planned.handles), target.path)
        opened: rebind.Opened | None = None
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                seen = -1
                while True:
                    if progress.done == seen:
                        progress.cancel()
                        nursery.cancel_scope.cancel()
                        return
                    seen = progress.done
                    await trio.sleep(REBIND_STALL_S)

            async def work() -> None:
                nonlocal opened
                opened = await self.pool.run(None, rebind.open_all, planned, progress)
                nursery.cancel_scope.cancel()
            nursery.start_soon(watch)
            nursery.start_soon(work)
        if opened is None:
            progress.cancel()   # closes what the worker opens should it finish later
            raise ModeError(f"re-binding to {target.path} stalled at {progress.done} of "
                            f"{progress.total} inodes for {REBIND_STALL_S:.0f} s")
        return rebind.apply(ops.table, ops.handles, target, planned, opened,
                            self.pool.close_soon)

    def _batch(self, data: bool, file_entries: bool = False,
               entries: bool = False) -> invalidation.InvalidationBatch:
        """Directory entries are left alone unless *entries*: the kernel's entry
        invalidation (d_invalidate) also detaches whatever is mounted on or below the name.
        With every inode's attributes invalidated, each use of a cached name still has to
        ask SPFS (a stat, an open, a permission check), so the stub is not bypassed.
        *file_entries* drops the names of non-directories only (a mount on a single file
        is rare), so that after a change of target they are looked up again at once."""
        table = self.ops.table
        files = [ino for ino, inode in table.inodes.items() if not inode.is_dir]
        if entries:
            names = list(table.entries)
        elif file_entries:
            names = [key for ino in files for key in table.inodes[ino].names]
        else:
            names = []
        return invalidation.InvalidationBatch(attr_inodes=list(table.inodes),
                                              data_inodes=files if data else [], entries=names)

    def _close_deferred(self) -> None:
        fds = self.ops.take_deferred_closes()
        if fds:
            # A close can block on a target that was down; never on the loop thread.
            trio.lowlevel.spawn_system_task(functools.partial(
                trio.to_thread.run_sync, _close_all, fds, abandon_on_cancel=True))

    # -- other commands ------------------------------------------------------------------
    async def invalidate(self, paths: list[str] | None, entries: bool = False) -> dict[str, Any]:
        """Drop attributes and page cache (and, if asked, directory entries: beware that
        this detaches mounts on or below those names) of *paths* or of every inode."""
        async with self._lock:
            return await self._invalidate(paths, entries)

    async def _invalidate(self, paths: list[str] | None, entries: bool) -> dict[str, Any]:
        table = self.ops.table
        if paths is None:
            batch = self._batch(data=True, entries=entries)
        else:
            inos = [self._find(path) for path in paths]
            batch = invalidation.InvalidationBatch(
                attr_inodes=inos, data_inodes=inos,
                entries=[key for ino in inos for key in table.inodes[ino].names] if entries else [])
        result = await invalidation.invalidate(batch, INVALIDATE_TIMEOUT_S)
        return {"items": len(batch), "completed": result.completed,
                "seconds": round(result.seconds, 6), "errors": result.errors}

    def _find(self, path: str) -> int:
        ino = ROOT_INODE
        for part in os.fsencode(path).split(b"/"):
            if not part or part == b".":
                continue
            found = self.ops.table.entries.get((ino, part))
            if found is None:
                raise ModeError(f"{path!r} is not known to SPFS (never looked up)")
            ino = found
        return ino

    async def add_manifest_entries(self, raw_entries: Any = None,
                                   manifest_file: str | None = None) -> int:
        async with self._lock:
            self._check_restore()
            entries: tuple[ManifestEntry, ...]
            # Reading and validating (up to MAX_MANIFEST_BYTES of JSON, checking every
            # content source) in a worker: the loop keeps serving meanwhile.
            if manifest_file is not None:
                with trio.move_on_after(MANIFEST_TIMEOUT_S) as scope:
                    entries = (await trio.to_thread.run_sync(
                        load_manifest, manifest_file, abandon_on_cancel=True)).entries
                if scope.cancelled_caught:
                    raise ManifestError(f"reading manifest {manifest_file} took more than "
                                        f"{MANIFEST_TIMEOUT_S:.0f} s")
            else:
                entries = await trio.to_thread.run_sync(parse_entries, raw_entries)
            restore = self._check_restore()   # the lock keeps the mode; checked anyway
            restore.add_entries(entries)
            invalidation.invalidate_attrs_now(list(self.ops.table.inodes))
            return len(entries)

    def _check_restore(self) -> RestoreBackend:
        if self.mode is not Mode.RESTORE or self.ops.restore is None:
            raise ModeError(f"manifest entries can only be added in restore mode "
                            f"(current mode: {self.mode.value})")
        return self.ops.restore

    def status(self) -> dict[str, Any]:
        ops = self.ops
        return {
            "mode": self.mode.value,
            "switching": ops.gate.switching,
            "proxy_dir": self.target.path if self.target and self.mode is not Mode.RESTORE else None,
            "parked": ops.gate.parked,
            "open_handles": len(ops.handles),
            "inodes": len(ops.table),
            "stub_timeout": ops.gate.stub_timeout,
            "switches": self.switches,
            "release_seconds": ops.gate.release_seconds,
            "last_switch": dataclasses.asdict(self.last_switch) if self.last_switch else None,
            "pid": os.getpid(),
            # Calls on the target not finished yet, and the age of the oldest: a target
            # that hangs shows here while everything else keeps answering.
            "backend_calls": self.pool.running,
            "oldest_backend_call_seconds": round(self.pool.oldest_seconds(), 3),
            "workers": self.pool.size,
            # Commands waiting for the one running (set_mode, invalidate, ...) to finish.
            "commands_waiting": self._lock.statistics().tasks_waiting,
        }


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        close_quietly(fd)
