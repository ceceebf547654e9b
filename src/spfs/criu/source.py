"""The dumped container's tasks, left stopped by `criu dump --leave-stopped` until we know
its images will restore: then let go (killed, as a plain `criu dump` would have done), or
resumed where they were, with what the dump left behind undone.

What a dump leaves that a running container must not keep: CRIU's network lock in the
container's network namespace (iptables chain or nftables table named CRIU, DROP except
packets marked 0xC114), our action script's chain marking NFS traffic through it, and the
`link_remap.N` links --link-remap made on the share for files open but unlinked.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass

from spfs.sys.beneath import Share, magic_path, open_in_root
from spfs.sys.children import descendants, process_state

log = logging.getLogger(__name__)

LOCK_NAME = "CRIU"  # CRIU's network lock: its iptables chain, its nftables table (CRIU[-N])
MARK_CHAIN = "SPFS-NFS"  # the action script's mangle chain (action-script.sh)
TOOL_TIMEOUT = 30.0


class SourceError(RuntimeError):
    pass


def process_tree(root: int) -> list[int]:
    """`root` and its descendants, parents first."""
    return [root, *descendants(root)]


@dataclass
class StoppedSource:
    """The tasks of a dumped tree, stopped; collected once (stopped tasks do not fork)."""

    root: int
    tasks: list[int]

    @classmethod
    def of(cls, root: int) -> "StoppedSource":
        if not process_state(root):
            raise SourceError(f"the dumped tree's root {root} is gone")
        return cls(root, process_tree(root))

    def release(self, timeout: float = 60.0) -> None:
        """Kill every task (what CRIU does at the end of a plain dump), and wait for the
        root to be gone (a zombie for its parent to reap counts as gone)."""
        for pid in self.tasks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while process_state(self.root) not in ("", "Z", "X"):
            if time.monotonic() > deadline:
                raise SourceError(f"the dumped tree's root {self.root} did not die in "
                                  f"{timeout:.0f} s of SIGKILL (state {process_state(self.root)})")
            time.sleep(0.02)

    def resume(self) -> list[str]:
        """Undo the network lock, then let the tasks run on; what could not be undone."""
        problems = unlock_network(self.root)
        for pid in self.tasks:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                problems.append(f"task {pid} is gone")
        return problems


def _in_netns(pid: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", *argv], capture_output=True,
                          text=True, timeout=TOOL_TIMEOUT)


def _own_netns(pid: int) -> bool:
    return os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino


def unlock_network(pid: int) -> list[str]:
    """CRIU's lock and our marking chain out of `pid`'s network namespace (only one of its
    own: a container sharing ours was locked per connection, which CRIU's dump undoes)."""
    if not _own_netns(pid):
        return []
    problems: list[str] = []
    for tool in ("iptables", "ip6tables"):
        for table, chain, hooks in (("filter", LOCK_NAME, ("INPUT", "OUTPUT")),
                                    ("mangle", MARK_CHAIN, ("OUTPUT", "PREROUTING"))):
            try:
                problems += _drop_chain(pid, tool, table, chain, hooks)
            except FileNotFoundError:
                break  # no such tool here: nothing of its kind can have been set up
    try:
        listed = _in_netns(pid, ["nft", "list", "tables"])
    except FileNotFoundError:
        return problems
    for line in listed.stdout.splitlines():
        words = line.split()  # "table inet CRIU-1234"
        if len(words) == 3 and words[0] == "table" and \
                (words[2] == LOCK_NAME or words[2].startswith(LOCK_NAME + "-")):
            done = _in_netns(pid, ["nft", "delete", "table", words[1], words[2]])
            if done.returncode != 0:
                problems.append(f"nft delete table {words[1]} {words[2]}: {done.stderr.strip()}")
    return problems


def _drop_chain(pid: int, tool: str, table: str, chain: str, hooks: tuple[str, ...]) -> list[str]:
    listed = _in_netns(pid, [tool, "-w", "-t", table, "-S", chain])
    if listed.returncode != 0:
        return []  # no such chain
    problems = []
    for hook in hooks:
        while _in_netns(pid, [tool, "-w", "-t", table, "-C", hook, "-j", chain]).returncode == 0:
            done = _in_netns(pid, [tool, "-w", "-t", table, "-D", hook, "-j", chain])
            if done.returncode != 0:
                problems.append(f"{tool} -t {table} -D {hook} -j {chain}: {done.stderr.strip()}")
                break
    for step in (["-F", chain], ["-X", chain]):
        done = _in_netns(pid, [tool, "-w", "-t", table, *step])
        if done.returncode != 0:
            problems.append(f"{tool} -t {table} {' '.join(step)}: {done.stderr.strip()}")
    return problems


def remove_link_remaps(pid: int, mountpoint: str, names: list[str]) -> list[str]:
    """The link_remap.N names --link-remap made (relative to the share mounted at
    `mountpoint` in `pid`'s mount namespace), removed below that share's root."""
    problems = []
    try:
        root_fd = open_in_root(pid, mountpoint)
    except OSError as e:
        return [f"{mountpoint} in the container: {e}"]
    try:
        share = Share.open(magic_path(root_fd), f"share at {mountpoint}")
    except OSError as e:
        os.close(root_fd)
        return [f"{mountpoint} in the container: {e}"]
    os.close(root_fd)
    try:
        for name in names:
            try:
                share.unlink(name)
            except OSError as e:
                problems.append(f"{name} on {mountpoint}: {e}")
    finally:
        share.close()
    return problems
