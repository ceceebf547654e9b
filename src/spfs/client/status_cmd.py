"""`spfs-client status`: the state of spfs-manager (every SPFS mount, its mode and replace
phase) or of one spfs daemon (mode, parked requests, open handles, last switch), whichever
listens on the socket."""

from __future__ import annotations

import argparse
import json

from spfs.client.common import add_socket_argument, report
from spfs.fs import control_client
from spfs.manager import client_cmd as manager_client

NAME = "status"
HELP = "show the state of spfs-manager or of one spfs daemon"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
    parser.add_argument("--id", help="manager: only this SPFS")
    parser.add_argument("--json", action="store_true", help="manager: the raw JSON reply")


def _is_manager(socket_path: str, timeout: float) -> bool:
    """The manager answers {"cmd": "status"} with its mounts; an spfs daemon refuses it."""
    try:
        reply = json.loads(manager_client.send_request(
            socket_path, json.dumps({"cmd": "status"}).encode(), timeout))
    except (OSError, ValueError):
        return False
    return isinstance(reply, dict) and isinstance(reply.get("data"), dict) \
        and "mounts" in reply["data"]


def run(args: argparse.Namespace) -> int:
    if _is_manager(args.socket_path, args.timeout):
        return manager_client.run_status(args)
    return report(lambda: control_client.status(args.socket_path, args.timeout))
