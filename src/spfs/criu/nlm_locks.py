"""OFD locks on NFSv3, which CRIU would turn into POSIX locks.

Linux's NLM client (NFSv3) records a granted OFD lock as a POSIX lock with the taker's pid
in /proc/locks and fdinfo, while its owner stays the open file description. CRIU reads
those files, so it dumps the lock as POSIX and restores it as one, owned by the process:
afterwards the application's own OFD request on that file conflicts with it (EAGAIN).

Before `criu dump` we ask the kernel whose lock it is: F_OFD_GETLK through a copy of the
process's descriptor (pidfd_getfd; the same open file description) finds no conflict only
if the lock belongs to that description. After the dump, those entries of filelocks.img
are marked OFD, which CRIU restores with F_OFD_SETLK.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pycriu

from spfs.criu.images import MAX_IMAGE_BYTES
from spfs.swap import procfs
from spfs.swap.tables import flock_struct
from spfs.sys import pidfd
from spfs.sys.regular import read_regular

log = logging.getLogger(__name__)

F_OFD_GETLK = 36
FL_POSIX, FL_OFD = 1, 4


@dataclass(frozen=True)
class OfdLock:
    pid: int      # as the dump sees it (the host's pid namespace)
    nspid: int    # in the container's pid namespace
    fd: int


def _owned_by_description(pid: int, fd: int, lock: procfs.Lock) -> bool:
    copy = pidfd.getfd(pid, fd)
    try:
        answer = fcntl.fcntl(copy, F_OFD_GETLK, flock_struct(lock))
        return struct.unpack_from("<h", answer)[0] == fcntl.F_UNLCK  # l_type comes first
    finally:
        os.close(copy)


def find(root: int, devices: set[int]) -> list[OfdLock]:
    """OFD locks shown as POSIX on files of `devices` (NFSv3 superblocks), held by `root`
    or its descendants."""
    found = []
    for pid in procfs.tree_pids([root]) if devices else []:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except (FileNotFoundError, PermissionError):
            continue
        for name in fds:
            fd = int(name)
            try:
                if os.stat(f"/proc/{pid}/fd/{fd}").st_dev not in devices:
                    continue
                posix = [lk for lk in procfs.fdinfo(pid, fd).locks
                         if lk.kind == "POSIX" and lk.pid == pid]
                if posix and all(_owned_by_description(pid, fd, lk) for lk in posix):
                    found.append(OfdLock(pid, procfs.status(pid).nspid[-1], fd))
            except (FileNotFoundError, ProcessLookupError):
                continue
            except OSError as exc:
                log.warning("checking the locks of fd %d of %d: %s", fd, pid, exc)
    return found


def mark_in_images(images: Path, locks: list[OfdLock]) -> int:
    """Turn the dumped POSIX entries of `locks` into OFD entries; returns how many."""
    path = images / "filelocks.img"
    if not locks:
        return 0
    if not path.exists():
        log.warning("no %s: the OFD locks found before the dump were not dumped", path.name)
        return 0
    # as every image criu-spfs reads: not followed, never a FIFO or a device, capped
    img = pycriu.images.load(io.BytesIO(read_regular(str(path), MAX_IMAGE_BYTES)))
    wanted = {(lk.pid, lk.fd) for lk in locks} | {(lk.nspid, lk.fd) for lk in locks}
    marked = 0
    for entry in img["entries"]:
        if entry["flag"] == FL_POSIX and (entry["pid"], entry["fd"]) in wanted:
            entry["flag"] = FL_OFD
            marked += 1
    if marked:
        tmp = path.with_suffix(".new")
        tmp.unlink(missing_ok=True)  # whatever is there is replaced, never written through
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as f:
            pycriu.images.dump(img, f)
        tmp.replace(path)
    return marked
