"""State of one switch: what was found (plan), what was opened on B, and the outcome."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field, fields

from spfs.swap.procfs import EpollTarget, InotifyWatch, Lock, Vma


class Phase(enum.Enum):
    DISCOVERED = "discovered"
    PREPARED = "prepared"
    STOPPED = "stopped"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"
    RELEASED = "released"


ALLOWED = {
    Phase.DISCOVERED: {Phase.PREPARED, Phase.FAILED, Phase.RELEASED},
    Phase.PREPARED: {Phase.STOPPED, Phase.FAILED, Phase.RELEASED},
    Phase.STOPPED: {Phase.COMMITTED, Phase.ROLLED_BACK, Phase.FAILED},
    Phase.COMMITTED: {Phase.RELEASED},
    Phase.ROLLED_BACK: {Phase.RELEASED},
    Phase.FAILED: {Phase.RELEASED},
    Phase.RELEASED: set(),
}


class SwapError(RuntimeError):
    """The switch could not be done; every task was left running on the source."""


class SwapChanged(SwapError):
    """The tasks changed between discovery and the stop (a new process, fd, mapping, cwd,
    a fork, ...): nothing was moved, and planning again can succeed."""


class ListenerBusy(SwapError):
    """A listening socket on the source had connections queued, not yet accepted, when the
    tasks were stopped: no kernel interface moves them to a new listener, so nothing was
    moved. The tasks must run (and accept) before a switch can succeed; planning again
    while they stay stopped or frozen cannot help."""


class FreezerLeft(SwapError):
    """After the switch itself (committed or reverted), the cgroup could not be put back in
    the freezer state it must end in; `frozen` is the state it was left in, as last read."""

    def __init__(self, message: str, frozen: bool | None) -> None:
        super().__init__(message)
        self.frozen = frozen


class RefreezeFailed(FreezerLeft):
    """The caller had frozen the cgroup and it could not be frozen again before the tasks
    were let go: they ran for a moment although the caller expects them frozen."""


class ThawFailed(FreezerLeft):
    """The engine had frozen the cgroup and could not thaw it at the end."""


class TasksPending(SwapError):
    """Committed, but some tasks had not finished their table when the wait ran out: they
    still hold references to the source (nothing is undone; they end on the target once
    they run on)."""


@dataclass
class Location:
    """A mount given by a path in the manager's view (may be /proc/PID/fd/N)."""

    path: str
    dev: int
    mnt_ids: frozenset[int]
    sb_path: str  # the path's place inside its filesystem, for matching bind mounts


@dataclass
class Description:
    """One open file description on A, shared by every (pid, fd) in holders."""

    index: int
    rel: str  # path relative to A (or the name on B given by the caller's path map)
    flags: int
    mode: int
    dev: int
    ino: int
    holders: list[tuple[int, int]] = field(default_factory=list)
    locks: list[Lock] = field(default_factory=list)
    # (pid of the injected process, fd) whose table takes `locks` (flock, OFD) on B: the
    # kernel records the taker's pid as a flock's holder (and an NFSv3 OFD lock's)
    lock_taker: tuple[int, int] | None = None
    old_fd: int = -1  # the manager's own reference to the A description (pidfd_getfd)
    new_fd: int = -1  # the description opened on B
    sock: object | None = None  # unixsock.BoundSocket for a unix socket bound on A
    mapped: bool = False  # unlinked on A: rel is the path map's name on B, nothing to check on A


@dataclass
class FdRef:
    pid: int
    fd: int
    desc: Description
    cloexec: bool
    posix_locks: list[Lock] = field(default_factory=list)


@dataclass
class EpollReg:
    pid: int
    epfd: int
    target: EpollTarget
    desc: Description


@dataclass
class InotifyReg:
    pid: int
    ifd: int
    watch: InotifyWatch
    rel: str = ""
    copy_fd: int = -1  # the manager's fd on the same inotify instance
    new_wd: int = -1
    source_fd: int = -1  # O_PATH of the watched object on A (to watch it again on a revert)
    target_fd: int = -1  # O_PATH of its counterpart on B


@dataclass
class DirRef:
    """cwd or root of a task."""

    pid: int
    kind: str  # "cwd" or "root"
    rel: str
    dev: int = 0  # the directory on A, as discovery saw it
    ino: int = 0
    old_fd: int = -1
    new_fd: int = -1


@dataclass
class MapRef:
    """A file mapping on A (one VMA)."""

    pid: int
    vma: Vma
    rel: str
    vm_flags: tuple[str, ...] = ()  # smaps VmFlags
    mapped: bool = False  # unlinked on A: rel is the path map's name on B
    old_fd: int = -1
    new_fd: int = -1
    dirty: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) of private anon pages


@dataclass
class ExeRef:
    rel: str
    mm_fields: tuple[int, ...]  # /proc/PID/stat fields 26, 27, 45, 46, 47, 28, 48..51 (prctl_mm_map order)
    dev: int = 0  # the executable on A, as discovery saw it
    ino: int = 0
    old_fd: int = -1
    new_fd: int = -1


@dataclass
class Unmovable:
    pid: int
    what: str
    reason: str


@dataclass
class ProcessPlan:
    pid: int
    tids: list[int]
    comm: str
    sig_ignored: int
    sig_caught: int
    vdso: tuple[int, int] | None
    fd_numbers: list[int]
    writable: list[tuple[int, int]] = field(default_factory=list)  # rw VMAs (where a table may go)
    fds: list[FdRef] = field(default_factory=list)
    epoll: list[EpollReg] = field(default_factory=list)
    inotify: list[InotifyReg] = field(default_factory=list)
    dirs: list[DirRef] = field(default_factory=list)
    maps: list[MapRef] = field(default_factory=list)
    exe: ExeRef | None = None
    ranges: list[tuple[int, int]] = field(default_factory=list)  # every VMA, to find free space
    nspid: int = 0  # the process's pid in its own pid namespace
    mm_of: int | None = None  # pid whose injection also serves this shared mm
    fd_table_of: int | None = None  # pid whose injection also serves this shared fd table
    fs_of: int | None = None  # same for a shared fs_struct (cwd/root)

    @property
    def has_work(self) -> bool:
        return bool(self.fds or self.dirs or self.epoll or self.maps or self.exe or self.inotify)


@dataclass
class SwapPlan:
    source: Location
    target: str
    processes: list[ProcessPlan]
    descriptions: list[Description]
    unmovable: list[Unmovable]
    cgroup: str | None
    phase: Phase = Phase.DISCOVERED
    caller_froze: bool = False
    path_map: dict[str, str] = field(default_factory=dict)
    prepared: object | None = None  # prepare.Prepared once prepared
    # The target will be mounted where the source is (the manager's replace): addresses
    # the processes hold (bound unix sockets) keep naming the source's place.
    target_replaces_source: bool = False
    # engine.Unsettled after a commit into a cgroup the caller keeps frozen: the tasks
    # finish their tables once thawed; api.settle() waits for them
    unsettled: object | None = None

    def advance(self, phase: Phase) -> None:
        if phase not in ALLOWED[self.phase]:
            raise RuntimeError(f"switch cannot go from {self.phase.value} to {phase.value}")
        self.phase = phase


@dataclass
class SwapReport:
    ok: bool
    phase: str
    processes: int
    threads: int
    fds_moved: int
    descriptions_moved: int
    dirs_moved: int
    epoll_readded: int
    unmovable: list[dict]
    mappings_moved: int = 0
    exe_moved: int = 0
    watches_moved: int = 0
    error: str | None = None
    stop_window_s: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    # Tasks (processes) that had not finished their table when commit returned: they still
    # reference the source.  Into a cgroup the caller keeps frozen that is every parked
    # one, and ok stays True (api.settle() after the thaw); otherwise it is a failure.
    pending_tasks: int = 0
    committed: bool = False  # past the commit point: the tasks end on the target even if ok is False
    pending_pids: list[int] = field(default_factory=list)  # the ones found inside their table
    error_kind: str | None = None  # the class of `failure`, for reports read as JSON
    # What failed, for callers in this process to decide on its type (not in as_dict)
    failure: SwapError | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict:
        return copy.deepcopy({f.name: getattr(self, f.name) for f in fields(self) if f.name != "failure"})
