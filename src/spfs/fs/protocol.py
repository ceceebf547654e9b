"""Control-socket protocol: one JSON object per SOCK_SEQPACKET message, each way.

Requests: {"op": "set_mode", "mode": "proxy", "proxy_dir": "/x", "ns_pid": 123}
          {"op": "status"}
          {"op": "add_manifest_entries", "entries": [...]}  or  {..., "manifest_file": "/m.json"}
          {"op": "invalidate"}  or  {"op": "invalidate", "paths": ["dir/file"], "entries": false}
Replies:  {"code": 0, "error": "", "message": "...", "result": {...}}
          {"code": 22, "error": "EINVAL", "message": "why", "result": null}
"""

from __future__ import annotations

import errno
import json
from typing import Any

MAX_MESSAGE_BYTES = 1 << 20
OPS = ("set_mode", "status", "add_manifest_entries", "invalidate")


class ProtocolError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode()


def decode_request(data: bytes) -> dict[str, Any]:
    try:
        request = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(errno.EINVAL, f"request is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise ProtocolError(errno.EINVAL, "request must be a JSON object")
    if request.get("op") not in OPS:
        raise ProtocolError(errno.EINVAL, f"unknown op {request.get('op')!r} (expected one of "
                                          f"{', '.join(OPS)})")
    return request


def reply(result: Any = None, message: str = "ok") -> dict[str, Any]:
    return {"code": 0, "error": "", "message": message, "result": result}


def error_reply(code: int, message: str) -> dict[str, Any]:
    return {"code": code, "error": errno.errorcode.get(code, "EIO"), "message": message,
            "result": None}
