"""10,000+ random and mutated requests to a live daemon: it never crashes or hangs, and every
reply is well formed (an error, or a valid answer)."""

import json
import os
import random
import socket
import subprocess
import sys
import time

from manager_helpers import kill_and_reap, wait_for, _accepts
from spfs.manager.protocol import MAX_PACKET_BYTES, is_json

REQUESTS = 12_000
SEEDS_TEXT = [
    b"mount;id=87;mode=restore;mountpoint=/run/criu/spfs-87;ns_mountpoint=/mnt/nfs;"
    b"ns_pid=999999\0",
    b"mount;id=3;mode=stub;mountpoint=/nonexistent/x;ns_pid=999998;root=/nonexistent\0",
    b"mount;id=4;mode=proxy;proxy_dir=/nonexistent;mountpoint=/nonexistent/y\0",
    b"replace;id=87;source=10.200.0.1:/share;type=nfs4;flags=3072;bindmounts=/a,/b,;"
    b"freeze_cgroup=/sys/fs/cgroup/freezer/nonexistent\0vers=4.1,addr=10.200.0.1\0",
    b"replace;all;mode=release\0",
    b"replace;all;mode=hold\0",
    b"mode;all;mode=stub\0",
    b"mode;id=87;mode=proxy;proxy_dir=/nonexistent;ns_pid=999999\0",
    b"switch;source=/nonexistent/a;target=/nonexistent/b;"
    b"freeze_cgroup=/sys/fs/cgroup/freezer/nonexistent;ns_pid=999999",
    b"switch;device=2049;target=/nonexistent/b;freeze_cgroup=/nonexistent",
    b"status;id=87",
    b"status",
]
SEEDS_JSON = [
    {"cmd": "mount", "id": "5", "mode": "stub", "mountpoint": "/nonexistent/z",
     "ns_pid": 999997},
    {"cmd": "replace", "id": "5", "source": "x:/y", "type": "nfs", "flags": 0,
     "bindmounts": ["/nonexistent/q"], "freeze_cgroup": "/nonexistent", "data": "vers=3"},
    {"cmd": "replace", "all": True, "mode": "release"},
    {"cmd": "mode", "all": True, "mode": "stub"},
    {"cmd": "switch", "source": "/nonexistent/a", "target": "/nonexistent/b",
     "freeze_cgroup": "/nonexistent"},
    {"cmd": "status"},
]
TOKENS = [b";", b"=", b"\0", b",", b"/", b"all", b"id=", b"mode=", b"..", b"\xff", b"{",
          b"}", b"\"", b"%s", b"\n", b"-1", b"99999999999999999999999"]


def mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(data))
        if op == 0 and data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[pos:pos] = rng.choice(TOKENS)
        elif op == 2:
            del data[pos:pos + rng.randint(1, 8)]
        elif op == 3:
            data = data[:pos]
        elif op == 4:
            chunk = data[pos:pos + rng.randint(1, 30)]
            data[pos:pos] = chunk * rng.randint(1, 4)
        else:
            data[pos:pos] = rng.randbytes(rng.randint(1, 20))
    return bytes(data)


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.randint(-2**70, 2**70)
    if kind == 2:
        return rng.choice(["stub", "proxy", "restore", "all", "/", "", "x" * 300, "\u0000"])
    if kind == 3:
        return rng.random()
    if kind == 4:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["cmd", "id", "mode", "mountpoint", "all", "flags", "data", "bindmounts", "x"]
    doc = {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 6))}
    if rng.random() < 0.7:
        doc["cmd"] = rng.choice(["mount", "mode", "replace", "switch", "status", "nope"])
    return doc


def generate(rng: random.Random) -> bytes:
    choice = rng.random()
    if choice < 0.45:
        return mutate(rng, rng.choice(SEEDS_TEXT))
    if choice < 0.7:
        return mutate(rng, json.dumps(rng.choice(SEEDS_JSON)).encode())
    if choice < 0.85:
        return json.dumps(random_json(rng)).encode()
    if choice < 0.95:
        return rng.randbytes(rng.randint(1, 300))
    return rng.choice(SEEDS_TEXT + [json.dumps(s).encode() for s in SEEDS_JSON])


def check_reply(packet: bytes, reply: bytes) -> None:
    if is_json(packet):
        body = json.loads(reply)
        assert set(body) == {"code", "error", "message", "data"}, body
        assert isinstance(body["code"], int) and body["code"] >= 0
        assert isinstance(body["message"], str)
        assert body["data"] is None or isinstance(body["data"], dict)
        assert (body["error"] is None) == (body["code"] == 0)
    else:
        assert len(reply) == 4, reply
        assert int.from_bytes(reply, sys.byteorder, signed=True) <= 0


def test_fuzz_live_daemon(tmp_path):
    rng = random.Random(int(os.environ.get("SPFS_FUZZ_SEED", "20261125")))
    work = tmp_path / "wd"
    sock_path = str(work / "fuzz.sock")
    # In a private mount namespace, with an spfs that cannot start: a mutated request that
    # happens to be valid can change nothing outside this test.
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "--",
                             sys.executable, "-m", "spfs.manager.cli", "--work-dir",
                             str(work), "--socket-path", sock_path, "--spfs-command",
                             "/bin/false"])
    try:
        wait_for(lambda: _accepts(sock_path), what="manager socket")
        started = time.monotonic()
        sock = None
        kinds = {"json": 0, "text": 0, "ok": 0}
        for i in range(REQUESTS):
            if sock is None or rng.random() < 0.02:  # sometimes a fresh connection
                if sock is not None:
                    sock.close()
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                sock.settimeout(10)  # a hang fails the test instead of blocking it
                sock.connect(sock_path)
            packet = generate(rng)
            if not packet:  # an empty packet reads as end of connection, as in C
                continue
            sock.send(packet)
            reply = sock.recv(MAX_PACKET_BYTES)
            check_reply(packet, reply)
            kinds["json" if is_json(packet) else "text"] += 1
            kinds["ok"] += reply in (b"\0\0\0\0",) or b'"code": 0,' in reply
        sock.close()
        elapsed = time.monotonic() - started
        assert proc.poll() is None, "the daemon died"
        assert kinds["json"] > 2000 and kinds["text"] > 2000 and kinds["ok"] > 100, kinds
        print(f"{REQUESTS} requests in {elapsed:.1f} s: {kinds}")
        # nothing changed: no SPFS was created by any of them
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as check:
            check.settimeout(10)
            check.connect(sock_path)
            check.send(b'{"cmd": "status"}')
            assert json.loads(check.recv(MAX_PACKET_BYTES))["data"] == {"mounts": []}
    finally:
        kill_and_reap(proc)
