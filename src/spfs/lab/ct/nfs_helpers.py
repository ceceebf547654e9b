"""rpcbind and rpc.statd for a container's network namespace (NFSv3 locks).

Why: the NFSv3 client's lockd lives in the netns of the mount, and before its first lock it
asks the NSM (rpc.statd) *of that netns* to monitor the server, through that netns's rpcbind
on 127.0.0.1. A container netns has neither, so F_SETLK fails with ENOLCK ("lockd: cannot
monitor"). mount.nfs would start a statd itself, but it finds the guest's statd pid file (the
container's mntns still shares the guest's /run before it pivots) and does nothing.
So the lab runs both daemons in the container's netns, each container with a private /run and
state dir (a private mount namespace), as processes of the guest (not of the container, so
CRIU does not dump them; they are stopped before dump and restarted by the lab's action
script before the restored processes resume: `python -m spfs.lab.ct.nfs_helpers PID`).
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
    return _pids_in_netns(netns or netns_id(state.init_pid))


def _pids_in_netns(netns: str | None) -> list[int]:
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


def start_for(pid: int) -> None:
    """rpcbind and rpc.statd in the network namespace of `pid`."""
    run(["nsenter", "-t", str(pid), "-n", "unshare", "-m", "--propagation",
         "private", "sh", "-c", _START], timeout=30)
    netns = netns_id(pid)
    wait_for("rpcbind and rpc.statd in the container netns",
             lambda: len(_pids_in_netns(netns)) >= 2, 10)
    log.info("rpcbind and rpc.statd running in the netns of pid %d", pid)


def start(state: CtState) -> None:
    start_for(state.init_pid)


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


if __name__ == "__main__":
    import sys
    logging.basicConfig(level=logging.INFO, format="spfs-lab nfs-helpers: %(message)s")
    try:
        start_for(int(sys.argv[1]))
    except (CtError, ValueError, IndexError) as e:
        print(f"spfs-lab nfs-helpers: {e}", file=sys.stderr)
        sys.exit(1)
