"""Lifecycle of the spfs daemon: prepare, mount, serve, unmount.

Everything that can be refused (manifest, proxy directory, mountpoint, control socket) is
checked before mounting, so bad input leaves nothing mounted. The ready descriptors are
closed once a stat of the mountpoint has gone through the running FUSE loop. SIGTERM or
SIGINT fail parked requests with EIO and lazily detach the mount; the daemon exits 0 once
the kernel has dropped the mount (immediately, or when the last open file is closed). Calls
on the target still running workers.SHUTDOWN_GRACE_S after the signal are answered EIO,
so a target that hangs cannot keep the mount (and the daemon) alive. A second signal
stops at once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import resource
import signal
import stat
import threading
import time

import pyfuse3
import trio

from spfs.fs import attrs, creds, mountinfo, syscalls
from spfs.fs.control_server import ControlServer, bind_control_socket
from spfs.fs.controller import FsController
from spfs.fs.creds import CallerCredentials
from spfs.fs.gate import ModeGate
from spfs.fs.handles import HandleTable
from spfs.fs.inode_budget import InodeBudget, default_soft_limit
from spfs.fs.inodes import ROOT_INODE, InodeTable, ProxyObject
from spfs.fs.manifest import Manifest, load_manifest
from spfs.fs.modes import Mode
from spfs.fs.operations import SpfsOperations
from spfs.fs.restore_backend import RestoreBackend
from spfs.fs.target_dir import TargetDir, open_target
from spfs.fs.workers import DEFAULT_WORKERS, WorkerPool
from spfs.sys import forkserver
from spfs.sys.fds import close_quietly
from spfs.sys.thread_creds import CredentialSwitchError, UnsupportedArchitecture

log = logging.getLogger(__name__)

# allow_other lets the container's users in; default_permissions makes the kernel check
# their permissions (without it any user could write root's files, feasibility §1).
MANDATORY_OPTIONS = frozenset({"fsname=spfs", "subtype=spfs", "allow_other", "default_permissions"})


class StartupError(Exception):
    """Refused before mounting; the message says why."""


@dataclasses.dataclass
class DaemonConfig:
    mountpoint: str
    mode: Mode
    proxy_dir: str | None = None
    proxy_mntns_pid: int | None = None
    manifest: str | None = None
    socket_path: str | None = None
    ready_fds: list[int] = dataclasses.field(default_factory=list)
    stub_timeout: float | None = None
    fuse_options: list[str] = dataclasses.field(default_factory=list)
    max_parked: int = 20000
    cache_timeout: float = 1.0
    read_ahead_kb: int = 1024
    direct_io: bool = False
    inode_soft_limit: int | None = None   # default: from RLIMIT_NOFILE
    ready_notify_fd: int | None = None    # gets b"R" before being closed (daemonizing)
    machine: str | None = None            # platform.machine() unless given (tests)
    workers: int = DEFAULT_WORKERS        # threads for syscalls on the proxy target


@dataclasses.dataclass
class Prepared:
    root_stat: os.stat_result
    manifest: Manifest | None
    target: TargetDir | None


def prepare(config: DaemonConfig) -> Prepared:
    try:
        creds.check_switch(config.machine)
    except (UnsupportedArchitecture, CredentialSwitchError) as exc:
        raise StartupError(str(exc)) from None
    try:
        root_stat = os.stat(config.mountpoint)
    except OSError as exc:
        raise StartupError(f"mountpoint {config.mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(root_stat.st_mode):
        raise StartupError(f"mountpoint {config.mountpoint} is not a directory")
    manifest = None
    if config.mode is Mode.RESTORE:
        manifest = load_manifest(config.manifest) if config.manifest else Manifest(entries=())
    elif config.manifest:
        raise StartupError("--manifest is only used in restore mode")
    target = None
    if config.mode is Mode.PROXY:
        if not config.proxy_dir:
            raise StartupError("proxy mode needs --proxy-dir")
        target = open_target(config.proxy_dir, config.proxy_mntns_pid)
    return Prepared(root_stat=root_stat, manifest=manifest, target=target)


# The descriptor table is grown to this size (or the limit) while the daemon still has one
# thread: growing it later, with threads, waits for an RCU grace period each time (we
# measured 25 µs per create over a run of 3,000 creates that way). 8 bytes per slot.
_FD_TABLE_PRESIZE = 1 << 16


def _raise_fd_limit() -> None:
    # Proxy mode keeps one O_PATH descriptor per inode the kernel knows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _presize_fd_table(min(hard, _FD_TABLE_PRESIZE))


def _presize_fd_table(slots: int) -> None:
    """Make the kernel allocate *slots* descriptor slots now (tables never shrink)."""
    if slots <= 1024:
        return
    probe = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        # F_DUPFD takes the lowest free slot >= the argument: it never replaces an open one.
        os.close(fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, slots - 1))
    except OSError as exc:
        log.debug("could not pre-size the descriptor table to %d: %s", slots, exc)
    finally:
        os.close(probe)


def build(config: DaemonConfig, prepared: Prepared) -> tuple[SpfsOperations, FsController]:
    table, handles = InodeTable(), HandleTable()
    timeouts = attrs.CacheTimeouts(attr=config.cache_timeout, entry=config.cache_timeout)
    gate = ModeGate(config.mode, config.stub_timeout)
    pool = WorkerPool(config.workers, CallerCredentials())
    table.close_fd = pool.close_later
    ops = SpfsOperations(gate, table, handles, prepared.root_stat, timeouts, pool)
    ops.direct_io = config.direct_io
    budget = InodeBudget(table, config.inode_soft_limit or default_soft_limit())
    controller = FsController(ops, budget)
    if prepared.manifest is not None:
        ops.restore = RestoreBackend(table, handles, timeouts)
        ops.restore.load(prepared.manifest)
    else:
        table.add(stat.S_IFDIR, ino=ROOT_INODE)
    if config.proxy_dir and config.mode is not Mode.PROXY:
        controller.default_target = (config.proxy_dir, config.proxy_mntns_pid)
        log.info("proxy directory %s will be opened at the switch to proxy", config.proxy_dir)
    if prepared.target is not None:
        target = prepared.target
        controller.install_target(target)
        table.bind_proxy(table.inodes[ROOT_INODE],
                         ProxyObject(fd=os.dup(target.fd), dev=target.dev, ino=target.ino))
    return ops, controller


async def _handle_signals(config: DaemonConfig, ops: SpfsOperations, device: str | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            if ops.gate.shutting_down:
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                pyfuse3.terminate()
                return
            log.info("%s: failing %d parked requests, detaching %s; exiting once the kernel "
                     "lets go of the mount", signal.Signals(signum).name, ops.gate.parked,
                     config.mountpoint)
            ops.gate.shut_down()
            ops.pool.shut_down()
            # Only our own mount: whoever started us may have moved it elsewhere (into a
            # container); then it goes when they unmount it.
            if mountinfo.find_fuse_device(config.mountpoint) != device:
                log.warning("%s is no longer our mount; exiting when it is unmounted",
                            config.mountpoint)
                continue
            try:
                await trio.to_thread.run_sync(syscalls.umount2, config.mountpoint,
                                              syscalls.MNT_DETACH)
            except OSError as exc:
                log.error("detaching %s failed: %s", config.mountpoint, exc)


async def _announce_ready(config: DaemonConfig, initialised: trio.Event) -> None:
    # pyfuse3 calls init() from libfuse's INIT handler, which sends the reply as init()
    # returns: once this wakes up the kernel has it and the mount answers. (A stat through
    # the mount to prove it cost a thread start and a round trip: 30-50 ms of every
    # restore under emulation.)
    await initialised.wait()
    # Only now: the INIT reply clamps the readahead to what libfuse negotiated (128 KiB).
    if config.read_ahead_kb > 0:
        mountinfo.set_read_ahead(config.mountpoint, config.read_ahead_kb)
    if config.ready_notify_fd is not None:
        os.write(config.ready_notify_fd, b"R")
        close_quietly(config.ready_notify_fd)
    for fd in config.ready_fds:
        close_quietly(fd)
    log.info("spfs ready at %s in %s mode", config.mountpoint, config.mode.value)


async def _serve(config: DaemonConfig, ops: SpfsOperations, server: ControlServer | None,
                 device: str | None) -> None:
    initialised = trio.Event()
    ops.on_init = initialised.set
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_handle_signals, config, ops, device)
        nursery.start_soon(_announce_ready, config, initialised)
        if server is not None:
            nursery.start_soon(server.serve)
        try:
            await pyfuse3.main(min_tasks=1, max_tasks=config.max_parked)
        except* ConnectionAbortedError:
            # The kernel answers ENODEV once the connection is gone, which ends the loop
            # quietly; but a read that had already taken a request (the last RELEASE or
            # FORGET) when unmount tore the connection down gets ECONNABORTED. Same end.
            log.info("the kernel aborted the connection during a read: the filesystem is gone")
        nursery.cancel_scope.cancel()


def run(config: DaemonConfig) -> int:
    """Mount and serve until unmounted. Raises StartupError (and friends) before mounting."""
    started = time.monotonic()
    prepared = prepare(config)
    # A proxy target in another mount namespace is opened by a worker (see target_dir),
    # forked from a server made while we have one thread. Only when the start names such a
    # namespace: the server costs some 6 MB PSS per daemon (the daemon's heap pages it keeps
    # as they were), and the manager's replace names none (its target is a descriptor of its
    # own). A later switch that names one gets a server started by exec.
    if config.proxy_mntns_pid is not None:
        forkserver.start(preload=("spfs.fs.target_dir",))
    server_sock = bind_control_socket(config.socket_path) if config.socket_path else None
    _raise_fd_limit()
    os.umask(0)  # modes arrive already masked by the kernel; apply them verbatim
    ops, controller = build(config, prepared)
    server = ControlServer(server_sock, config.socket_path, controller) if server_sock else None
    options = set(MANDATORY_OPTIONS) | set(config.fuse_options)
    try:
        pyfuse3.init(ops, config.mountpoint, options)
    except Exception:
        if server is not None:
            server.close()
        raise
    log.info("mounted %s (%s mode) in %.1f ms", config.mountpoint, config.mode.value,
             (time.monotonic() - started) * 1e3)
    unmount = True
    try:
        # Read now, before anyone can move the mount: SIGTERM only detaches this one.
        device = mountinfo.find_fuse_device(config.mountpoint)
        trio.run(_serve, config, ops, server, device)
        unmount = not ops.gate.shutting_down
    finally:
        pyfuse3.close(unmount=unmount)
        if server is not None:
            server.close()
        ops.table.close_all()
        _close_handles([h.fd for h in ops.handles.handles.values() if h.fd is not None])
    log.info("unmounted %s, exiting", config.mountpoint)
    return 0


_EXIT_CLOSE_TIMEOUT_S = 5.0


def _close_handles(fds: list[int]) -> None:
    """Close the target files still open, in a daemon thread waited for a bounded time:
    closing a file written on NFS writes it back, and a server that is down would keep
    the daemon from exiting (exit closes whatever is left)."""
    if not fds:
        return
    closer = threading.Thread(target=lambda: [close_quietly(fd) for fd in fds],
                              name="spfs-exit-close", daemon=True)
    closer.start()
    closer.join(_EXIT_CLOSE_TIMEOUT_S)
    if closer.is_alive():
        log.warning("closing %d target files still blocked after %.0f s: exiting anyway",
                    len(fds), _EXIT_CLOSE_TIMEOUT_S)
