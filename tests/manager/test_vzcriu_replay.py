"""Replays, byte for byte, what the OpenVZ CRIU fork (criu/spfs.c) sends to spfs-manager on
restore, against a manager started the way vzcriu starts it, and checks the documented int
replies; then checks that status tells the real outcome, which the early 0 of `replace`
cannot (reference-c-spfs.md §1.3, §2.2)."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from manager_helpers import STANDIN_SPFS, wait_for
from spfs.manager.client_cmd import send_request
from spfs.sys.mountinfo import top_mount_at
from spfs.manager.protocol import decode_text_reply

NFS_OPTIONS = b"rw,vers=4.1,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600," \
              b"retrans=2,sec=sys,clientaddr=10.200.0.2,local_lock=none,addr=10.200.0.1"


def vzcriu_send(sock: socket.socket, packet: bytes) -> int:
    """spfs_send_request(): send with MSG_EOR, read one int."""
    sock.sendmsg([packet], [], socket.MSG_EOR)
    return decode_text_reply(sock.recv(4))


REAL_SPFS = f"{sys.executable} -m spfs.fs.cli"


@pytest.fixture(params=["standin", "real"])
def vz_manager(request, tmp_path):
    """start_spfs_manager(): `spfs-manager -vvvv -d --socket-path S --work-dir W
    --exit-with-spfs`, with issue 3's spfs or the stand-in."""
    spfs_command = REAL_SPFS if request.param == "real" else STANDIN_SPFS
    work = tmp_path / "run" / "spfs-manager" / "4242"
    sock_path = work / "control.sock"
    rc = subprocess.run([sys.executable, "-m", "spfs.manager.cli", "-vvvv", "-d",
                         "--socket-path", str(sock_path), "--work-dir", str(work),
                         "--exit-with-spfs", "--mount-deadline", "1",
                         "--spfs-command", spfs_command], timeout=30).returncode
    assert rc == 0
    pid = int((work / "spfs-manager.pid").read_text())
    try:
        yield str(sock_path), pid, work
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                 open(f"/proc/{pid}/stat").read().split()[2] == "Z", 15, "manager exit")


@pytest.mark.parametrize("criu", ["3.15", "3.18"])
def test_restore_sequence(vz_manager, container, cgroup_v1, criu):
    sock_path, manager_pid, work = vz_manager
    mountpoint = container.base / "mnt" / "nfs"
    bind = container.base / "srv"
    mountpoint.mkdir(parents=True)
    bind.mkdir()
    mnt_id, root_pid = 59, container.pid
    freeze_cgroup = str(cgroup_v1.path)
    source = "source=10.200.0.1:/share;type=nfs4;flags=0"
    if criu == "3.15":  # the request the reference quotes (ns_mountpoint, trailing ';')
        mount = f"mount;id={mnt_id};mode=restore;mountpoint={mountpoint};" \
                f"ns_mountpoint={mountpoint};ns_pid={root_pid}"
        replace = f"replace;id={mnt_id};{source};freeze_cgroup={freeze_cgroup};" \
                  f"bindmounts={bind},;"
    else:  # v3.18 spfs_request_mount(): root=, bindmounts before freeze_cgroup, and the last
        # ';' overwritten by the NUL that separates the mount data
        mount = f"mount;id={mnt_id};mode=restore;mountpoint={mountpoint};" \
                f"ns_pid={root_pid};root=/"
        replace = f"replace;id={mnt_id};{source};bindmounts={bind},;" \
                  f"freeze_cgroup={freeze_cgroup}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(30)
        sock.connect(sock_path)
        assert vzcriu_send(sock, mount.encode() + b"\0") == 0
        container.run("mount", "--bind", str(mountpoint), str(bind))  # CRIU restores the bind
        replace = replace.encode()
        assert vzcriu_send(sock, replace + b"\0" + NFS_OPTIONS + b"\0") == 0
        # after post-restore: spfs_set_mode(sock, "stub"); after post-resume: release
        assert vzcriu_send(sock, b"mode;all;mode=stub\0") == 0
        assert vzcriu_send(sock, b"replace;all;mode=release\0") == 0

    # the replies said 0 before anything happened; status says what really happened:
    # no NFS on this host, so the mount inside the container's namespaces fails with ENODEV
    # and SPFS stays where it was, in stub mode, nothing frozen
    def replace_state() -> dict:
        packet = send_request(sock_path, b'{"cmd": "status", "id": "59"}')
        return json.loads(packet)["data"]["mounts"][0]

    wait_for(lambda: (replace_state()["replace"] or {}).get("phase") == "failed", 15,
             "replace outcome")
    state = replace_state()
    assert state["mode"] == "stub" and state["replace"]["failed_in"] == "mounting_target"
    assert state["replace"]["error_code"] == errno.ENODEV
    assert state["bindmounts"] == [str(bind)]
    assert decode_text_reply(send_request(sock_path, b"status;id=59\0")) == -errno.ENODEV
    assert top_mount_at(container.mounts(), str(mountpoint)).source in ("spfs-standin", "spfs")
    assert not cgroup_v1.frozen()

    # --exit-with-spfs: once its SPFS is gone, the manager exits and removes its socket
    os.kill(state["spfs_pid"], signal.SIGKILL)
    wait_for(lambda: not os.path.exists(sock_path), 15, "manager exit")
