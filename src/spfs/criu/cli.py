"""`criu-spfs`: migrate containers with NFS mounts using unpatched CRIU.

`dump` is implemented; `restore` (SPFS in place of each share, replaced live by real NFS)
comes with the manager integration (issue 6) and exits 2 until then.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spfs.placeholder import not_implemented

# The lab switches `spfs-lab ct suspend/resume` to criu-spfs once this is True.
IMPLEMENTED = False


def _dump(args: argparse.Namespace) -> int:
    from spfs.criu.dump import DumpError, dump
    extra = args.criu_args[1:] if args.criu_args[:1] == ["--"] else args.criu_args
    try:
        result = dump(args.tree, Path(args.images_dir), criu=args.criu, extra=extra)
    except DumpError as e:
        print(f"criu-spfs dump: {e}", file=sys.stderr)
        return 1
    print(f"criu-spfs dump: {len(result.superblocks)} NFS superblock(s) recorded in "
          f"{result.images}/criu-spfs.json; criu dump took {result.seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="criu-spfs", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="checkpoint a container with NFS mounts")
    d.add_argument("-t", "--tree", type=int, required=True, help="the container's init pid")
    d.add_argument("-D", "--images-dir", required=True)
    d.add_argument("--criu", default="criu", help="criu binary (default: criu from PATH)")
    d.add_argument("criu_args", nargs=argparse.REMAINDER, help="-- extra criu dump options")
    d.set_defaults(func=_dump)
    r = sub.add_parser("restore", help="restore with SPFS standing in for NFS (not yet)")
    r.add_argument("-D", "--images-dir", required=True)
    r.add_argument("--wait", action="store_true")
    r.add_argument("criu_args", nargs=argparse.REMAINDER)
    r.set_defaults(func=lambda a: not_implemented("criu-spfs restore"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="criu-spfs: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
