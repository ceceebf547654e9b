"""Put back the file offsets CRIU 3.17 and 3.18 move while they check ELF build-ids.

Those versions validate a restored regular file that had a build-id at dump time by reading
its first five bytes through the very descriptor they then hand to the process, after
they set its offset (files-reg.c, get_build_id; 3.19 maps the file instead). A process
that was dumped between an open() of an ELF file and its read() (a program reading its own
/proc/self/exe, a loader, a packer) resumes five bytes further than it was. Plain CRIU
restores have the same fault; criu-spfs puts each such offset back at post-restore, when
every fd is in place and no task runs its own code yet, through a copy of the descriptor
(pidfd_getfd), which shares the offset with the task's own.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from spfs.criu.images import ImageSet
from spfs.sys.pidfd import getfd_from

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class DumpedOffset:
    pid: int     # in the dumped (and restored) pid namespace
    fd: int
    pos: int
    name: str


def offsets_to_put_back(images: ImageSet) -> list[DumpedOffset]:
    """The fds CRIU will check by build-id, each with the offset it had at dump time."""
    out = []
    for pid, fds in images.fd_tables.items():
        for fd, file_id in fds:
            f = images.files.get(file_id)
            if f is None or not f.build_id or f.pos is None or f.flags & os.O_PATH:
                continue
            out.append(DumpedOffset(pid, fd, f.pos, f.name))
    return out


def _ns_pid(host_pid: int) -> int:
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise OSError(f"no NSpid line for pid {host_pid}")


def restored_tree(init_pid: int) -> dict[int, int]:
    """pid in the container's pid namespace -> pid here, for init and its descendants."""
    found: dict[int, int] = {}
    todo = [init_pid]
    while todo:
        pid = todo.pop()
        if pid in found.values():
            continue
        try:
            found[_ns_pid(pid)] = pid
            for tid in os.listdir(f"/proc/{pid}/task"):
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone meanwhile: nothing to put back there
    return found


def put_back(offsets: list[DumpedOffset], init_pid: int) -> tuple[int, list[str]]:
    """Set each fd's offset to its dumped value; returns how many moved and the problems
    (each names the fd; the restore goes on: a process with one offset wrong beats none)."""
    if not offsets:
        return 0, []
    pids = restored_tree(init_pid)
    moved, problems = 0, []
    for off in offsets:
        where = f"fd {off.fd} of pid {off.pid} ({off.name})"
        host = pids.get(off.pid)
        if host is None:
            problems.append(f"{where}: the process is not in the restored tree")
            continue
        try:
            pidfd = os.pidfd_open(host)
            try:
                copy = getfd_from(pidfd, off.fd)
            finally:
                os.close(pidfd)
            # Only lseek: it never asks the filesystem (an fstat would, and SPFS in stub
            # mode parks the question until the replace, which waits for this restore).
            try:
                if os.lseek(copy, 0, os.SEEK_CUR) != off.pos:
                    os.lseek(copy, off.pos, os.SEEK_SET)
                    moved += 1
            finally:
                os.close(copy)
        except OSError as exc:
            problems.append(f"{where}: {exc}")
    for problem in problems:
        log.warning("cannot put back a file offset: %s", problem)
    return moved, problems
