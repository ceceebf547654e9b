"""A stand-in for issue 3's `spfs` daemon, used until that daemon can be started here.

It honours the command line the manager uses (MOUNTPOINT --mode M --socket-path S --ready-fd N
--log F --foreground [-v] [--proxy-dir D] [--proxy-mntns-pid P]), mounts a *tmpfs* at
MOUNTPOINT instead of a FUSE filesystem, answers set_mode requests (spfs.fs.protocol) on its
control socket and appends every mode it is switched to to MODES_FILE (the socket path +
".modes").  It
does not block or proxy anything: the tests using it check the manager's side only.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import sys


def mirror_tree(source: str, target: str) -> None:
    """The real fs of the lab already holds the files SPFS stands in for; here the real fs is
    an empty tmpfs, so copy them over (which also proves the proxy path is reachable)."""
    for dirpath, dirnames, filenames in os.walk(source):
        rel_dir = os.path.relpath(dirpath, source)
        for name in dirnames:
            os.makedirs(os.path.join(target, rel_dir, name), exist_ok=True)
        for name in filenames:
            shutil.copy2(os.path.join(dirpath, name), os.path.join(target, rel_dir, name))
    with open(os.path.join(target, "proxied-by-standin"), "w") as f:
        f.write(str(os.getpid()))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint")
    parser.add_argument("--mode", required=True)
    parser.add_argument("--socket-path", required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--foreground", action="store_true")
    parser.add_argument("-v", action="count", default=0)
    parser.add_argument("--proxy-dir")
    parser.add_argument("--proxy-mntns-pid")
    args = parser.parse_args()
    if os.environ.get("STANDIN_FAIL_START"):
        return 3
    st = os.stat(args.mountpoint)
    opts = f"size=4m,mode={st.st_mode & 0o7777:o},uid={st.st_uid},gid={st.st_gid}"
    if os.spawnvp(os.P_WAIT, "mount", ["mount", "-t", "tmpfs", "-o", opts, "spfs-standin",
                                       args.mountpoint]) != 0:
        return 4
    # the manager moves the mount into the container: keep our own handle on its root
    root_fd = os.open(args.mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    modes_file = args.socket_path + ".modes"
    with open(modes_file, "a") as f:
        f.write(args.mode + "\n")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind(args.socket_path)
    sock.listen(8)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    os.close(args.ready_fd)
    while True:
        conn, _ = sock.accept()
        with conn:
            request = json.loads(conn.recv(65536))
            assert request["op"] == "set_mode", request
            fail = os.environ.get("STANDIN_FAIL_MODE") == request.get("mode")
            if not fail:
                with open(modes_file, "a") as f:
                    f.write(f"{request['mode']} {request.get('proxy_dir') or ''}\n")
                if request.get("proxy_dir"):
                    mirror_tree(f"/proc/self/fd/{root_fd}", request["proxy_dir"])
            reply = {"code": 5, "error": "EIO", "message": "refused", "result": None} if fail \
                else {"code": 0, "error": "", "message": "ok", "result": {}}
            conn.send(json.dumps(reply).encode())


if __name__ == "__main__":
    sys.exit(main())
