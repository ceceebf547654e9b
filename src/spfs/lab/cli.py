"""`spfs-lab`: build the lab, run commands in a fresh guest, manage lab containers."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from spfs.lab import vm


def _cmd_build(args: argparse.Namespace) -> int:
    from spfs.lab.build import build
    build()
    return 0


def _fresh_workloads() -> None:
    """The guest runs the workloads built here: a source edited since the last build would
    otherwise be tested through its old binary."""
    from spfs.lab.paths import LabPaths
    from spfs.lab.workloads import ensure_workloads
    ensure_workloads(LabPaths.default())


def _cmd_run(args: argparse.Namespace) -> int:
    _fresh_workloads()
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("spfs-lab run: no command given", file=sys.stderr)
        return 2
    env = dict(kv.split("=", 1) for kv in args.env)
    spec = vm.RunSpec(argv=argv, timeout=args.timeout, mem_mib=args.mem, cpus=args.cpus,
                      cwd=Path(args.cwd) if args.cwd else Path.cwd(), env=env)
    try:
        result = vm.run(spec)
    except vm.LabError as e:
        print(f"spfs-lab: {e}", file=sys.stderr)
        return vm.EXIT_LAB_ERROR
    if args.verbose:
        print(f"spfs-lab: exit {result.status}, boot to command {result.boot_seconds} s, "
              f"wall {result.wall_seconds:.1f} s, run dir {result.run_dir}", file=sys.stderr)
    return result.status


def _cmd_ct(args: argparse.Namespace) -> int:
    from spfs.lab.ct.cli import run_ct
    return run_ct(args)


def _cmd_zdtm(args: argparse.Namespace) -> int:
    from spfs.lab.zdtm.cli import run_zdtm
    return run_zdtm(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    _fresh_workloads()
    from spfs.lab.demo import run_demo
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spfs-lab", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)

    sub.add_parser("build", help="fetch the kernel, build the initramfs and test programs"
                   ).set_defaults(func=_cmd_build)

    r = sub.add_parser("run", help="boot a fresh guest and run CMD in it as root")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds (default 900)")
    r.add_argument("--mem", type=int, default=2048, help="guest memory in MiB")
    r.add_argument("--cpus", type=int, default=2)
    r.add_argument("--cwd", help="working directory in the guest (default: the current one)")
    r.add_argument("--env", action="append", default=[], metavar="K=V")
    r.add_argument("command", nargs=argparse.REMAINDER)
    r.set_defaults(func=_cmd_run)

    from spfs.lab.ct.cli import add_ct_parser
    add_ct_parser(sub).set_defaults(func=_cmd_ct)

    from spfs.lab.zdtm.cli import add_zdtm_parser
    add_zdtm_parser(sub).set_defaults(func=_cmd_zdtm)

    sub.add_parser("demo", help="the main job: a migration in the lab, with a timeline"
                   ).set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="spfs-lab: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
