"""Suspend and resume lab containers with CRIU.

By default criu-spfs does the work: SPFS stands in for each share at restore and
spfs-manager puts the real NFS back, mounted inside the container. `--plain` is the baseline
upstream CRIU can do alone: the NFS mounts are declared external on dump and, on resume,
mapped to the same shares mounted in the guest's root netns.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from spfs.criu.runner import CriuError, run_criu
from spfs.lab.ct.container import alive, release_veth, stop_processes
from spfs.lab.ct import nfs_helpers
from spfs.lab.ct.nfs_helpers import netns_id
from spfs.lab.ct.util import CtError, run
from spfs.lab.ct.spec import CtState
from spfs.lab.env import lab_env
from spfs.lab.paths import GUEST_DIR
from spfs.standby import DEFAULT_SOCKET as DEFAULT_STANDBY_SOCKET

if TYPE_CHECKING:
    from spfs.timeline import Timeline

log = logging.getLogger(__name__)

CRIU = "criu"
LAB_ACTION_SCRIPT = GUEST_DIR / "criu-action.sh"


def action_scripts() -> list[str]:
    """criu-spfs's script (network lock) and the lab's (veth, test probe)."""
    from spfs.criu.dump import ACTION_SCRIPT
    return ["--action-script", str(ACTION_SCRIPT), "--action-script", str(LAB_ACTION_SCRIPT)]
DUMP_TIMEOUT = 300.0
RESTORE_TIMEOUT = 300.0


@dataclass
class Timing:
    seconds: float
    log_path: Path


def nfs_key(i: int) -> str:
    return f"nfs{i}"


def bind_key(i: int) -> str:
    return f"bind{i}"


def _criu_env(state: CtState, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(SPFS_LAB_CT_HOST_VETH=state.host_veth, SPFS_LAB_CT_HOST_ADDR=state.host_addr)
    env.update(extra or {})
    return env


def _criu(argv: list[str], env: dict[str, str], timeout: float, log_path: Path) -> float:
    try:
        return run_criu(argv, log_path, timeout, env)
    except CriuError as e:
        raise CtError(str(e)) from None


def dump_argv(state: CtState, images: Path) -> list[str]:
    argv = [CRIU, "dump", "-t", str(state.init_pid), "-D", str(images), "-o", "dump.log",
            "-v4", "--file-locks", "--link-remap", "--manage-cgroups",
            "--freeze-cgroup", str(state.cgroup_dir())] + action_scripts()
    for i, m in enumerate(state.nfs):
        argv += ["--external", f"mnt[{m.mountpoint}]:{nfs_key(i)}"]
    return argv + guest_bind_externals(state, True)


def guest_bind_externals(state: CtState, dump: bool) -> list[str]:
    """A bind of the container's own mounts (ct:SRC) is restored by CRIU as a bind of the
    restored mount; only guest paths are external."""
    argv = []
    for i, b in enumerate(state.binds):
        if not b.inside:
            spec = f"mnt[{b.target}]:{bind_key(i)}" if dump else f"mnt[{bind_key(i)}]:{b.source}"
            argv += ["--external", spec]
    return argv


def criu_spfs_dump_extra(state: CtState) -> list[str]:
    """What the lab adds to `criu-spfs dump` (which declares the NFS mounts itself)."""
    return ["--manage-cgroups", "--freeze-cgroup", str(state.cgroup_dir()),
            "--action-script", str(LAB_ACTION_SCRIPT), *guest_bind_externals(state, True)]


def criu_spfs_restore_extra(state: CtState, images: Path) -> list[str]:
    return ["--root", str(state.root), "--manage-cgroups",
            "--external", f"veth[{state.ct_veth}]:{state.host_veth}",
            "--action-script", str(LAB_ACTION_SCRIPT),
            "-d", "--pidfile", str(images / "restore.pid"), *guest_bind_externals(state, False)]


def _dump(state: CtState, images: Path, plain: bool, probe: dict[str, str] | None) -> float:
    env = _criu_env(state, probe)
    if plain:
        return _criu(dump_argv(state, images), env, DUMP_TIMEOUT, images / "dump.log")
    from spfs.criu.dump import DumpError, dump
    try:
        return dump(state.init_pid, images, criu=CRIU, extra=criu_spfs_dump_extra(state),
                    timeout=DUMP_TIMEOUT, env=env).seconds
    except DumpError as e:
        raise CtError(str(e)) from None


def suspend(state: CtState, images: str | Path, plain: bool = False,
            probe: dict[str, str] | None = None) -> Timing:
    if not alive(state):
        raise CtError(f"container {state.name} is not running")
    images = Path(images)
    images.mkdir(parents=True, exist_ok=True)
    seconds = _dump(state, images, plain, probe)
    # CRIU killed the tasks; wait until the namespaces are really gone before anything reuses
    # the veth name or the cgroup.
    stop_processes(state)
    release_veth(state)
    state.init_pid = 0
    state.unshare_pid = 0
    state.save()
    log.info("suspended %s in %.2f s", state.name, seconds)
    return Timing(seconds, images / "dump.log")


def _ext_dir(state: CtState, i: int) -> Path:
    return state.state_dir / "ext" / nfs_key(i)


def mount_shares_in_root_netns(state: CtState) -> list[Path]:
    server = lab_env()["SPFS_LAB_NFS_SERVER"]
    dirs = []
    for i, m in enumerate(state.nfs):
        d = _ext_dir(state, i)
        d.mkdir(parents=True, exist_ok=True)
        if not os.path.ismount(d):
            run(["mount", "-t", "nfs", "-o", m.mount_options(server), m.source(server), str(d)],
                timeout=60)
        dirs.append(d)
    return dirs


def restore_argv(state: CtState, images: Path, nfs_dirs: list[Path]) -> list[str]:
    argv = [CRIU, "restore", "-D", str(images), "-o", "restore.log", "-v4",
            "--root", str(state.root), "--file-locks", "--manage-cgroups",
            "--external", f"veth[{state.ct_veth}]:{state.host_veth}",
            *action_scripts(),
            "-d", "--pidfile", str(images / "restore.pid")]
    for i, d in enumerate(nfs_dirs):
        argv += ["--external", f"mnt[{nfs_key(i)}]:{d}"]
    return argv + guest_bind_externals(state, False)


def _resume_spfs(state: CtState, images: Path, wait: bool,
                 timeline: "Timeline | None", standby: str | None,
                 manager_command: list[str] | None) -> float:
    from spfs.criu.restore import RestoreConfig, RestoreError, restore
    # NFS is mounted again inside the container's netns: NFSv3 locks need its helpers
    helpers = {"SPFS_LAB_NFS_HELPERS": "1" if nfs_helpers.needed(state) else "0",
               "SPFS_LAB_PYTHON": sys.executable}
    config = RestoreConfig(images, criu=CRIU, extra=criu_spfs_restore_extra(state, images),
                           wait=wait, freeze_cgroup=str(state.cgroup_dir()),
                           env=_criu_env(state, helpers), verbose=True, standby=standby,
                           manager_command=manager_command)
    t0 = time.monotonic()
    try:
        restore(config, timeline)
    except RestoreError as e:
        raise CtError(str(e)) from None
    return time.monotonic() - t0


def resume(state: CtState, images: str | Path, plain: bool = False, wait: bool = True,
           timeline: "Timeline | None" = None,
           standby: str | None = DEFAULT_STANDBY_SOCKET,
           manager_command: list[str] | None = None) -> Timing:
    """criu-spfs restore (`wait`: until the shares are real NFS again and spfs and the
    manager exited; `standby`: spfs-standby's socket, used if one answers there), or the
    plain baseline."""
    if alive(state):
        raise CtError(f"container {state.name} is running")
    images = Path(images)
    (images / "restore.pid").unlink(missing_ok=True)
    if not plain:
        seconds = _resume_spfs(state, images, wait, timeline, standby, manager_command)
        return _resumed(state, images, seconds)
    nfs_dirs = mount_shares_in_root_netns(state)
    try:
        seconds = _criu(restore_argv(state, images, nfs_dirs), _criu_env(state),
                        RESTORE_TIMEOUT, images / "restore.log")
    finally:
        # The restored container holds its own bind of each share; the guest-side mounts
        # were only the source of those binds.
        for d in nfs_dirs:
            subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)
    return _resumed(state, images, seconds)


def _resumed(state: CtState, images: Path, seconds: float) -> Timing:
    state.init_pid = int((images / "restore.pid").read_text())
    state.netns = netns_id(state.init_pid) or ""
    state.save()
    log.info("resumed %s in %.2f s (init pid %d)", state.name, seconds, state.init_pid)
    return Timing(seconds, images / "restore.log")
