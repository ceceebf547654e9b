"""Control sockets of spfs and spfs-manager: take over a socket file left by a killed daemon,
never a live one's."""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat

log = logging.getLogger(__name__)


def remove_stale_socket(path: str, in_use: str) -> None:
    """Unlink `path` if it is a socket nobody listens on; OSError(EADDRINUSE, in_use) if a
    daemon answers, OSError(EEXIST) if it is not a socket at all."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.warning("removing stale control socket %s", path)
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, in_use)
