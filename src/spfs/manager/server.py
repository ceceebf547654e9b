"""The control socket: AF_UNIX SOCK_SEQPACKET, root peers only, one request per packet.

Each accepted connection gets a thread that serves packets until the peer closes, stays idle
too long, or the connection's lifetime runs out.  Every packet gets exactly one reply, in the
wire form it came in; nothing a peer sends can stop the server (errors become replies).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable

from spfs.control_socket import remove_stale_socket
from spfs.sys.private_dir import bind_private, ensure_private_dir
from spfs.manager.protocol import (MAX_PACKET_BYTES, Reply, RequestError, Request, encode_reply,
                                   form_of, parse_packet)

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class ServerLimits:
    idle_timeout: float = 30.0  # no packet for this long: close
    connection_lifetime: float = 900.0  # total, however busy
    max_connections: int = 32


def peer_uid(sock: socket.socket) -> int:
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                              _UCRED.size))
    return uid


class ControlServer:
    def __init__(self, path: str, handle: Callable[[Request], Reply],
                 limits: ServerLimits = ServerLimits()) -> None:
        self.path = path
        self.handle = handle
        self.limits = limits
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        # root-only, on the host, before anything in it is touched (spfs.sys.private_dir)
        ensure_private_dir(os.path.dirname(os.path.abspath(path)))
        remove_stale_socket(path, f"another manager is listening on {path}")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        bind_private(self.sock, path)
        self.sock.listen(64)
        self.sock.settimeout(0.2)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def serve(self, stop: threading.Event, tick: Callable[[], None] = lambda: None) -> None:
        """Accept connections until `stop` is set; `tick` runs about every 0.2 s."""
        log.info("serving on %s", self.path)
        while not stop.is_set():
            tick()
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                log.error("accept failed: %s", exc)
                time.sleep(0.05)
                continue
            self._start_connection(conn)

    def _start_connection(self, conn: socket.socket) -> None:
        with self._threads_lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            busy = len(self._threads) >= self.limits.max_connections
        if busy:
            self._refuse(conn, errno.EBUSY, "too many connections")
            return
        thread = threading.Thread(target=self._serve_connection, args=(conn,),
                                  name="control-conn", daemon=True)
        with self._threads_lock:
            self._threads.add(thread)
        thread.start()

    def _refuse(self, conn: socket.socket, code: int, message: str) -> None:
        """Answer the first packet with an error (its form is not known before), then close."""
        try:
            conn.settimeout(1.0)
            packet = conn.recv(MAX_PACKET_BYTES)
            if packet:
                conn.send(encode_reply(form_of(packet), Reply.error(code, message)))
        except OSError:
            pass
        finally:
            conn.close()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            uid = peer_uid(conn)
        except OSError as exc:
            log.warning("no peer credentials: %s", exc)
            conn.close()
            return
        if uid != 0:
            log.warning("refusing a connection from uid %d", uid)
            self._refuse(conn, errno.EPERM, "only root may talk to spfs-manager")
            return
        ends = time.monotonic() + self.limits.connection_lifetime
        try:
            while True:
                left = ends - time.monotonic()
                if left <= 0:
                    log.info("connection lifetime over, closing")
                    return
                conn.settimeout(min(self.limits.idle_timeout, left))
                try:
                    packet, _, flags, _ = conn.recvmsg(MAX_PACKET_BYTES + 1)
                except socket.timeout:
                    return
                if not packet:
                    return  # peer closed (an empty packet cannot be told apart, as in C)
                conn.sendall(self._answer(packet, truncated=bool(flags & socket.MSG_TRUNC)))
        except OSError as exc:
            log.debug("connection ended: %s", exc)
        finally:
            conn.close()

    def _answer(self, packet: bytes, truncated: bool) -> bytes:
        form = form_of(packet)
        try:
            if truncated or len(packet) > MAX_PACKET_BYTES:
                raise RequestError(errno.EMSGSIZE, f"request larger than {MAX_PACKET_BYTES} "
                                                   "bytes")
            parsed = parse_packet(packet)
            log.debug("request (%s): %r", parsed.form.value, parsed.request)
            reply = self.handle(parsed.request)
        except RequestError as exc:
            log.warning("bad request: %s", exc.message)
            reply = Reply.error(exc.code, exc.message)
        except Exception as exc:  # a bug must cost one request, not the daemon
            log.exception("request failed")
            reply = Reply.error(errno.EIO, f"internal error: {type(exc).__name__}: {exc}")
        return encode_reply(form, reply)
