"""Runs a manager in this process (stand-in SPFS, a swap step that never ends) and a replace
up to SWAPPING, then waits to be killed.  Prints "spfs PID" and "swapping" on stdout.
Usage: replace_until_killed.py WORK_DIR CONTAINER_PID MOUNTPOINT CGROUP"""

import sys
import time

from manager_helpers import STANDIN_SPFS
from spfs.manager.freezer import FreezerLocks
from spfs.manager.manager import Manager, ManagerConfig
from spfs.manager.protocol import parse_packet
from spfs.manager.replace import ReplacePipeline
from spfs.manager.spfs_daemon import SpfsProcessLauncher
from spfs.manager.steps import NamespaceMountMover, NamespaceRealFsMounter


class EndlessSwap:
    def prepare(self, job):
        return None

    def abandon(self, prepared):
        pass

    def settle(self, job, timeout):
        return {"pending_tasks": 0, "pending_pids": []}

    def swap(self, job, prepared):
        print("swapping", flush=True)
        time.sleep(600)

    def switch(self, *args):
        raise OSError(38, "not here")


def main() -> None:
    work, ct_pid, mountpoint, cgroup = sys.argv[1:]
    swapper = EndlessSwap()
    manager = Manager(ManagerConfig(work, work),
                      SpfsProcessLauncher(command=tuple(STANDIN_SPFS.split())),
                      ReplacePipeline(NamespaceRealFsMounter(), NamespaceMountMover(), swapper,
                                      FreezerLocks()), swapper)
    for request in (f"mount;id=1;mode=stub;mountpoint={mountpoint};ns_pid={ct_pid}",
                    f"replace;id=1;source=real;type=tmpfs;flags=0;freeze_cgroup={cgroup};"
                    "mode=release"):
        reply = manager.handle(parse_packet(request.encode()).request)
        assert reply.code == 0, reply
        if request.startswith("mount"):
            print(f"spfs {reply.data['spfs_pid']}", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
