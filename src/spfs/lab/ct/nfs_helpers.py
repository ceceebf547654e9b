"""rpcbind and rpc.statd for a container's network namespace (NFSv3 locks).

Why: the NFSv3 client's lockd lives in the netns of the mount, and before its first lock it
asks the NSM (rpc.statd) *of that netns* to monitor the server, through that netns's rpcbind
on 127.0.0.1. A container netns has neither, so F_SETLK fails with ENOLCK ("lockd: cannot
monitor"). mount.nfs would start a statd itself, but it finds the guest's statd pid file (the
container's mntns still shares the guest's /run before it pivots) and does nothing.
So the lab runs both daemons in the container's netns, each container with a private /run and
state dir (a private mount namespace), as processes of the guest (not of the container, so
CRIU does not dump them; they are stopped before dump and restarted after restore).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from spfs.lab.ct.util import CtError, run, wait_for
from spfs.lab.ct.spec import CtState

log = logging.getLogger(__name__)

DAEMONS = ("rpcbind", "rpc.statd")

_START = """
mount -t tmpfs -o mode=755 nfs-helpers /run &&
mkdir -p /run/rpcbind /run/statd/sm /run/statd/sm.bak &&
mount --bind /run/statd /var/lib/nfs &&
rpcbind -w && rpc.statd --no-notify
"""


def needed(state: CtState) -> bool:
    return any(m.vers == "3" and "nolock" not in m.options.split(",") for m in state.nfs)


def netns_id(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def helper_pids(state: CtState, netns: str | None = None) -> list[int]:
    netns = netns or netns_id(state.init_pid)
    if netns is None:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in DAEMONS and netns_id(int(entry.name)) == netns:
            pids.append(int(entry.name))
    return pids


def start(state: CtState) -> None:
    run(["nsenter", "-t", str(state.init_pid), "-n", "unshare", "-m", "--propagation",
         "private", "sh", "-c", _START], timeout=30)
    wait_for("rpcbind and rpc.statd in the container netns",
             lambda: len(helper_pids(state)) >= 2, 10)
    log.info("%s: rpcbind and rpc.statd running in its netns", state.name)


def stop(state: CtState, netns: str | None = None) -> None:
    pids = helper_pids(state, netns)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        wait_for("NFS helpers to exit",
                 lambda: not any(Path(f"/proc/{p}").exists() for p in pids), 10)
    except CtError:
        log.warning("%s: NFS helpers %s did not exit", state.name, pids)
