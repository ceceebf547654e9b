"""`criu-spfs`: migrate containers with NFS mounts using unpatched CRIU.

`dump` records the container's NFS mounts and runs `criu dump` with them external;
`restore` runs `criu restore` with SPFS standing in for each share, which spfs-manager then
replaces, live, by the real NFS mounted inside the container.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spfs.criu.pending import DEFAULT_DEADLINE_S
from spfs.standby import DEFAULT_SOCKET as DEFAULT_STANDBY_SOCKET

# The lab's `spfs-lab ct suspend/resume` use criu-spfs when this is True.
IMPLEMENTED = True


def _extra(args: argparse.Namespace) -> list[str]:
    return args.criu_args[1:] if args.criu_args[:1] == ["--"] else args.criu_args


def _dump(args: argparse.Namespace) -> int:
    from spfs.criu.dump import DumpError, dump
    try:
        result = dump(args.tree, Path(args.images_dir), criu=args.criu, extra=_extra(args),
                      pending_deadline=args.pending_deadline)
    except DumpError as e:
        print(f"criu-spfs dump: {e}", file=sys.stderr)
        return 1
    print(f"criu-spfs dump: {len(result.superblocks)} NFS superblock(s) recorded in "
          f"{result.images}/criu-spfs.json; criu dump took {result.seconds:.2f} s")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from spfs.criu.restore import RestoreConfig, RestoreError, restore
    config = RestoreConfig(Path(args.images_dir), criu=args.criu, extra=_extra(args),
                           wait=args.wait, work_dir=Path(args.work_dir) if args.work_dir else None,
                           freeze_cgroup=args.freeze_cgroup, mount_deadline=args.mount_deadline,
                           wait_timeout=args.wait_timeout, verbose=args.verbose,
                           standby=None if args.no_standby else args.standby)
    try:
        r = restore(config)
    except RestoreError as e:
        print(f"criu-spfs restore: {e}", file=sys.stderr)
        return 1
    where = r.images / "criu-spfs-restore.json"
    print(f"criu-spfs restore: timeline in {where}" +
          ("" if args.wait else " (completed in the background)"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="criu-spfs", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="checkpoint a container with NFS mounts")
    d.add_argument("-t", "--tree", type=int, required=True, help="the container's init pid")
    d.add_argument("-D", "--images-dir", required=True)
    d.add_argument("--criu", default="criu", help="criu binary (default: criu from PATH)")
    d.add_argument("--pending-deadline", type=float, default=DEFAULT_DEADLINE_S,
                   help="seconds to wait for an earlier replace that still has SPFS mounted "
                        "in the container")
    d.add_argument("criu_args", nargs=argparse.REMAINDER, help="-- extra criu dump options")
    d.set_defaults(func=_dump)
    r = sub.add_parser("restore", help="restore with SPFS standing in for NFS")
    r.add_argument("-D", "--images-dir", required=True)
    r.add_argument("--wait", action="store_true",
                   help="return once every share is real NFS again and spfs and "
                        "spfs-manager have exited (default: once processes run)")
    r.add_argument("--criu", default="criu", help="criu binary (default: criu from PATH)")
    r.add_argument("--work-dir", help="private state (default /run/criu-spfs/restore-PID)")
    r.add_argument("--freeze-cgroup", help="the container's freezer cgroup directory "
                                           "(default: found from the restored init)")
    r.add_argument("--mount-deadline", type=float, default=300.0,
                   help="how long the manager keeps retrying the NFS mount (s)")
    r.add_argument("--wait-timeout", type=float, default=900.0,
                   help="bound of --wait (s)")
    r.add_argument("--standby", default=DEFAULT_STANDBY_SOCKET, metavar="SOCKET",
                   help="spfs-standby's socket: when it answers, it forks spfs-manager and "
                        "the spfs daemons (default %(default)s)")
    r.add_argument("--no-standby", action="store_true",
                   help="start spfs-manager and spfs as new processes even if a standby runs")
    r.add_argument("criu_args", nargs=argparse.REMAINDER, help="-- extra criu restore options")
    r.set_defaults(func=_restore)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="criu-spfs: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
