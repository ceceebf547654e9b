"""Where SPFS is mounted in a container, and putting the real mount in its place.

`describe_placements` reads how SPFS sits at its mountpoint and at each bind path (sub-root,
per-mount flags, propagation) from /proc/PID/mountinfo.  `move_into_place` runs inside the
container's mount namespace: it detaches SPFS from each path and attaches the real mount there
(its own root at the mountpoint, an open_tree clone of the right sub-directory at each bind),
so that every path shares one superblock.  A failure puts SPFS back on every path it had
already left.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from dataclasses import dataclass

from spfs.sys import beneath
from spfs.sys import mountapi as m
from spfs.sys.mountapi import Propagation
from spfs.sys.mountinfo import read_mountinfo, top_mount_at
from spfs.sys.nsexec import ChildResult, Namespaces, run_in_namespaces


@dataclass(frozen=True)
class Placement:
    """One path where SPFS is mounted, with what the real mount must reproduce there."""

    path: str
    sub_root: str
    attr_flags: int
    propagation: Propagation


_ATTR_OPTIONS = {
    "ro": m.MOUNT_ATTR_RDONLY,
    "nosuid": m.MOUNT_ATTR_NOSUID,
    "nodev": m.MOUNT_ATTR_NODEV,
    "noexec": m.MOUNT_ATTR_NOEXEC,
    "noatime": m.MOUNT_ATTR_NOATIME,
    "nodiratime": m.MOUNT_ATTR_NODIRATIME,
    "nosymfollow": m.MOUNT_ATTR_NOSYMFOLLOW,
}
_ALL_ATTRS = (m.MOUNT_ATTR_RDONLY | m.MOUNT_ATTR_NOSUID | m.MOUNT_ATTR_NODEV |
              m.MOUNT_ATTR_NOEXEC | m.MOUNT_ATTR__ATIME | m.MOUNT_ATTR_NODIRATIME |
              m.MOUNT_ATTR_NOSYMFOLLOW)


def attrs_from_options(options: tuple[str, ...]) -> int:
    attrs = 0
    for option in options:
        attrs |= _ATTR_OPTIONS.get(option, 0)
    if "strictatime" in options:
        attrs |= m.MOUNT_ATTR_STRICTATIME
    return attrs


def describe_placements(pid: int | None, paths: list[str],
                        root: str | None = None) -> list[Placement]:
    """How the mounts at `paths` (as process `pid` sees them) are placed; all must exist."""
    entries = read_mountinfo(pid)
    placements = []
    for path in paths:
        entry = top_mount_at(entries, _in_root(path, root))
        if entry is None:
            raise OSError(errno.ENOENT, f"nothing is mounted at {path}")
        placements.append(Placement(path, entry.root, attrs_from_options(entry.options),
                                    entry.propagation))
    return placements


def mounts_of_device(pid: int | None, dev: int, root: str | None = None) -> list[str]:
    """Mountpoints of the superblock `dev` seen by process `pid`, relative to `root`; a mount
    sitting below another of them is left out (it goes away with its parent)."""
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    paths = [e.mountpoint for e in read_mountinfo(pid) if e.dev == wanted]
    if root not in (None, "/"):
        prefix = os.path.normpath(root)
        paths = ["/" + os.path.relpath(p, prefix).lstrip(".") if p != prefix else "/"
                 for p in paths if p == prefix or p.startswith(prefix + "/")]
    unique = list(dict.fromkeys(paths))
    return [p for p in unique if not any(_below(p, other) for other in unique)]


def _below(path: str, other: str) -> bool:
    return path != other and path.startswith(other.rstrip("/") + "/")


def with_mountpoint_flags(placements: list[Placement], ms_flags: int) -> list[Placement]:
    """The mountpoint gets the flags recorded for the real mount (SPFS's own mount has FUSE's
    defaults there); binds keep the flags they have."""
    first = dataclasses.replace(placements[0], attr_flags=m.mount_attr_from_ms(ms_flags))
    return [first, *placements[1:]]


def _in_root(path: str, root: str | None) -> str:
    """mountinfo paths are relative to the reader's root; ours is the host root."""
    if root in (None, "/"):
        return path
    return os.path.normpath(f"{root}/{path}")


def _set_attrs(fd: int, attrs: int) -> None:
    # the atime mode is one field: it is always cleared and set as a whole (relatime = 0)
    m.mount_setattr(fd, attrs, (_ALL_ATTRS & ~attrs) | m.MOUNT_ATTR__ATIME)


@dataclass
class _MoveState:
    spfs_clones: list[int]  # detached copies of SPFS at each path, to put back on failure
    spfs_detached: list[int]  # indexes of paths SPFS was taken off
    real_attached: list[int]  # indexes of paths the real mount sits on


def _put_back(state: _MoveState, placements: list[Placement]) -> list[str]:
    """Undo: SPFS again on every path it left.  Returns what could not be undone."""
    problems = []
    for i in reversed(state.spfs_detached):
        path = placements[i].path
        try:
            if i in state.real_attached:
                m.umount2(path, m.MNT_DETACH | m.UMOUNT_NOFOLLOW)
            m.move_mount(state.spfs_clones[i], path)
        except OSError as exc:
            problems.append(f"{path}: {exc}")
    return problems


def _real_mount_for(i: int, real_fd: int, placements: list[Placement]) -> int:
    if i == 0:
        return real_fd
    # a clone of the attached real mount, rooted where this bind of SPFS was rooted; the
    # directory is found below the real mount's root, never through a symlink the
    # container may have put on its path
    sub_dir = beneath.relative(placements[i].sub_root.strip("/"), "bind sub-root")
    dir_fd = beneath.openat2(real_fd, sub_dir or ".", os.O_PATH | os.O_DIRECTORY, beneath.STRICT)
    try:
        return m.clone_tree("", dirfd=dir_fd)
    finally:
        os.close(dir_fd)


def _move_work(real_fd: int, placements: list[Placement]) -> ChildResult:
    if placements[0].sub_root != "/":
        raise OSError(errno.EINVAL, f"SPFS at {placements[0].path} is not mounted at its root")
    state = _MoveState([m.clone_tree(p.path) for p in placements], [], [])
    try:
        for i, placement in enumerate(placements):
            fd = _real_mount_for(i, real_fd, placements)
            _set_attrs(fd, placement.attr_flags)
            m.umount2(placement.path, m.MNT_DETACH | m.UMOUNT_NOFOLLOW)
            state.spfs_detached.append(i)
            m.move_mount(fd, placement.path)
            state.real_attached.append(i)
            # after attaching: clones of a shared mount join its peer group, so a bind that
            # was a slave of the mountpoint becomes a slave of the new one
            m.mount_setattr(fd, 0, 0, placement.propagation.value)
    except OSError as exc:
        problems = _put_back(state, placements)
        detail = f"; rollback problems: {'; '.join(problems)}" if problems else ""
        raise OSError(exc.errno, f"{exc.strerror or exc}{detail}") from None
    return ChildResult({"moved": [p.path for p in placements]})


def move_into_place(real_fd: int, placements: list[Placement], target: Namespaces | None,
                    timeout: float) -> None:
    """Detach SPFS at every placement and attach the real mount `real_fd` there instead."""
    if not placements:
        raise OSError(errno.EINVAL, "no mountpoint to move")
    run_in_namespaces(target, _move_work, timeout, args=(real_fd, placements), fds=(real_fd,))
