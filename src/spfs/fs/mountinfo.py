"""Finding SPFS's own mount in /proc/self/mountinfo (without touching the mount itself,
which would deadlock before the FUSE loop runs)."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def find_fuse_device(mountpoint: str, fstype: str = "fuse.spfs") -> str | None:
    """The "major:minor" of the newest *fstype* mount at *mountpoint*, or None."""
    # realpath() of the mountpoint itself would stat it: resolve only its parent.
    absolute = os.path.abspath(mountpoint)
    wanted = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    found = None
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            before, _, after = line.partition(" - ")
            fields = before.split()
            if len(fields) >= 5 and _unescape(fields[4]) == wanted \
                    and after.split(" ", 1)[0] == fstype:
                found = fields[2]
    return found


def set_read_ahead(mountpoint: str, kib: int) -> bool:
    """Raise the FUSE bdi readahead so sequential reads arrive as large READ requests
    (128 KiB by default; feasibility §1 measured +60 % with 1 MiB)."""
    device = find_fuse_device(mountpoint)
    if device is None:
        log.warning("cannot find the spfs mount at %s in mountinfo; readahead unchanged", mountpoint)
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as handle:
            handle.write(str(kib))
    except OSError as exc:
        log.warning("cannot set read_ahead_kb of bdi %s: %s", device, exc)
        return False
    log.debug("bdi %s read_ahead_kb=%d", device, kib)
    return True
