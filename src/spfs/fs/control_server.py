"""The control socket: AF_UNIX SOCK_SEQPACKET, root callers only (SO_PEERCRED).

Served on the trio loop, which never waits for the proxy target itself (workers.py), so
status answers while the target hangs. Commands that change something take the
controller's lock (controller.py). A malformed request gets an error reply and changes
nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import struct
from typing import Any

import trio

from spfs.control_socket import remove_stale_socket
from spfs.fs import protocol
from spfs.fs.controller import FsController
from spfs.fs.manifest import ManifestError
from spfs.fs.modes import ModeError, parse_mode
from spfs.sys.private_dir import bind_private, ensure_private_dir

log = logging.getLogger(__name__)

_REQUEST_KEYS = {
    "set_mode": {"op", "mode", "proxy_dir", "ns_pid"},
    "status": {"op"},
    "add_manifest_entries": {"op", "entries", "manifest_file"},
    "invalidate": {"op", "paths", "entries"},
}


class ControlSocketError(OSError):
    pass


def bind_control_socket(path: str) -> socket.socket:
    """Bind *path*, replacing a stale socket file but never a live daemon's, in a private
    directory of the host (spfs.sys.private_dir: created 0700, or refused)."""
    try:
        ensure_private_dir(os.path.dirname(os.path.abspath(path)))
        remove_stale_socket(path, f"{path} is in use by a running daemon")
    except OSError as exc:
        raise ControlSocketError(exc.errno or errno.EIO, exc.strerror) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        bind_private(sock, path)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise ControlSocketError(exc.errno or errno.EIO,
                                 f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _optional(request: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = request.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise protocol.ProtocolError(errno.EINVAL, f"{key} must be {what}")
    return value


class ControlServer:
    def __init__(self, sock: socket.socket, path: str, controller: FsController) -> None:
        self._stdlib_sock = sock
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.path = path
        self.controller = controller

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = await self.sock.accept()
                except OSError as exc:  # e.g. EMFILE: the filesystem must keep running
                    log.error("control socket accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self._serve_connection, conn)

    async def _serve_connection(self, conn: trio.socket.SocketType) -> None:
        with conn:
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            while True:
                try:
                    data = await conn.recv(protocol.MAX_MESSAGE_BYTES)
                except OSError:
                    return
                if not data:
                    return
                if uid != 0:
                    log.warning("control request from uid %d (pid %d) refused", uid, pid)
                    answer = protocol.error_reply(errno.EPERM, "only root may control spfs")
                else:
                    answer = await self.dispatch(data)
                try:
                    await conn.send(protocol.encode(answer))
                except OSError:
                    return

    async def dispatch(self, data: bytes) -> dict[str, Any]:
        try:
            request = protocol.decode_request(data)
            unknown = set(request) - _REQUEST_KEYS[request["op"]]
            if unknown:
                raise protocol.ProtocolError(errno.EINVAL, f"unknown keys {sorted(unknown)} "
                                                           f"for {request['op']}")
            return protocol.reply(await self._run(request))
        except protocol.ProtocolError as exc:
            return protocol.error_reply(exc.code, exc.message)
        except (ModeError, ManifestError) as exc:
            return protocol.error_reply(errno.EINVAL, str(exc))
        except OSError as exc:
            return protocol.error_reply(exc.errno or errno.EIO, exc.strerror or str(exc))
        except Exception as exc:  # a bug must not kill the daemon or leave the caller hanging
            log.exception("control request failed")
            return protocol.error_reply(errno.EIO, f"internal error: {exc!r}")

    async def _run(self, request: dict[str, Any]) -> Any:
        op = request["op"]
        ctl = self.controller
        if op == "status":
            return ctl.status()
        if op == "set_mode":
            mode = request.get("mode")
            if not isinstance(mode, str):
                raise protocol.ProtocolError(errno.EINVAL, "mode must be a string")
            proxy_dir = _optional(request, "proxy_dir", str, "a string")
            ns_pid = _optional(request, "ns_pid", int, "an integer")
            if ns_pid is not None and ns_pid <= 0:
                raise protocol.ProtocolError(errno.EINVAL, "ns_pid must be positive")
            record = await ctl.set_mode(parse_mode(mode), proxy_dir, ns_pid)
            return dataclasses.asdict(record)
        if op == "add_manifest_entries":
            manifest_file = _optional(request, "manifest_file", str, "a string")
            entries = request.get("entries")
            if (entries is None) == (manifest_file is None):
                raise protocol.ProtocolError(errno.EINVAL,
                                             "give exactly one of entries and manifest_file")
            return {"added": await ctl.add_manifest_entries(entries, manifest_file)}
        paths = request.get("paths")
        if paths is not None and (not isinstance(paths, list)
                                  or not all(isinstance(p, str) for p in paths)):
            raise protocol.ProtocolError(errno.EINVAL, "paths must be a list of strings")
        entries = request.get("entries", False)
        if not isinstance(entries, bool):
            raise protocol.ProtocolError(errno.EINVAL, "entries must be true or false")
        return await ctl.invalidate(paths, entries)

    def close(self) -> None:
        # Called after trio.run has returned, where the trio wrapper cannot be closed.
        self._stdlib_sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
