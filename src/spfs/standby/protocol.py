"""The standby's wire format: one request per connection, answered by the child's pid and,
when it ends, its exit status.

A connection is a SOCK_SEQPACKET unix socket, so every message arrives whole. The request is
JSON with the descriptors the child gets attached (SCM_RIGHTS), in the order of its "fds":

    {"program": "spfs", "argv": [...], "env": {...}, "cwd": "/", "new_session": true,
     "fds": [0, 1, 2, 3]}

Replies: {"pid": N}, then {"exit": CODE} (negative: killed by that signal); or {"error": "..."}
and the connection is closed.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from typing import Any

MAX_MESSAGE = 256 * 1024
MAX_FDS = 16
# What the standby may run, and the module whose main(argv) it is: nothing else is importable
# through it.
PROGRAMS = {
    "spfs": "spfs.fs.cli",
    "spfs-manager": "spfs.manager.cli",
}


class RequestError(ValueError):
    pass


@dataclass
class SpawnRequest:
    program: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = "/"
    new_session: bool = False
    fds: list[int] = field(default_factory=list)  # where each attached descriptor goes

    def encode(self) -> bytes:
        return json.dumps({"program": self.program, "argv": self.argv, "env": self.env,
                           "cwd": self.cwd, "new_session": self.new_session,
                           "fds": self.fds}).encode()

    @classmethod
    def decode(cls, data: bytes, attached: int) -> "SpawnRequest":
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise RequestError(f"not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise RequestError("the request must be a JSON object")
        program, argv, env = doc.get("program"), doc.get("argv"), doc.get("env", {})
        cwd, new_session, fds = doc.get("cwd", "/"), doc.get("new_session", False), \
            doc.get("fds", [])
        if program not in PROGRAMS:
            raise RequestError(f"unknown program {program!r}: one of {', '.join(PROGRAMS)}")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise RequestError("argv must be a list of strings")
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and "=" not in k and
                "\0" not in k + v for k, v in env.items()):
            raise RequestError("env must map names to strings")
        if not isinstance(cwd, str) or not cwd.startswith("/"):
            raise RequestError("cwd must be an absolute path")
        if not isinstance(new_session, bool):
            raise RequestError("new_session must be true or false")
        if (not isinstance(fds, list) or not all(isinstance(f, int) and 0 <= f < 1024
                                                 for f in fds) or len(set(fds)) != len(fds)):
            raise RequestError("fds must be distinct descriptor numbers below 1024")
        if len(fds) != attached:
            raise RequestError(f"{len(fds)} descriptor numbers for {attached} attached ones")
        return cls(program, argv, env, cwd, new_session, fds)


def send_message(sock: socket.socket, doc: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(doc).encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.send(data)


def receive_message(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One whole message and the descriptors that came with it; b"" at EOF."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise RequestError("message or descriptors truncated")
    return data, fds
