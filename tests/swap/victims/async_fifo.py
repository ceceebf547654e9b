"""Swap-test victim: an O_ASYNC FIFO reader (F_SETOWN self, F_SETSIG SIGUSR2) and an O_PATH fd.

usage: python async_fifo.py DIR CTRL
Counts SIGUSR2 (one per write into DIR/afifo) and reads what arrives; on CTRL/stop writes
CTRL/report.PID (JSON) with the count, the bytes read and the flags of its fds then.
"""

import fcntl
import json
import os
import signal
import sys
import time

directory, ctrl = sys.argv[1:3]
F_SETSIG, F_GETSIG = 10, 11
got = {"signals": 0}
signal.signal(signal.SIGUSR2, lambda *_: got.__setitem__("signals", got["signals"] + 1))
fifo = os.open(os.path.join(directory, "afifo"), os.O_RDWR | os.O_NONBLOCK)
fcntl.fcntl(fifo, fcntl.F_SETOWN, os.getpid())
fcntl.fcntl(fifo, F_SETSIG, signal.SIGUSR2)
fcntl.fcntl(fifo, fcntl.F_SETFL, fcntl.fcntl(fifo, fcntl.F_GETFL) | os.O_ASYNC)
opath = os.open(os.path.join(directory, "x.txt"), os.O_PATH)
open(os.path.join(ctrl, f"ready.{os.getpid()}"), "w").close()
data = b""
while not os.path.exists(os.path.join(ctrl, "stop")):
    time.sleep(0.01)
    try:
        data += os.read(fifo, 100)
    except BlockingIOError:
        pass
with open(os.path.join(ctrl, f"report.{os.getpid()}"), "w") as f:
    json.dump({"signals": got["signals"], "data": data.decode(),
               "async": bool(fcntl.fcntl(fifo, fcntl.F_GETFL) & os.O_ASYNC),
               "owner": fcntl.fcntl(fifo, fcntl.F_GETOWN), "sig": fcntl.fcntl(fifo, F_GETSIG),
               "opath": bool(fcntl.fcntl(opath, fcntl.F_GETFL) & os.O_PATH),
               "opath_target": os.readlink(f"/proc/self/fd/{opath}")}, f)
