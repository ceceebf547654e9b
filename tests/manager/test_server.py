"""The control socket of a live spfs-manager: credentials, both wire forms, bad input,
limits, and the daemon's lifecycle (stale socket, signals, --daemon)."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from manager_helpers import kill_and_reap, start_daemon, stop_daemon, wait_for
from spfs.manager.protocol import MAX_PACKET_BYTES, Reply, decode_text_reply
from spfs.manager.server import ControlServer, ServerLimits


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(10)
    sock.connect(path)
    return sock


def ask(sock: socket.socket, packet: bytes) -> bytes:
    sock.send(packet)
    return sock.recv(MAX_PACKET_BYTES)


def test_socket_is_root_only(daemon):
    assert os.stat(daemon.socket_path).st_mode & 0o777 == 0o600


def test_non_root_peer_is_refused_by_credentials(daemon):
    # get past the file modes (the child connects relative to its cwd, set before setuid):
    # SO_PEERCRED must still say no
    os.chmod(daemon.socket_path, 0o666)
    os.chmod(daemon.work_dir, 0o711)
    code = ("import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "s.settimeout(10); s.connect(sys.argv[1])\n"
            "s.send(b'mode;all;mode=stub\\0')\n"
            "r = s.recv(16)\n"
            "print(int.from_bytes(r, sys.byteorder, signed=True))\n"
            "print(len(s.recv(16)))\n")
    out = subprocess.run([sys.executable, "-c", code, os.path.basename(daemon.socket_path)],
                         cwd=daemon.work_dir, capture_output=True, text=True, timeout=20,
                         check=True).stdout.split()
    assert out == [str(-errno.EPERM), "0"]  # an EPERM reply, then the connection is closed
    assert "refusing a connection from uid 65534" in daemon.log()


def test_many_requests_on_one_connection_in_both_forms(daemon):
    with connect(daemon.socket_path) as sock:
        assert decode_text_reply(ask(sock, b"mode;all;mode=stub\0")) == 0
        reply = json.loads(ask(sock, b'{"cmd": "status"}'))
        assert reply == {"code": 0, "error": None, "message": "status", "data": {"mounts": []}}
        assert decode_text_reply(ask(sock, b"replace;all;mode=release\0")) == 0
        assert decode_text_reply(ask(sock, b"status")) == 0


@pytest.mark.parametrize("packet, code", [
    (b"nonsense", errno.EINVAL),
    (b"mount;id=1;mode=stub", errno.EINVAL),
    (b"mode;id=404;mode=stub", errno.ENOENT),
    (b"replace;id=404;source=s;type=tmpfs;flags=0;freeze_cgroup=/x", errno.ENOENT),
    (b"\0\0\0", errno.EINVAL),
    (b"\xff" * 100, errno.EINVAL),
])
def test_bad_text_requests_get_an_error_and_the_connection_stays(daemon, packet, code):
    with connect(daemon.socket_path) as sock:
        assert decode_text_reply(ask(sock, packet)) == -code
        assert decode_text_reply(ask(sock, b"status")) == 0


def test_bad_json_requests(daemon):
    with connect(daemon.socket_path) as sock:
        for packet in (b"{", b'{"cmd": "mount"}', b'{"cmd": "replace", "all": true}',
                       b'{"cmd": "status", "id": 5}'):
            reply = json.loads(ask(sock, packet))
            assert reply["code"] == errno.EINVAL and reply["message"] and reply["data"] is None
        assert json.loads(ask(sock, b'{"cmd": "status", "id": "nope"}'))["code"] == errno.ENOENT


def test_oversized_packet(daemon):
    with connect(daemon.socket_path) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        big = b"status;" + b"x" * (MAX_PACKET_BYTES + 100)
        assert decode_text_reply(ask(sock, big)) == -errno.EMSGSIZE
        assert json.loads(ask(sock, b'{"cmd": "status", "pad": "' + b"y" * MAX_PACKET_BYTES +
                              b'"}'))["code"] == errno.EMSGSIZE
        assert decode_text_reply(ask(sock, b"status")) == 0


def test_concurrent_clients(daemon):
    failures = []

    def client():
        try:
            with connect(daemon.socket_path) as sock:
                for _ in range(50):
                    if decode_text_reply(ask(sock, b"mode;all;mode=stub\0")) != 0:
                        failures.append("bad reply")
        except OSError as exc:
            failures.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures


def test_stale_socket_is_taken_over_and_a_live_one_is_not(tmp_path):
    first = start_daemon(tmp_path)
    try:
        os.kill(first.proc.pid, signal.SIGKILL)  # leaves its socket file behind
        first.proc.wait(10)
        assert os.path.exists(first.socket_path)
        second = start_daemon(tmp_path)
        try:
            assert second.text("status") == 0
            third = subprocess.run([sys.executable, "-m", "spfs.manager.cli", "--work-dir",
                                    str(second.work_dir), "--socket-path", second.socket_path],
                                   capture_output=True, text=True, timeout=20)
            assert third.returncode == 1 and "another manager" in third.stderr
            assert second.text("status") == 0
        finally:
            stop_daemon(second)
    finally:
        kill_and_reap(first.proc)


def test_sigterm_stops_the_daemon_and_removes_its_socket(tmp_path):
    d = start_daemon(tmp_path)
    try:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        assert not os.path.exists(d.socket_path)
    finally:
        kill_and_reap(d.proc)


def test_daemon_option_returns_once_the_socket_accepts(tmp_path):
    work = tmp_path / "wd"
    sock_path = str(work / "m.sock")
    rc = subprocess.run([sys.executable, "-m", "spfs.manager.cli", "-vvvv", "-d",
                         "--socket-path", sock_path, "--work-dir", str(work),
                         "--exit-with-spfs"], timeout=20).returncode
    assert rc == 0
    pid = int((work / "spfs-manager.pid").read_text())  # written before the command returns
    try:
        with connect(sock_path) as sock:  # connectable immediately, as vzcriu expects
            reply = json.loads(ask(sock, b'{"cmd": "status"}'))
            assert reply["code"] == 0
        assert os.getsid(pid) == pid  # detached into its own session
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not os.path.exists(sock_path), what="daemon exit")


def test_idle_and_lifetime_limits_close_connections(tmp_path):
    path = str(tmp_path / "s.sock")
    server = ControlServer(path, lambda req: Reply(),
                           ServerLimits(idle_timeout=0.3, connection_lifetime=1.0))
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,))
    thread.start()
    try:
        with connect(path) as idle:
            started = time.monotonic()
            assert idle.recv(16) == b""  # closed by the server, not by us
            assert 0.2 < time.monotonic() - started < 3
        with connect(path) as busy:
            started = time.monotonic()
            with pytest.raises((BrokenPipeError, ConnectionResetError, AssertionError)):
                while time.monotonic() - started < 5:
                    assert decode_text_reply(ask(busy, b"status")) == 0
                    time.sleep(0.1)
            assert time.monotonic() - started < 3
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_handler_bug_costs_one_request_only(tmp_path):
    path = str(tmp_path / "s.sock")
    calls = []

    def handler(req):
        calls.append(req)
        if len(calls) == 1:
            raise KeyError("bug")
        return Reply()

    server = ControlServer(path, handler)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve, args=(stop,))
    thread.start()
    try:
        with connect(path) as sock:
            assert json.loads(ask(sock, b'{"cmd": "status"}'))["code"] == errno.EIO
            assert decode_text_reply(ask(sock, b"status")) == 0
    finally:
        stop.set()
        thread.join(5)
        server.close()


def test_a_connection_closed_without_a_reply_is_an_error_not_an_empty_reply(tmp_path) -> None:
    # a manager that stops (its last SPFS gone) between accepting a client and answering
    # it: criu-spfs's follower must see a connection error and read the final status the
    # manager left, not fail on an empty JSON reply
    from spfs.criu.manager_link import ManagerLink
    from spfs.manager.client_cmd import send_request
    link = ManagerLink(tmp_path, tmp_path)
    path = link.socket_path
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(4)

    def accept_and_close(n: int) -> None:
        for _ in range(n):
            conn, _ = listener.accept()
            conn.recv(MAX_PACKET_BYTES)
            conn.close()

    closer = threading.Thread(target=accept_and_close, args=(2,), daemon=True)
    closer.start()
    try:
        with pytest.raises(ConnectionResetError, match="without a reply"):
            send_request(path, b'{"cmd": "status"}', 10)
        with pytest.raises(ConnectionResetError):
            link.status()
    finally:
        closer.join(10)
        listener.close()
