"""`spfs-client status`: mode, parked requests, open handles, last switch."""

from __future__ import annotations

import argparse

from spfs.client.common import add_socket_argument, report
from spfs.fs import control_client

NAME = "status"
HELP = "show the state of an spfs daemon"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)


def run(args: argparse.Namespace) -> int:
    return report(lambda: control_client.status(args.socket_path, args.timeout))
