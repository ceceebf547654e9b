"""The network-lock deadlock (lab-notes G1, issue 2 item 7): CRIU locks the container's
network before it stats NFS files; with the NFS client inside the container netns that hangs
CRIU unkillably. Our network-lock action marks exactly the container's NFS traffic with
CRIU's SOCCR_MARK: with the lock in place a plain TCP connection from the container is
blocked while NFS I/O from the container proceeds."""

import socket
import threading

import pytest

from spfs.lab.ct import checkpoint, workload
from spfs.lab.ct.spec import CtState


class Listener:
    """A TCP server in the guest's root netns on the container's veth address."""

    def __init__(self, addr: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((addr, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("vers", ["4.1", "3"])
def test_dump_with_dirty_nfs_pages_and_locked_network(make_ct, tmp_path, vers: str) -> None:
    ct = make_ct(nfs=[f"{vers}:a:/mnt/nfs"], binds=["/usr:/usr:ro"])
    listener = Listener(ct.host_addr)
    try:
        # reachable before the dump: the block seen later is the lock, not the setup
        pre = workload.exec_in(ct.name, ["python3", "-c", (
            "import socket; socket.create_connection(('%s', %d), 5).close()"
            % (ct.host_addr, listener.port))], capture=True, timeout=60)
        assert pre.returncode == 0, pre.stderr
        accepted_before = listener.accepted
        # a writer keeps dirty pages on NFS, which dump must flush through the lock
        writer = workload.start(ct.name, "append", "/mnt/nfs/dirty.log")
        workload.wait_running([writer])
        probe = tmp_path / "probe"
        checkpoint.suspend(ct, tmp_path / "img", plain=True, probe={
            "SPFS_LAB_NETLOCK_PROBE": str(probe),
            "SPFS_LAB_NETLOCK_PROBE_PORT": str(listener.port),
            "SPFS_LAB_NETLOCK_PROBE_FILE": "/mnt/nfs/probe.bin",
        })
        results = dict(line.split("=") for line in probe.read_text().split())
        assert results == {"tcp": "blocked", "nfs": "ok"}
        assert listener.accepted == accepted_before
        checkpoint.resume(CtState.load(ct.name), tmp_path / "img", plain=True)
        assert writer.stop().startswith("PASS")
    finally:
        listener.close()
