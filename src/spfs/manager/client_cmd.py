"""`spfs-client manage` and `spfs-client status`: talk to a running spfs-manager.

    spfs-client manage --socket-path P 'mode;all;mode=stub'        # raw text or JSON request
    spfs-client manage --socket-path P --data 'vers=4.1,addr=..' 'replace;id=1;...'
    spfs-client status --socket-path P [--json]

`add_arguments(subparsers)` registers both; `add_manage_arguments`/`run_manage` and
`add_status_arguments`/`run_status` fit spfs-client's one-module-per-subcommand discovery.
Until spfs-client has them, run `python -m spfs.manager.client_cmd`.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
from typing import Any

from spfs.manager.protocol import MAX_PACKET_BYTES, decode_text_reply, is_json

DEFAULT_TIMEOUT = 60.0


def send_request(socket_path: str, packet: bytes, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        sock.send(packet)
        reply = sock.recv(MAX_PACKET_BYTES)
    if not reply:
        # the manager stopping (its last SPFS gone) between accepting us and answering
        raise ConnectionResetError(errno.ECONNRESET, "spfs-manager closed the connection "
                                                     "without a reply")
    return reply


def text_packet(request: str, data: str | None) -> bytes:
    """Like vzcriu: the request NUL-terminated, then the mount data NUL-terminated."""
    packet = request.encode("utf-8", "surrogateescape") + b"\0"
    if data is not None:
        packet += data.encode("utf-8", "surrogateescape") + b"\0"
    return packet


def _describe_code(code: int) -> str:
    if code == 0:
        return "0"
    return f"{code} ({errno.errorcode.get(-code, '?')}: {os.strerror(-code)})"


def run_manage(args: argparse.Namespace) -> int:
    request: str = args.request
    if is_json(request.encode()):
        if args.data is not None:
            print("manage: --data is for the text form; put \"data\" in the JSON",
                  file=sys.stderr)
            return 2
        reply = json.loads(send_request(args.socket_path, request.encode(), args.timeout))
        print(json.dumps(reply, indent=2, sort_keys=True))
        return 0 if reply.get("code") == 0 else 1
    code = decode_text_reply(send_request(args.socket_path, text_packet(request, args.data),
                                          args.timeout))
    print(_describe_code(code))
    return 0 if code == 0 else 1


def _status_rows(mounts: list[dict[str, Any]]) -> list[list[str]]:
    rows = [["ID", "MODE", "PHASE", "MOUNTPOINT", "SPFS PID", "ERROR"]]
    for mount in mounts:
        replace = mount.get("replace") or {}
        rows.append([str(mount["id"]), str(mount["mode"]), str(replace.get("phase", "-")),
                     str(mount["ns_mountpoint"]), str(mount["spfs_pid"]),
                     str(replace.get("error") or "")])
    return rows


def run_status(args: argparse.Namespace) -> int:
    request = {"cmd": "status"} if args.id is None else {"cmd": "status", "id": args.id}
    reply = json.loads(send_request(args.socket_path, json.dumps(request).encode(),
                                    args.timeout))
    if args.json:
        print(json.dumps(reply, indent=2, sort_keys=True))
    elif reply.get("data") is None:
        print(f"error: {reply.get('message')}", file=sys.stderr)
        return 1
    else:
        rows = _status_rows(reply["data"]["mounts"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0 if reply.get("data") is not None else 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--socket-path", required=True, help="the manager's socket")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds to wait for the reply")


MANAGE_HELP = "send one raw request to spfs-manager"
STATUS_HELP = "every SPFS mount of spfs-manager, its mode and replace phase"


def add_manage_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--data", help="text form: mount data sent after a NUL (replace)")
    parser.add_argument("request", help="'cmd;opt=val;...' or a JSON object")


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("--id", help="only this SPFS")
    parser.add_argument("--json", action="store_true", help="print the raw JSON reply")


def add_arguments(subparsers: Any) -> None:
    """Register `manage` and `status` on an argparse subparsers object."""
    manage = subparsers.add_parser("manage", help=MANAGE_HELP)
    add_manage_arguments(manage)
    manage.set_defaults(func=run_manage)
    status = subparsers.add_parser("status", help=STATUS_HELP)
    add_status_arguments(status)
    status.set_defaults(func=run_status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spfs-client")
    add_arguments(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError) as exc:
        print(f"spfs-client {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
