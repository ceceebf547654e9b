"""`spfs-lab ct ...` (filled in below)."""

from __future__ import annotations

import argparse


def add_ct_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ct", help="lab containers (inside the guest)")
    p.add_argument("ct_cmd", nargs=argparse.REMAINDER)
    return p


def run_ct(args: argparse.Namespace) -> int:
    raise NotImplementedError
