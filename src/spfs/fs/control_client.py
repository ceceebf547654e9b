"""Blocking client for the SPFS control socket (used by spfs-client and the manager).

    from spfs.fs import control_client
    control_client.set_mode("/run/spfs.sock", "proxy", proxy_dir="/mnt/nfs-real", ns_pid=4242)
    control_client.status("/run/spfs.sock")["parked"]

Every call returns the reply's "result" or raises ControlError (code/error/message from
the daemon, or a local connection problem).
"""

from __future__ import annotations

import errno
import json
import socket
from typing import Any, Iterable

from spfs.fs import protocol
from spfs.fs.manifest import ManifestEntry

DEFAULT_TIMEOUT_S = 60.0
# A SOCK_SEQPACKET message must fit the socket send buffer (about 208 KiB by default).
_MAX_CHUNK_BYTES = 128 * 1024


class ControlError(Exception):
    def __init__(self, code: int, error: str, message: str) -> None:
        super().__init__(f"{error or code}: {message}")
        self.code = code
        self.error = error
        self.message = message


def request(socket_path: str, payload: dict[str, Any], timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(socket_path)
            sock.send(protocol.encode(payload))
            data = sock.recv(protocol.MAX_MESSAGE_BYTES)
        except socket.timeout:
            raise ControlError(errno.ETIMEDOUT, "ETIMEDOUT",
                               f"no reply from {socket_path} within {timeout:.0f} s") from None
        except OSError as exc:
            raise ControlError(exc.errno or errno.EIO, errno.errorcode.get(exc.errno or 5, "EIO"),
                               f"{socket_path}: {exc.strerror}") from None
    finally:
        sock.close()
    if not data:
        raise ControlError(errno.ECONNRESET, "ECONNRESET", f"{socket_path} closed without reply")
    answer = json.loads(data)
    if answer.get("code", errno.EIO) != 0:
        raise ControlError(answer.get("code", errno.EIO), answer.get("error", ""),
                           answer.get("message", ""))
    return answer.get("result")


def set_mode(socket_path: str, mode: str, proxy_dir: str | None = None,
             ns_pid: int | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    payload: dict[str, Any] = {"op": "set_mode", "mode": mode}
    if proxy_dir is not None:
        payload["proxy_dir"] = proxy_dir
    if ns_pid is not None:
        payload["ns_pid"] = ns_pid
    return request(socket_path, payload, timeout)


def status(socket_path: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    return request(socket_path, {"op": "status"}, timeout)


def add_manifest_entries(socket_path: str,
                         entries: Iterable[ManifestEntry | dict[str, Any]] | None = None,
                         manifest_file: str | None = None,
                         timeout: float = DEFAULT_TIMEOUT_S) -> int:
    """Add entries to the restore tree. Inline entries go in messages of at most 128 KiB
    (each validated and applied all-or-nothing); a manifest_file (read by the daemon and
    validated as a whole) suits big sets."""
    if manifest_file is not None:
        return request(socket_path, {"op": "add_manifest_entries",
                                     "manifest_file": manifest_file}, timeout)["added"]
    raw = [e.to_json() if isinstance(e, ManifestEntry) else e for e in entries or []]
    added = 0
    for chunk in _chunks(raw):
        added += request(socket_path, {"op": "add_manifest_entries", "entries": chunk},
                         timeout)["added"]
    return added


def _chunks(raw: list[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    size = 0
    for entry in raw:
        length = len(json.dumps(entry)) + 2
        if chunk and size + length > _MAX_CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
        chunk.append(entry)
        size += length
    if chunk:
        yield chunk


def invalidate(socket_path: str, paths: list[str] | None = None, entries: bool = False,
               timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """Drop the kernel's cached attributes and pages of *paths* (all when None); with
    *entries* also their directory entries, which detaches mounts on or below them."""
    payload: dict[str, Any] = {"op": "invalidate", "entries": entries}
    if paths is not None:
        payload["paths"] = paths
    return request(socket_path, payload, timeout)
