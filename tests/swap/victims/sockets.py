"""Swap-test victim with unix sockets bound on a mount.

usage: python sockets.py DIR CTRL
Listens on DIR/srv.sock (answers each connection's line with "ok:<line>") unless
CTRL/hold exists; has a datagram socket bound at DIR/dgram.sock that it reads only once
CTRL/drain exists (and then also what is still queued when it stops).  Writes
CTRL/ready.PID when set up, CTRL/holding once it has stopped accepting for CTRL/hold, and
CTRL/report.PID (JSON) when CTRL/stop appears.
"""

import json
import os
import select
import socket
import sys

directory, ctrl = sys.argv[1:3]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(os.path.join(directory, "srv.sock"))
listener.listen(16)
dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
dgram.bind(os.path.join(directory, "dgram.sock"))
open(os.path.join(ctrl, f"ready.{os.getpid()}"), "w").close()
served, datagrams = 0, []
holding = os.path.join(ctrl, "holding")
while not os.path.exists(os.path.join(ctrl, "stop")):
    hold = os.path.exists(os.path.join(ctrl, "hold"))
    if hold and not os.path.exists(holding):
        open(holding, "w").close()
    watch = [] if hold else [listener]
    if os.path.exists(os.path.join(ctrl, "drain")):
        watch.append(dgram)
    ready, _, _ = select.select(watch, [], [], 0.01)
    if listener in ready:
        conn, _ = listener.accept()
        with conn:
            line = conn.recv(100)
            conn.sendall(b"ok:" + line)
            served += 1
    if dgram in ready:
        datagrams.append(dgram.recv(100).decode())
if os.path.exists(os.path.join(ctrl, "drain")):
    dgram.setblocking(False)
    while True:
        try:
            datagrams.append(dgram.recv(100).decode())
        except BlockingIOError:
            break
with open(os.path.join(ctrl, f"report.{os.getpid()}"), "w") as f:
    json.dump({"served": served, "datagrams": datagrams,
               "listener": os.readlink(f"/proc/self/fd/{listener.fileno()}")}, f)
