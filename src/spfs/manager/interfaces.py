"""What the manager needs from the other parts, as protocols, so the replace pipeline can be
driven and tested independently of how each step is done."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from spfs.manager.mounts import Placement
from spfs.sys.nsexec import Namespaces
from spfs.manager.protocol import SpfsMode
from spfs.manager.realmount import RealFs


@dataclass(frozen=True)
class SpfsSpec:
    """Everything needed to start one SPFS daemon for a `mount` request."""

    id: str
    mode: SpfsMode
    mountpoint: str  # where to mount it, as seen from `target` (or the host if None)
    target: Namespaces | None
    work_dir: str  # private to this SPFS: staging mountpoint, control socket, log
    log_path: str
    proxy_dir: str | None = None
    proxy_ns_pid: int | None = None
    verbosity: int = 0
    manifest: str | None = None  # restore mode: what SPFS serves


class SpfsHandle(Protocol):
    """A running SPFS daemon."""

    @property
    def pid(self) -> int | None: ...

    def set_mode(self, mode: SpfsMode, proxy_dir: str | None = None,
                 proxy_ns_pid: int | None = None) -> None: ...

    def exited(self) -> bool: ...

    def stop(self) -> None:
        """Terminate the daemon and unmount it (for failed mounts and shutdown)."""


class SpfsLauncher(Protocol):
    def start(self, spec: SpfsSpec) -> SpfsHandle: ...


class RealFsMounter(Protocol):
    def mount(self, fs: RealFs, target: Namespaces | None, hidden_dir: str) -> int:
        """A detached mount fd of the real fs, made in `target`'s namespaces."""


class MountMover(Protocol):
    def mounts_of(self, target: Namespaces | None, dev: int) -> list[str]:
        """Every path where the superblock `dev` is mounted, as the container sees it."""

    def describe(self, target: Namespaces | None, paths: list[str]) -> list[Placement]: ...

    def move(self, real_fd: int, placements: list[Placement],
             target: Namespaces | None) -> None: ...


@dataclass(frozen=True)
class SwapJob:
    """Move every reference of the container's tasks from SPFS to the real filesystem."""

    cgroup: str  # frozen by the manager for the whole job
    target: Namespaces | None
    spfs_paths: tuple[str, ...]  # mountpoint and binds, as the container sees them
    spfs_dev: int  # st_dev of the SPFS superblock
    real_root: str  # a path of the real fs root usable by the manager (/proc/self/fd/N)
    # unlinked files on SPFS (relative names, as /proc shows them) -> their names on the real fs
    path_map: tuple[tuple[str, str], ...] = ()


class TasksMustRun(OSError):
    """The swap needs the tasks to run a moment first (a listener on SPFS had connections
    queued when they were frozen: they must accept them); nothing was moved."""


class ReferenceSwapper(Protocol):
    def prepare(self, job: SwapJob) -> Any:
        """Everything that needs no stopped task (finding references, opening the new
        files), done before the freeze to keep the container's stop short."""

    def swap(self, job: SwapJob, prepared: Any) -> dict[str, Any]:
        """Called with the cgroup frozen; takes over `prepared` (releases it on every path).
        Returns the engine's report; raises OSError when nothing could be moved."""

    def settle(self, job: SwapJob, timeout: float) -> dict[str, Any]:
        """Once the cgroup is thawed after swap(): wait (bounded) for tasks the swap left
        finishing their switch; {"pending_tasks": N, "pending_pids": [...]} still holding SPFS."""

    def abandon(self, prepared: Any) -> None:
        """Drop what prepare() made, when swap() will not be called."""

    def switch(self, source: str | None, device: int | None, target: str, cgroup: str,
               ns_pid: int | None) -> dict[str, Any]:
        """The `switch` request: move references from one mount to another."""
