"""`spfs-client mode`: change the SPFS work mode."""

from __future__ import annotations

import argparse

from spfs.client.common import add_socket_argument, report
from spfs.fs import control_client
from spfs.fs.modes import Mode

NAME = "mode"
HELP = "switch an spfs daemon to restore, stub or proxy mode"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_socket_argument(parser)
    parser.add_argument("--mode", required=True, choices=[m.value for m in Mode])
    parser.add_argument("--proxy-dir", help="target directory (proxy mode)")
    parser.add_argument("--proxy-mntns-pid", type=int,
                        help="open --proxy-dir in the mount namespace of this pid")


def run(args: argparse.Namespace) -> int:
    return report(lambda: control_client.set_mode(args.socket_path, args.mode, args.proxy_dir,
                                                  args.proxy_mntns_pid, args.timeout))
