"""`criu-spfs dump`: checkpoint a container whose NFS mounts SPFS will stand in for.

Finds the NFS mounts (nfs, nfs4 and binds of them) of the container's mount namespace,
records them in DIR/criu-spfs.json (source, type, superblock options incl. addr=, per-mount
flags, propagation, bind sub-roots), and runs `criu dump` with each declared external,
--link-remap (silly-renamed files), --file-locks, and our action script, which lets the
container's NFS traffic through CRIU's network lock so dump cannot deadlock on it.
A container whose earlier replace is still pending (SPFS still mounted) is dumped once the
replace is done, within a deadline (pending.py).

Never lose a container: CRIU leaves the dumped tasks stopped (--leave-stopped) while the
checks the restore will run are run on the images (restorable.py); only then are the tasks
killed, as a plain dump would have killed them. If our restore would refuse the images,
the container is resumed where it was (network lock and link remaps undone, source.py)
and the dump fails saying why. A caller that asked CRIU to leave the tasks running or
stopped itself gets the check, and the tasks as it asked.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from spfs.criu import nlm_locks, pending
from spfs.criu.images import load_images
from spfs.criu.mountinfo import NfsSuperblock, nfs_superblocks
from spfs.criu.record import load_record
from spfs.criu.restorable import RestoreError, check_restorable
from spfs.criu.runner import CriuError, run_criu
from spfs.criu.source import SourceError, StoppedSource, remove_link_remaps
from spfs.criu.stubtree import linked_remaps

log = logging.getLogger(__name__)

ACTION_SCRIPT = Path(__file__).with_name("action-script.sh")
MANIFEST_NAME = "criu-spfs.json"
REJECTED_NAME = "criu-spfs.rejected.json"  # the record, once the container was resumed
LEFT_ALIVE = ("--leave-running", "-R", "--leave-stopped", "-s")
MANIFEST_VERSION = 1
DUMP_TIMEOUT = 600.0


class DumpError(RuntimeError):
    pass


@dataclass
class DumpResult:
    images: Path
    superblocks: list[NfsSuperblock]
    seconds: float
    check_seconds: float = 0.0  # the restore's checks on the images, tasks stopped


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
    extra = extra or []
    caller_keeps_tasks = any(a in LEFT_ALIVE for a in extra)
    argv = criu_dump_argv(criu, pid, images, superblocks, extra)
    if not caller_keeps_tasks:
        argv.append("--leave-stopped")
    try:
        seconds = run_criu(argv, images / "dump.log", timeout,
                           dict(os.environ) | (env or {}))
    except CriuError as e:  # CRIU lets the tasks run on when its dump fails
        raise DumpError(str(e)) from None
    log.info("criu dump done in %.2f s", seconds)
    # stopped tasks neither fork nor exit: the tree is the one CRIU dumped
    source = None if caller_keeps_tasks else StoppedSource.of(pid)
    if ofd_locks:
        marked = nlm_locks.mark_in_images(images, ofd_locks)
        log.info("%d OFD lock(s) on NFSv3 kept as OFD locks in the images (CRIU saw POSIX)",
                 marked)
    t0 = time.monotonic()
    try:
        check_restorable(images)
    except RestoreError as e:
        if source is None:
            raise DumpError(f"{e} (the tasks were left as asked)") from None
        raise DumpError(_resume_source(source, images, str(e))) from None
    check_seconds = time.monotonic() - t0
    log.info("images checked as the restore will check them (%.2f s)", check_seconds)
    if source is not None:
        try:
            source.release()
        except SourceError as e:
            raise DumpError(f"images written and checked, but {e}") from None
    return DumpResult(images, superblocks, seconds, check_seconds)


def _resume_source(source: StoppedSource, images: Path, why: str) -> str:
    """The container runs on where it was dumped; the error for the dump's caller."""
    problems = _remove_link_remaps(source.root, images)
    problems += source.resume()
    try:  # these images are older than the running container: no restore may use them
        (images / MANIFEST_NAME).replace(images / REJECTED_NAME)
    except OSError as e:
        problems.append(f"{images / MANIFEST_NAME} not set aside: {e}")
    message = (f"{why}; the container was resumed where it was (pid {source.root}) and "
               f"the images were not used (record moved to {REJECTED_NAME})")
    if problems:
        message += "; while resuming: " + "; ".join(problems)
    log.error("%s", message)
    return message


def _remove_link_remaps(pid: int, images: Path) -> list[str]:
    """link_remap.N files --link-remap made on the shares: the running tasks still have
    the unlinked files open, nobody needs the links."""
    try:
        image_set = load_images(images)
        shares = load_record(images)
    except Exception as e:  # noqa: BLE001 - whatever made the images unreadable
        return [f"link_remap files (if any) left on the shares: images unreadable: {e}"]
    problems = []
    for share in shares:
        dev = next((m.root_dev for m in image_set.mounts.values()
                    if any(m.mnt_id == r.mnt_id for r in share.mounts)), None)
        if dev is None:
            continue
        names = [r.remap for r in linked_remaps(image_set, dev)]
        if names:
            problems += remove_link_remaps(pid, share.primary.mountpoint, names)
    return problems
