"""`criu-spfs dump`: checkpoint a container whose NFS mounts SPFS will stand in for.

Finds the NFS mounts (nfs, nfs4 and binds of them) of the container's mount namespace,
records them in DIR/criu-spfs.json (source, type, superblock options incl. addr=, per-mount
flags, propagation, bind sub-roots), and runs `criu dump` with each declared external,
--link-remap (silly-renamed files), --file-locks, and our action script, which lets the
container's NFS traffic through CRIU's network lock so dump cannot deadlock on it.
A container whose earlier replace is still pending (SPFS still mounted) is dumped once the
replace is done, within a deadline (pending.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from spfs.criu import nlm_locks, pending
from spfs.criu.mountinfo import NfsSuperblock, nfs_superblocks
from spfs.criu.runner import CriuError, run_criu

log = logging.getLogger(__name__)

ACTION_SCRIPT = Path(__file__).with_name("action-script.sh")
MANIFEST_NAME = "criu-spfs.json"
MANIFEST_VERSION = 1
DUMP_TIMEOUT = 600.0


class DumpError(RuntimeError):
    pass


@dataclass
class DumpResult:
    images: Path
    superblocks: list[NfsSuperblock]
    seconds: float


def external_key(sb: NfsSuperblock, mnt_id: int) -> str:
    return f"{sb.key}-{mnt_id}"


def criu_dump_argv(criu: str, pid: int, images: Path, superblocks: list[NfsSuperblock],
                   extra: list[str]) -> list[str]:
    argv = [criu, "dump", "-t", str(pid), "-D", str(images), "-o", "dump.log", "-v4",
            "--file-locks", "--link-remap", "--action-script", str(ACTION_SCRIPT)]
    for sb in superblocks:
        for m in sb.mounts:
            argv += ["--external", f"mnt[{m.mountpoint}]:{external_key(sb, m.mount_id)}"]
    return argv + extra


def write_manifest(images: Path, pid: int, superblocks: list[NfsSuperblock]) -> Path:
    path = images / MANIFEST_NAME
    doc = {"version": MANIFEST_VERSION, "pid": pid, "created": time.time(),
           "superblocks": [sb.to_json() | {"externals": {str(m.mount_id): external_key(sb, m.mount_id)
                                                         for m in sb.mounts}}
                           for sb in superblocks]}
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    return path


def dump(pid: int, images: Path, criu: str = "criu", extra: list[str] | None = None,
         timeout: float = DUMP_TIMEOUT, env: dict[str, str] | None = None,
         pending_deadline: float = pending.DEFAULT_DEADLINE_S) -> DumpResult:
    images = Path(images)
    images.mkdir(parents=True, exist_ok=True)
    try:
        pending.wait_for_replaces(pid, pending_deadline)
        superblocks = nfs_superblocks(pid)
    except FileNotFoundError:
        raise DumpError(f"no process {pid}") from None
    except pending.PendingReplace as e:
        raise DumpError(str(e)) from None
    write_manifest(images, pid, superblocks)
    log.info("dumping %d: %d NFS superblock(s), %d mount(s)", pid, len(superblocks),
             sum(len(sb.mounts) for sb in superblocks))
    ofd_locks = nlm_locks.find(pid, {sb.st_dev for sb in superblocks if sb.nlm})
    argv = criu_dump_argv(criu, pid, images, superblocks, extra or [])
    try:
        seconds = run_criu(argv, images / "dump.log", timeout,
                           dict(os.environ) | (env or {}))
    except CriuError as e:
        raise DumpError(str(e)) from None
    log.info("criu dump done in %.2f s", seconds)
    if ofd_locks:
        marked = nlm_locks.mark_in_images(images, ofd_locks)
        log.info("%d OFD lock(s) on NFSv3 kept as OFD locks in the images (CRIU saw POSIX)",
                 marked)
    return DumpResult(images, superblocks, seconds)
