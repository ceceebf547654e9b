"""`spfs-lab ct create|exec|destroy|list|suspend|resume` (run inside the lab guest)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from spfs.lab.ct import container
from spfs.lab.ct.spec import BindMount, CtState, NfsMount, SpecError, all_states


def add_ct_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("ct", help="lab containers (run inside the lab guest)")
    cts = p.add_subparsers(dest="ct_cmd", required=True)

    c = cts.add_parser("create", help="create and start a container")
    c.add_argument("name")
    c.add_argument("--nfs", action="append", default=[], metavar="VERS:SHARE:MOUNTPOINT[:OPTS]",
                   help="mount lab share SHARE (a, b) with NFS version VERS (3, 4.0, 4.1, 4.2) "
                        "from inside the container's netns and mntns")
    c.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:ro]",
                   help="bind SRC (a guest path, or ct:/path inside the container) at DST")
    c.add_argument("--cgroup", choices=("v1", "v2"), default="v2")

    e = cts.add_parser("exec", help="run a command in a container")
    e.add_argument("name")
    e.add_argument("--detach", "-d", action="store_true",
                   help="start in the background, reparented to the container's init; "
                        "prints its pid inside the container")
    e.add_argument("--log", default="/dev/null", help="with --detach: output file (in the ct)")
    e.add_argument("command", nargs=argparse.REMAINDER)

    d = cts.add_parser("destroy", help="kill a container and remove everything it had")
    d.add_argument("name")

    cts.add_parser("list", help="list containers as JSON")

    s = cts.add_parser("suspend", help="checkpoint a container with CRIU and stop it")
    s.add_argument("name")
    s.add_argument("--images", required=True)
    s.add_argument("--plain", action="store_true",
                   help="plain CRIU baseline (NFS declared external)")
    r = cts.add_parser("resume", help="restore a suspended container")
    r.add_argument("name")
    r.add_argument("--images", required=True)
    r.add_argument("--plain", action="store_true",
                   help="plain CRIU baseline: NFS mapped to the same shares mounted in the "
                        "guest's root netns")
    r.add_argument("--no-wait", action="store_true",
                   help="return once the processes run (criu-spfs finishes the replace in "
                        "the background); default: wait until spfs and the manager exited")
    return p


def run_ct(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except (SpecError, container.CtError) as e:
        print(f"spfs-lab ct: {e}", file=sys.stderr)
        return 1


def _dispatch(args: argparse.Namespace) -> int:
    if args.ct_cmd == "create":
        state = container.create(args.name, [NfsMount.parse(t) for t in args.nfs],
                                 [BindMount.parse(t) for t in args.bind], args.cgroup)
        print(json.dumps({"name": state.name, "init_pid": state.init_pid,
                          "address": state.ct_addr, "cgroup": str(state.cgroup_dir())}))
        return 0
    if args.ct_cmd == "exec":
        argv = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not argv:
            raise SpecError("exec: no command")
        proc = container.exec_in(args.name, argv, detach=args.detach, log_path=args.log)
        if args.detach:
            print(proc.stdout.strip())
        return proc.returncode
    if args.ct_cmd == "destroy":
        container.destroy(args.name)
        return 0
    if args.ct_cmd == "list":
        print(json.dumps([asdict(s) | {"running": container.alive(s)} for s in all_states()],
                         indent=2))
        return 0
    if args.ct_cmd in ("suspend", "resume"):
        from spfs.lab.ct import checkpoint
        state = CtState.load(args.name)
        if args.ct_cmd == "suspend":
            checkpoint.suspend(state, args.images, plain=args.plain)
        else:
            checkpoint.resume(state, args.images, plain=args.plain, wait=not args.no_wait)
        return 0
    raise SpecError(f"unknown ct command {args.ct_cmd}")
