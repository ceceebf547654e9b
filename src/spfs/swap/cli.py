"""`switch` command: `python -m spfs.swap.cli --source A --target B (--cgroup PATH | --pid PID...)
[--dry-run] [--json]`; spfs-manager wires `spfs-manager switch` to add_switch_arguments/run_switch."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading

from spfs.swap import api
from spfs.swap.engine import abort_requested
from spfs.swap.model import SwapError, SwapPlan


def add_switch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="mount (or directory on it) the processes use now: A")
    parser.add_argument("--target", required=True, help="directory with the same files: B (may be /proc/PID/fd/N)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--cgroup", help="v1 freezer or v2 cgroup directory: every process in it (and below)")
    where.add_argument("--pid", type=int, nargs="+", help="process trees rooted at these pids")
    parser.add_argument("--path-map", action="append", default=[], metavar="OLD=NEW",
                        help="name on B for a file unlinked on A (path relative to A = path on B)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, stop nothing")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--timeout", type=float, default=5.0, help="bound of every wait, seconds (default 5)")
    parser.add_argument("--allow-unmovable", action="store_true",
                        help="switch what can be moved even if some references cannot")


def plan_as_dict(plan: SwapPlan) -> dict:
    processes = []
    for p in plan.processes:
        if not (p.has_work or p.maps or p.exe):
            continue
        processes.append({
            "pid": p.pid, "comm": p.comm, "threads": p.tids,
            "shares_fd_table_with": p.fd_table_of, "shares_fs_with": p.fs_of,
            "fds": [{"fd": r.fd, "path": r.desc.rel, "flags": oct(r.desc.flags), "description": r.desc.index,
                     "cloexec": r.cloexec, "posix_locks": len(r.posix_locks)} for r in p.fds],
            "epoll": [{"epfd": e.epfd, "fd": e.target.tfd, "events": hex(e.target.events)} for e in p.epoll],
            "dirs": [{"kind": d.kind, "path": d.rel} for d in p.dirs],
            "mappings": [{"range": f"{m.vma.start:#x}-{m.vma.end:#x}", "perms": m.vma.perms, "path": m.rel}
                         for m in p.maps],
            "exe": p.exe.rel if p.exe else None,
        })
    return {
        "source": plan.source.path, "target": plan.target, "cgroup": plan.cgroup,
        "processes": processes,
        "descriptions": [{"index": d.index, "path": d.rel, "holders": d.holders} for d in plan.descriptions],
        "unmovable": [{"pid": u.pid, "what": u.what, "reason": u.reason} for u in plan.unmovable],
    }


def _print_plan(plan: SwapPlan) -> None:
    data = plan_as_dict(plan)
    print(f"switch {data['source']} -> {data['target']}: {len(data['processes'])} processes, "
          f"{len(data['descriptions'])} open file descriptions")
    for p in data["processes"]:
        shared = f" (fd table of {p['shares_fd_table_with']})" if p["shares_fd_table_with"] else ""
        print(f"  pid {p['pid']} {p['comm']} threads={len(p['threads'])}{shared}")
        for f in p["fds"]:
            print(f"    fd {f['fd']:>4} {f['path']} flags={f['flags']} desc#{f['description']}"
                  + (" cloexec" if f["cloexec"] else "") + (f" posix-locks={f['posix_locks']}" if f["posix_locks"] else ""))
        for e in p["epoll"]:
            print(f"    epoll fd {e['epfd']} watches fd {e['fd']} events={e['events']}")
        for d in p["dirs"]:
            print(f"    {d['kind']} {d['path'] or '.'}")
        for m in p["mappings"]:
            print(f"    mapping {m['range']} {m['perms']} {m['path']}")
        if p["exe"]:
            print(f"    exe {p['exe']}")
    for u in data["unmovable"]:
        print(f"  CANNOT MOVE pid {u['pid']} {u['what']}: {u['reason']}")


def _parse_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep:
            raise SystemExit(f"--path-map needs OLD=NEW, got {item!r}")
        out[old] = new
    return out


def run_switch(args: argparse.Namespace) -> int:
    """Exit codes: 0 switched (or dry run), 1 failed and reverted, 2 bad input / nothing done."""
    try:
        plan = api.discover(args.source, args.target, cgroup=args.cgroup, pids=args.pid,
                            path_map=_parse_map(args.path_map))
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"switch: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        if args.json:
            print(json.dumps(plan_as_dict(plan), indent=2))
        else:
            _print_plan(plan)
        return 0
    if plan.unmovable and not args.allow_unmovable:
        if args.json:
            print(json.dumps({"ok": False, "error": "some references cannot be moved; nothing was stopped",
                              "plan": plan_as_dict(plan)}, indent=2))
        else:
            _print_plan(plan)
            print("switch: some references cannot be moved; nothing was stopped "
                  "(--allow-unmovable to move the rest)", file=sys.stderr)
        return 2
    try:
        api.prepare(plan)
    except SwapError as exc:
        print(f"switch: {exc}", file=sys.stderr)
        return 2
    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        previous = {sig: signal.signal(sig, lambda *_: abort_requested.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = api.commit(plan, timeout=args.timeout)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    elif report.ok:
        print(f"switched {report.processes} processes ({report.fds_moved} fds, {report.dirs_moved} cwd/root, "
              f"{report.epoll_readded} epoll registrations); stop window {report.stop_window_s * 1e3:.2f} ms")
        if report.pending_tasks:
            print(f"the cgroup was frozen before the switch and is left frozen: {report.pending_tasks} processes "
                  "let go of the source once it is thawed", file=sys.stderr)
    elif report.committed:
        print(f"switched, but: {report.error}", file=sys.stderr)
    else:
        print(f"switch failed, everything left on the source: {report.error}", file=sys.stderr)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spfs-switch", description=__doc__)
    add_switch_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_switch(args)


if __name__ == "__main__":
    sys.exit(main())
