"""Create, enter and destroy lab containers (guest side).

A container is: new pid/mnt/net/uts/ipc namespaces made by unshare(1), its own root on the
/ct tmpfs, its own cgroup (v1 freezer or v2), a veth link to the guest's root netns where the
NFS server runs, and its NFS mounts made from inside its own network and mount namespaces.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from spfs.lab.ct import nfs_helpers, rootfs
from spfs.lab.ct.util import CtError, run, wait_for
from spfs.lab.ct.spec import (NAME_RE, ROOTS, STATE_ROOT, BindMount, CtState, NfsMount,
                              SpecError, all_states)

log = logging.getLogger(__name__)

CT_PATH = "/bin:/sbin:/usr/bin:/usr/sbin"


def nsenter(state: CtState, *, mount: bool = True, net: bool = True, pid: bool = False,
            other: bool = False, root: bool = False) -> list[str]:
    argv = ["nsenter", "-t", str(state.init_pid)]
    if mount:
        argv.append("-m")
    if net:
        argv.append("-n")
    if pid:
        argv.append("-p")
    if other:
        argv += ["-u", "-i"]
    if root:
        argv += ["-r", "-w"]
    return argv


def _free_index() -> int:
    used = {s.index for s in all_states()}
    for i in range(1, 250):
        if i not in used:
            return i
    raise CtError("no free container index")


def create(name: str, nfs: list[NfsMount], binds: list[BindMount], cgroup: str = "v2",
           mount_timeout: float = 60.0) -> CtState:
    if not NAME_RE.match(name):
        raise SpecError(f"container name {name!r}: lowercase letters, digits, '-', <= 15 chars")
    if (STATE_ROOT / name).exists():
        raise CtError(f"lab container {name!r} exists")
    if cgroup not in ("v1", "v2"):
        raise SpecError("--cgroup is v1 or v2")
    mountpoints = [m.mountpoint for m in nfs] + [b.target for b in binds]
    if len(set(mountpoints)) != len(mountpoints):
        raise SpecError("two mounts at the same container path")
    state = CtState(name=name, index=_free_index(), cgroup=cgroup, nfs=nfs, binds=binds,
                    created=time.time())
    state.state_dir.mkdir(parents=True)
    state.save()
    try:
        _start(state, mount_timeout)
    except BaseException:
        log.error("creating %s failed; cleaning up", name)
        destroy(name, missing_ok=True)
        raise
    return state


def _start(state: CtState, mount_timeout: float) -> None:
    t0 = time.monotonic()
    rootfs.ensure_roots_tmpfs(ROOTS)
    if state.root.exists():
        shutil.rmtree(state.root.parent)
    state.root.mkdir(parents=True)
    rootfs.populate(state.root, [m.mountpoint for m in state.nfs] +
                    [b.target for b in state.binds])
    cg = state.cgroup_dir()
    cg.mkdir(parents=True, exist_ok=True)

    log_file = open(state.state_dir / "ct-init.log", "wb")
    proc = subprocess.Popen(
        ["unshare", "--pid", "--mount", "--net", "--uts", "--ipc", "--fork",
         "--propagation", "private", "setsid", str(rootfs.ct_init_script()),
         str(state.state_dir), str(state.root), state.name],
        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
        start_new_session=True)
    log_file.close()
    state.unshare_pid = proc.pid
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    wait_for("the container's init", lambda: children.exists() and children.read_text().strip()
             or proc.poll() is not None, 10)
    if proc.poll() is not None:
        raise CtError(f"unshare exited {proc.returncode}: "
                      f"{(state.state_dir / 'ct-init.log').read_text()}")
    state.init_pid = int(children.read_text().split()[0])
    state.netns = nfs_helpers.netns_id(state.init_pid) or ""
    # Only the container's tree goes into its cgroup (CRIU's freezer wants nothing else there).
    (cg / "cgroup.procs").write_text(str(state.init_pid))
    state.save()
    wait_for("the container's namespaces", (state.state_dir / "ns-ready").exists, 10)

    _setup_network(state)
    if nfs_helpers.needed(state):
        nfs_helpers.start(state)
    for m in state.nfs:
        _mount_nfs(state, m, mount_timeout)
    for b in state.binds:
        _bind(state, b)
    (state.state_dir / "go").touch()
    wait_for("the container's init to pivot",
             lambda: Path(f"/proc/{state.init_pid}/comm").read_text().strip() == "ctinit", 20)
    state.save()
    log.info("container %s up: init pid %d, %s, %d NFS mount(s) in %.2f s", state.name,
             state.init_pid, state.ct_addr, len(state.nfs), time.monotonic() - t0)


def _setup_network(state: CtState) -> None:
    run(["ip", "link", "add", state.host_veth, "type", "veth", "peer", "name", state.ct_veth,
         "netns", str(state.init_pid)])
    run(["ip", "addr", "add", f"{state.host_addr}/24", "dev", state.host_veth])
    run(["ip", "link", "set", state.host_veth, "up"])
    inside = nsenter(state, mount=False)
    run(inside + ["ip", "link", "set", "lo", "up"])
    run(inside + ["ip", "addr", "add", f"{state.ct_addr}/24", "dev", state.ct_veth])
    run(inside + ["ip", "link", "set", state.ct_veth, "up"])


def _mount_nfs(state: CtState, m: NfsMount, timeout: float) -> None:
    """Mount from inside the container's netns and mntns (before it pivots into its root)."""
    target = state.root / m.mountpoint.lstrip("/")
    argv = nsenter(state) + ["mount", "-t", "nfs", "-o", m.mount_options(state.nfs_server),
                             m.source(state.nfs_server), str(target)]
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise CtError(f"mounting {m.source(state.nfs_server)} at {m.mountpoint}: "
                          f"{proc.stderr.strip()}")
        time.sleep(0.5)


def _bind(state: CtState, b: BindMount) -> None:
    src = str(state.root / b.source[3:].lstrip("/")) if b.inside else b.source
    target = str(state.root / b.target.lstrip("/"))
    run(nsenter(state, net=False) + ["mount", "--bind", src, target])
    if b.readonly:
        run(nsenter(state, net=False) + ["mount", "-o", "remount,bind,ro", target])


def exec_argv(state: CtState, argv: list[str]) -> list[str]:
    return nsenter(state, pid=True, other=True, root=True) + [
        "env", "-i", f"PATH={CT_PATH}", "HOME=/root", "TERM=dumb"] + argv


def _join_cgroup(state: CtState) -> Callable[[], None]:
    procs = state.cgroup_dir() / "cgroup.procs"

    def join() -> None:
        procs.write_text(str(os.getpid()))
    return join


def exec_in(name: str, argv: list[str], *, detach: bool = False, log_path: str = "/dev/null",
            timeout: float | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """Run argv inside the container. Detached commands are re-parented to the container's
    init (the shell that starts them exits), so CRIU sees one process tree."""
    state = CtState.load(name)
    if not alive(state):
        raise CtError(f"container {name} is not running")
    if detach:
        script = 'setsid "$@" < /dev/null > "$LOG" 2>&1 & echo $!'
        argv = ["/bin/sh", "-c", f'LOG={_shq(log_path)}; {script}', "sh"] + argv
        capture = True
    return subprocess.run(exec_argv(state, argv), preexec_fn=_join_cgroup(state),
                          capture_output=capture, text=capture, timeout=timeout)


def _shq(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def alive(state: CtState) -> bool:
    try:
        return Path(f"/proc/{state.init_pid}/comm").read_text().strip() == "ctinit"
    except OSError:
        return False


def ct_pids(state: CtState) -> list[int]:
    procs = state.cgroup_dir() / "cgroup.procs"
    try:
        return [int(p) for p in procs.read_text().split()]
    except FileNotFoundError:
        return []


def _exited(pid: int) -> bool:
    """Gone, or a zombie (a zombie has already released its namespaces)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def describe_tasks(pids: list[int]) -> str:
    """pid, state, kernel wait channel and command of each task, for error messages."""
    out = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            state = stat[stat.rindex(")") + 2]
            wchan = Path(f"/proc/{pid}/wchan").read_text()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            out.append(f"{pid} {state} {wchan} {comm}")
        except OSError:
            continue
    return "; ".join(out) or "(none left)"


def stop_processes(state: CtState, timeout: float = 20.0) -> None:
    """Kill the container's processes (killing its init ends the pid namespace) and the
    guest-side NFS helpers of its netns, so the netns itself goes away."""
    netns = state.netns or (nfs_helpers.netns_id(state.init_pid) if state.init_pid else None)
    if state.init_pid:
        try:
            os.kill(state.init_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in ct_pids(state):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        wait_for(f"the processes of {state.name} to exit", lambda: not ct_pids(state), timeout)
    except CtError as e:
        raise CtError(f"{e}: {describe_tasks(ct_pids(state))}") from None
    # unshare(1), the container init's parent, lives in the container's mount and net
    # namespaces; its exit unmounts the container's NFS, and for NFSv3 that unregisters lockd
    # through the container netns's rpcbind. Stopping the helpers earlier hangs that exit in
    # lockd_down with nlmsvc_mutex held, and every later NFSv3 unmount in the guest with it.
    if state.unshare_pid:
        wait_for(f"unshare {state.unshare_pid} to exit",
                 lambda: _exited(state.unshare_pid), timeout)
    if netns:
        nfs_helpers.stop(state, netns)


def release_veth(state: CtState, grace: float = 5.0) -> None:
    """Free the guest end of a dead container's veth (and its name, for a restore).

    It normally goes away with the container's netns. Only once every process of the
    container is gone is it safe to delete it by hand: removing it under a live NFS client
    hangs that client (lab-notes G3). An NFSv3 client's lockd/rpcbind transports keep the
    netns alive for a while after its last process exits, so we don't wait for that.
    """
    link = Path(f"/sys/class/net/{state.host_veth}")
    try:
        wait_for(f"{state.host_veth} to go away", lambda: not link.exists(), grace)
    except CtError:
        log.info("%s: deleting %s (its netns is still referenced by the kernel)",
                 state.name, state.host_veth)
        subprocess.run(["ip", "link", "del", state.host_veth], capture_output=True, timeout=10)
        wait_for(f"{state.host_veth} to be deleted", lambda: not link.exists(), 10)


def destroy(name: str, missing_ok: bool = False) -> None:
    try:
        state = CtState.load(name)
    except SpecError:
        if missing_ok:
            return
        raise
    stop_processes(state)
    release_veth(state)
    cg = state.cgroup_dir()
    if cg.exists():
        try:
            cg.rmdir()
        except OSError as e:
            log.warning("cannot remove %s: %s", cg, e)
    if state.root.parent.exists():
        subprocess.run(["umount", "-R", "-l", str(state.root)], capture_output=True,
                       timeout=30)
        shutil.rmtree(state.root.parent, ignore_errors=True)
    shutil.rmtree(state.state_dir, ignore_errors=True)
