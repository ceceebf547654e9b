"""Mounting the real filesystem inside a container's namespaces as a detached mount.

The mount is made by a forked child that joined the container's user/uts/net/mnt namespaces
(NFS binds its client to the network namespace of the mounter).  Preferred: fsopen + fsconfig
+ fsmount, giving a mount that is attached nowhere, so the container cannot see it.  If the
filesystem refuses the new API, mount(2) is used in a throw-away private copy of the container's
mount namespace, on top of the SPFS mountpoint there, and an open_tree clone of it is returned.
Attempts are retried with exponential backoff until a deadline; each attempt is bounded too
(a hung NFS mount is killed).
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass

from spfs.sys import mountapi as m
from spfs.sys import namespaces
from spfs.sys.nsexec import ChildResult, Namespaces, run_in_namespaces

log = logging.getLogger(__name__)

# Errors no retry can fix: unknown fs type, bad options.
PERMANENT_ERRNOS = frozenset({errno.ENODEV, errno.EINVAL, errno.ENOTBLK, errno.ENAMETOOLONG})


@dataclass(frozen=True)
class RealFs:
    """What `replace` recorded: the real fs to mount in place of SPFS."""

    source: str
    fstype: str
    flags: int  # mount(2) MS_* flags
    data: str  # comma-separated options (for NFS: the saved superblock options, addr= incl.)


@dataclass(frozen=True)
class RetryPolicy:
    deadline: float = 300.0  # seconds for all attempts together
    attempt_timeout: float = 60.0
    first_delay: float = 0.1
    max_delay: float = 5.0


def split_options(data: str) -> list[tuple[str, str | None]]:
    options = []
    for item in data.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        options.append((key, value if sep else None))
    return options


def _fsmount(fs: RealFs) -> int:
    fs_fd = m.fsopen(fs.fstype)
    try:
        m.fsconfig_string(fs_fd, "source", fs.source)
        for key, value in split_options(fs.data):
            if value is None:
                m.fsconfig_flag(fs_fd, key)
            else:
                m.fsconfig_string(fs_fd, key, value)
        for flag in m.sb_flags_from_ms(fs.flags):
            m.fsconfig_flag(fs_fd, flag)
        m.fsconfig_create(fs_fd)
        return m.fsmount(fs_fd, m.mount_attr_from_ms(fs.flags))
    finally:
        os.close(fs_fd)


def _legacy_mount(fs: RealFs, hidden_dir: str) -> int:
    namespaces.unshare(namespaces.CLONE_NEWNS)
    # nothing done in this copy of the namespace may propagate back into the container
    m.mount("none", "/", None, m.MS_REC | m.MS_PRIVATE, None)
    keep = m.MS_RDONLY | m.MS_NOSUID | m.MS_NODEV | m.MS_NOEXEC | m.MS_SYNCHRONOUS | \
        m.MS_DIRSYNC | m.MS_NOATIME | m.MS_NODIRATIME | m.MS_STRICTATIME | m.MS_LAZYTIME | \
        m.MS_RELATIME | m.MS_SILENT
    m.mount(fs.source, hidden_dir, fs.fstype, fs.flags & keep, fs.data or None)
    return m.clone_tree(hidden_dir)


def _mount_work(fs: RealFs, hidden_dir: str, legacy: bool) -> ChildResult:
    if not legacy:
        try:
            return ChildResult({"api": "fsmount"}, [_fsmount(fs)])
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return ChildResult({"api": "mount"}, [_legacy_mount(fs, hidden_dir)])


def mount_real_fs(fs: RealFs, target: Namespaces | None, hidden_dir: str,
                  policy: RetryPolicy = RetryPolicy(), legacy: bool = False) -> int:
    """A detached mount of `fs` made in `target`'s namespaces; the caller owns the fd.

    `hidden_dir` is a directory of the container (the SPFS mountpoint) used only by the
    mount(2) fallback, inside a private copy of the namespace.
    """
    deadline = time.monotonic() + policy.deadline
    delay = policy.first_delay
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            result = run_in_namespaces(target, _mount_work,
                                       max(0.1, min(policy.attempt_timeout, left)),
                                       args=(fs, hidden_dir, legacy))
            log.info("mounted %s (%s) with %s after %d attempt(s)", fs.source, fs.fstype,
                     result.value["api"], attempt)
            assert result.fds and len(result.fds) == 1
            return result.fds[0]
        except OSError as exc:
            left = deadline - time.monotonic()
            if exc.errno in PERMANENT_ERRNOS or left <= 0:
                raise OSError(exc.errno, f"mounting {fs.source} ({fs.fstype}) failed after "
                                         f"{attempt} attempt(s): {exc.strerror or exc}") from None
            log.warning("mount of %s failed (%s); attempt %d, retrying in %.1f s",
                        fs.source, exc, attempt, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, policy.max_delay)
