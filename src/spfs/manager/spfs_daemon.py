"""Starting and driving one `spfs` daemon (issue 3's CLI) for a `mount` request.

The daemon runs as our child in our namespaces.  For a container it mounts on a staging
directory under its work dir whose mode, owner and times were copied from the container's
mountpoint (spfs answers the root's stat from its mountpoint); the FUSE mount is then cloned
with open_tree and moved onto the mountpoint inside the container's mount namespace, and the
staging mount is detached.  Readiness is the ready-fd being closed, bounded in time.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from spfs.sys import mountapi as m
from spfs.manager.interfaces import SpfsSpec
from spfs.sys.mountinfo import read_mountinfo, top_mount_at
from spfs.sys.nsexec import ChildResult, Namespaces, run_in_namespaces
from spfs.manager.protocol import SpfsMode
from spfs.standby import client as standby_client

log = logging.getLogger(__name__)

DEFAULT_SPFS_COMMAND = (sys.executable, "-m", "spfs.fs.cli")


@dataclass(frozen=True)
class SpfsTimeouts:
    ready: float = 30.0
    control: float = 10.0
    stop: float = 3.0
    namespace_step: float = 10.0


def _root_stat(mountpoint: str) -> list[int]:
    st = os.stat(mountpoint)
    return [st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns]


def _copy_root_stat(target: Namespaces | None, mountpoint: str, staging: str,
                    timeout: float) -> None:
    mode, uid, gid, atime, mtime = run_in_namespaces(target, _root_stat, timeout,
                                                     args=(mountpoint,)).value
    os.chown(staging, uid, gid)
    os.chmod(staging, mode & 0o7777)
    os.utime(staging, ns=(atime, mtime))


ChildProcess = subprocess.Popen[bytes] | standby_client.StandbyChild


def _wait_ready(proc: ChildProcess, ready_read: int, timeout: float) -> None:
    poller = select.poll()
    poller.register(ready_read, select.POLLHUP | select.POLLERR | select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise OSError(errno.ETIMEDOUT, f"spfs not ready in {timeout} s")
        if poller.poll(int(min(left, 0.2) * 1000)):
            # POLLIN means it wrote something before closing: read until EOF
            if os.read(ready_read, 64) == b"":
                break
        if proc.poll() is not None:
            raise OSError(errno.ECHILD, f"spfs exited with {proc.returncode} before ready")
    if proc.poll() is not None:
        raise OSError(errno.ECHILD, f"spfs exited with {proc.returncode} when ready")


def _move_mount_work(clone_fd: int, mountpoint: str) -> ChildResult:
    m.move_mount(clone_fd, mountpoint)
    return ChildResult(None)


def _unmount_work(mountpoint: str, dev: int | None) -> ChildResult:
    """Detach the mount at `mountpoint` if it is ours (same device), nothing else."""
    top = top_mount_at(read_mountinfo(), mountpoint)
    if top is not None and dev is not None and top.dev == f"{os.major(dev)}:{os.minor(dev)}":
        m.umount2(mountpoint, m.MNT_DETACH)
    return ChildResult(None)


@dataclass
class SpfsProcess:
    """A running spfs daemon and its control socket."""

    spec: SpfsSpec
    proc: ChildProcess
    socket_path: str
    staging: str | None = None  # where it mounted before moving into the container
    dev: int | None = None  # st_dev of its superblock, to recognise its mounts
    timeouts: SpfsTimeouts = field(default_factory=SpfsTimeouts)

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def set_mode(self, mode: SpfsMode, proxy_dir: str | None = None,
                 proxy_ns_pid: int | None = None) -> None:
        try:  # issue 3's client; imported late so the manager starts without it
            from spfs.fs import control_client
        except ImportError:
            raise OSError(errno.ENOSYS, "spfs.fs.control_client (issue 3) is missing") from None
        try:
            control_client.set_mode(self.socket_path, mode.value, proxy_dir=proxy_dir,
                                    ns_pid=proxy_ns_pid, timeout=self.timeouts.control)
        except control_client.ControlError as exc:
            raise OSError(exc.code, f"spfs {self.spec.id}: mode {mode.value}: "
                                    f"{exc.message}") from None

    def stop(self) -> None:
        """Detach its mounts first (spfs exits once the kernel lets go), then terminate."""
        places = [(self.spec.target, self.spec.mountpoint)]
        if self.staging is not None:
            places.append((None, self.staging))
        for target, path in places:
            try:
                run_in_namespaces(target, _unmount_work, self.timeouts.namespace_step,
                                  args=(path, self.dev))
            except OSError as exc:
                log.warning("spfs %s: unmounting %s: %s", self.spec.id, path, exc)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.timeouts.stop)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(self.timeouts.stop)


def _remove_work_dir(work_dir: str) -> None:
    """Only what we created, never recursively: a mount may still sit below."""
    for remove, path in ((os.unlink, "spfs.sock"), (os.rmdir, "mnt"), (os.rmdir, "")):
        try:
            remove(os.path.join(work_dir, path) if path else work_dir)
        except OSError:
            pass


WARM_COMMAND = (sys.executable, "-m", "spfs.fs.warm")


@dataclass
class _Spare:
    """A warm daemon (spfs.fs.warm) waiting for its command line."""

    proc: subprocess.Popen[bytes]
    config_write: int
    ready_read: int
    ready_fd_in_child: int

    def close(self) -> None:
        for fd in (self.config_write, self.ready_read):
            try:
                os.close(fd)
            except OSError:
                pass


@dataclass
class SpfsProcessLauncher:
    command: tuple[str, ...] = DEFAULT_SPFS_COMMAND
    timeouts: SpfsTimeouts = field(default_factory=SpfsTimeouts)
    warm: bool = False  # keep a warm spare daemon (only for the default command)
    standby: str | None = None  # spfs-standby's socket: it forks the daemons, if it answers
    _spare: _Spare | None = None

    def _standby_usable(self) -> bool:
        return (self.standby is not None and self.command == DEFAULT_SPFS_COMMAND
                and os.path.exists(self.standby))

    def warm_up(self) -> None:
        """Start a spare daemon that imports everything now, if none is waiting (and no
        standby forks them: a spare would only compete with the restore for the CPU)."""
        if (not self.warm or self.command != DEFAULT_SPFS_COMMAND or self._spare is not None
                or self._standby_usable()):
            return
        ready_read, ready_write = os.pipe()
        config_read, config_write = os.pipe()
        try:
            proc = subprocess.Popen([*WARM_COMMAND, str(config_read)],
                                    pass_fds=(ready_write, config_read),
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("no warm spfs spare: %s", exc)
            for fd in (ready_read, config_write):
                os.close(fd)
            return
        finally:
            os.close(ready_write)
            os.close(config_read)
        os.set_inheritable(config_write, False)
        self._spare = _Spare(proc, config_write, ready_read, ready_write)
        log.info("warm spfs spare %d started", proc.pid)

    def close(self) -> None:
        """The spare ends on EOF of its command pipe."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare.close()
            try:
                spare.proc.wait(self.timeouts.stop)
            except subprocess.TimeoutExpired:
                spare.proc.kill()
                spare.proc.wait(self.timeouts.stop)

    def _from_standby(self, spec: SpfsSpec, args: list[str]) -> tuple[ChildProcess, int] | None:
        assert self.standby is not None
        ready_read, ready_write = os.pipe()
        try:
            child = standby_client.spawn(self.standby, "spfs", [*args, "--ready-fd", "3"],
                                         fds={3: ready_write}, new_session=True)
        except (standby_client.StandbyUnavailable, standby_client.StandbyError) as exc:
            log.warning("spfs %s: %s; starting it ourselves", spec.id, exc)
            os.close(ready_read)
            return None
        finally:
            os.close(ready_write)
        log.info("spfs %s: standby forked %d: %s", spec.id, child.pid, " ".join(args))
        return child, ready_read

    def _launch(self, spec: SpfsSpec, args: list[str]) -> tuple[ChildProcess, int]:
        """The daemon's process and the read end of its ready pipe: forked by the standby
        if one answers, else the spare if there is one alive (it gets `args`), else a new
        process."""
        if self._standby_usable():
            launched = self._from_standby(spec, args)
            if launched is not None:
                return launched
        spare, self._spare = self._spare, None
        if spare is not None and spare.proc.poll() is None:
            payload = json.dumps([*args, "--ready-fd", str(spare.ready_fd_in_child)]).encode()
            try:
                os.write(spare.config_write, payload)
                os.close(spare.config_write)
                log.info("spfs %s: warm spare %d runs %s", spec.id, spare.proc.pid,
                         " ".join(args))
                return spare.proc, spare.ready_read
            except OSError as exc:
                log.warning("warm spfs spare %d: %s; starting one", spare.proc.pid, exc)
        if spare is not None:
            spare.close()
        ready_read, ready_write = os.pipe()
        argv = [*self.command, *args, "--ready-fd", str(ready_write)]
        log.info("spfs %s: starting %s", spec.id, " ".join(argv))
        try:
            proc = subprocess.Popen(argv, pass_fds=(ready_write,), stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except BaseException:
            os.close(ready_read)
            raise
        finally:
            os.close(ready_write)
        return proc, ready_read

    def start(self, spec: SpfsSpec) -> SpfsProcess:
        os.makedirs(spec.work_dir, mode=0o700, exist_ok=True)
        socket_path = os.path.join(spec.work_dir, "spfs.sock")
        staging = spec.mountpoint
        if spec.target is not None:
            staging = os.path.join(spec.work_dir, "mnt")
            os.makedirs(staging, exist_ok=True)
            _copy_root_stat(spec.target, spec.mountpoint, staging, self.timeouts.namespace_step)
        args = [staging, "--mode", spec.mode.value, "--socket-path", socket_path,
                "--log", spec.log_path, "--foreground", *(["-v"] * spec.verbosity)]
        if spec.proxy_dir is not None:
            args += ["--proxy-dir", spec.proxy_dir]
        if spec.proxy_ns_pid is not None:
            args += ["--proxy-mntns-pid", str(spec.proxy_ns_pid)]
        if spec.manifest is not None:
            args += ["--manifest", spec.manifest]
        proc, ready_read = self._launch(spec, args)
        self.warm_up()  # the next request's spare imports while this one gets ready
        handle = SpfsProcess(spec, proc, socket_path,
                             staging if spec.target is not None else None, self.timeouts)
        try:
            try:
                _wait_ready(proc, ready_read, self.timeouts.ready)
            finally:
                os.close(ready_read)
            handle.dev = os.stat(staging).st_dev
            if spec.target is not None:
                self._move_into_container(spec, staging)
        except BaseException:
            handle.stop()
            _remove_work_dir(spec.work_dir)
            raise
        return handle

    def _move_into_container(self, spec: SpfsSpec, staging: str) -> None:
        clone = m.clone_tree(staging)
        try:
            run_in_namespaces(spec.target, _move_mount_work, self.timeouts.namespace_step,
                              args=(clone, spec.mountpoint), fds=(clone,))
        finally:
            os.close(clone)
        m.umount2(staging, m.MNT_DETACH)
        log.info("spfs %s: mounted at %s in the namespaces of pid %d", spec.id,
                 spec.mountpoint, spec.target.pid if spec.target else 0)
