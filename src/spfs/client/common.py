"""Shared bits of the spfs-client subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from spfs.fs.control_client import ControlError


def add_socket_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--socket-path", required=True, help="the daemon's control socket")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for a reply")


def report(call: Callable[[], Any]) -> int:
    """Print the reply as JSON (exit 0) or the daemon's error (exit 1)."""
    try:
        result = call()
    except ControlError as exc:
        print(f"spfs-client: {exc.error or exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0
