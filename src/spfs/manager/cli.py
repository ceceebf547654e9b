"""Command line of spfs-manager.

    spfs-manager [--socket-path P] [--work-dir D] [--log F] [-v] [--daemon] [--exit-with-spfs]
    spfs-manager switch ...

Without a subcommand it runs the daemon (what vzcriu starts); `switch` as the *first*
argument runs the swap engine's one-shot switch instead and exits.  The dispatch looks only at
the first argument, so daemon options and switch options never mix.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading

from spfs.manager.freezer import FreezePolicy, FreezerLocks
from spfs.manager.manager import Manager, ManagerConfig
from spfs.manager.protocol import FINAL_STATUS_NAME
from spfs.manager.realmount import RetryPolicy
from spfs.manager.replace import ReplacePipeline, ReplaceTimeouts
from spfs.manager.server import ControlServer
from spfs.manager.spfs_daemon import DEFAULT_SPFS_COMMAND, SpfsProcessLauncher, SpfsTimeouts
from spfs.manager.steps import NamespaceMountMover, NamespaceRealFsMounter
from spfs.manager.swapper import SwapEngineAdapter, import_swap_engine
from spfs.sys import forkserver
from spfs.sys.daemon import detach, stdio_to_devnull
from spfs.sys.fds import close_quietly, raise_fd_limit

# What the fork server's workers run (the swap watchdog, fd donors, socket binders, thaw
# guards, namespace work): imported by the server while idle, not by each worker.
WORKER_MODULES = ("spfs.swap.watchdog", "spfs.swap.donor", "spfs.swap.sockname",
                  "spfs.manager.mounts", "spfs.manager.freezer")

log = logging.getLogger("spfs.manager")


def daemon_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spfs-manager",
        description="Mount SPFS for containers and replace it live by the real filesystem. "
                    "'spfs-manager switch ...' (switch first) runs a one-shot switch instead.")
    parser.add_argument("-w", "--work-dir",
                        help="state directory (default /run/spfs-manager-PID)")
    parser.add_argument("-s", "--socket-path",
                        help="control socket (default WORK_DIR/spfs-manager.sock)")
    parser.add_argument("-l", "--log", help="log file (default LOG_DIR/spfs-manager.log)")
    parser.add_argument("--log-dir", help="directory of the manager's and every SPFS's log "
                                          "(default WORK_DIR)")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (repeatable)")
    parser.add_argument("-d", "--daemon", action="store_true",
                        help="detach once the control socket accepts connections")
    parser.add_argument("--ready-fd", type=int, metavar="FD",
                        help="instead of detaching: write 'R' to FD and close it once the "
                             "control socket accepts connections, stdio then on /dev/null "
                             "(for a caller that already runs us detached: spfs-standby)")
    parser.add_argument("--exit-with-spfs", action="store_true",
                        help="exit when the last SPFS daemon has exited")
    parser.add_argument("--mount-deadline", type=float, default=300.0,
                        help="seconds to keep retrying the real mount of a replace")
    parser.add_argument("--hold-timeout", type=float, default=900.0,
                        help="seconds a replace may wait for 'release'")
    parser.add_argument("--freeze-timeout", type=float, default=10.0,
                        help="seconds one attempt to freeze (or thaw) a cgroup may take")
    parser.add_argument("--freeze-deadline", type=float, default=120.0,
                        help="seconds to keep retrying the freeze of a replace")
    parser.add_argument("--spfs-ready-timeout", type=float, default=30.0,
                        help="seconds an spfs daemon may take to get ready")
    parser.add_argument("--spfs-command", default=" ".join(DEFAULT_SPFS_COMMAND),
                        help="how to run spfs (split on blanks)")
    parser.add_argument("--warm-spfs", action="store_true",
                        help="keep a spare spfs daemon with its imports done, so a mount "
                             "request does not wait for a Python start (criu-spfs restore)")
    parser.add_argument("--standby", metavar="SOCKET",
                        help="spfs-standby's socket: it forks the spfs daemons when it "
                             "answers (no Python start per daemon)")
    return parser


def run_switch(argv: list[str]) -> int:
    forkserver.start(preload=WORKER_MODULES)
    from spfs.swap import cli as switch_cli  # imported here: the daemon itself starts without it
    parser = argparse.ArgumentParser(prog="spfs-manager switch",
                                     description="Move every reference of a cgroup's tasks "
                                                 "from one mount to another.")
    switch_cli.add_switch_arguments(parser)
    return int(switch_cli.run_switch(parser.parse_args(argv)))


def _setup_logging(path: str, verbosity: int) -> None:
    handler = logging.FileHandler(path, errors="backslashreplace")
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(threadName)s %(name)s %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    # -v is about our own code: libraries' debug output (pyroute2 logs every netlink
    # message) would slow the swap down while the container is frozen
    root.setLevel(logging.WARNING)
    logging.getLogger("spfs").setLevel(logging.DEBUG if verbosity else logging.INFO)
    # SIGUSR1 writes every thread's Python stack to the log: a replace that seems stuck
    # can be looked at without stopping it
    faulthandler.register(signal.SIGUSR1, file=handler.stream, all_threads=True)


def _write_pid(path: str, pid: int) -> None:
    with open(path, "w") as f:
        f.write(f"{pid}\n")


def _write_final_status(path: str, manager: Manager) -> None:
    """What a client polling the socket may have missed, for after we are gone (renamed
    whole, before the pid file goes: the pid file's absence means this is complete)."""
    try:
        with open(f"{path}.partial", "w") as f:
            json.dump({"mounts": manager.final_statuses()}, f)
        os.rename(f"{path}.partial", path)
    except (OSError, TypeError, ValueError) as exc:
        log.warning("final status not written: %s", exc)


def build_launcher(args: argparse.Namespace) -> SpfsProcessLauncher:
    return SpfsProcessLauncher(command=tuple(args.spfs_command.split()),
                               timeouts=SpfsTimeouts(ready=args.spfs_ready_timeout),
                               warm=args.warm_spfs, standby=args.standby)


def build_manager(args: argparse.Namespace, work_dir: str, log_dir: str,
                  launcher: SpfsProcessLauncher) -> Manager:
    timeouts = ReplaceTimeouts(hold=args.hold_timeout, freeze=FreezePolicy(
        attempt=args.freeze_timeout, deadline=args.freeze_deadline, thaw=args.freeze_timeout))
    pipeline = ReplacePipeline(
        NamespaceRealFsMounter(RetryPolicy(deadline=args.mount_deadline)),
        NamespaceMountMover(), SwapEngineAdapter(), FreezerLocks(), timeouts)
    config = ManagerConfig(work_dir=work_dir, log_dir=log_dir, verbosity=args.verbose,
                           exit_with_spfs=args.exit_with_spfs)
    return Manager(config, launcher, pipeline, SwapEngineAdapter())


def _announce_ready(fd: int) -> None:
    try:
        os.write(fd, b"R")
    except OSError as exc:
        log.warning("ready fd %d: %s", fd, exc)
    finally:
        close_quietly(fd)


def run_daemon(args: argparse.Namespace) -> int:
    work_dir = os.path.abspath(args.work_dir or f"/run/spfs-manager-{os.getpid()}")
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    log_dir = os.path.abspath(args.log_dir or work_dir)
    os.makedirs(log_dir, exist_ok=True)
    _setup_logging(args.log or os.path.join(log_dir, "spfs-manager.log"), args.verbose)
    socket_path = os.path.abspath(args.socket_path or
                                  os.path.join(work_dir, "spfs-manager.sock"))
    # before the socket exists: a SIGTERM right after a client could connect must stop us
    # cleanly, not kill us with the socket file left behind
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        # bound before detaching, so the caller can connect as soon as we return
        launcher = build_launcher(args)
        manager = build_manager(args, work_dir, log_dir, launcher)
        server = ControlServer(socket_path, manager.handle)
    except OSError as exc:
        print(f"spfs-manager: {exc}", file=sys.stderr)
        log.error("cannot start: %s", exc)
        return 1
    pid_file = os.path.join(work_dir, "spfs-manager.pid")
    if args.daemon:
        # the parent records the child's pid: the file exists when our caller goes on
        detach(lambda child: _write_pid(pid_file, child))
    else:
        _write_pid(pid_file, os.getpid())
    if args.ready_fd is not None:
        # What detaching gives the caller, without a fork of this whole interpreter (which
        # costs tens of ms of copied pages under emulation, in the middle of a restore)
        stdio_to_devnull()
        _announce_ready(args.ready_fd)
    # Every child that runs Python is forked by this server, made now while we have one
    # thread; after the caller may go on, since its fork costs tens of ms under emulation.
    forkserver.start(preload=WORKER_MODULES)
    # Both take seconds on a slow machine and are needed only later: not before the caller
    # may go on (and not before the fork of detach, which threads would not survive).
    launcher.warm_up()
    threading.Thread(target=import_swap_engine, name="swap-engine-import", daemon=True).start()

    def tick() -> None:
        manager.reap()
        if manager.finished.is_set():
            log.info("last SPFS exited: stopping (--exit-with-spfs)")
            stop.set()

    log.info("spfs-manager %d started: socket %s, work dir %s", os.getpid(), socket_path,
             work_dir)
    try:
        server.serve(stop, tick)
    finally:
        log.info("stopping")
        manager.shutdown()
        launcher.close()
        server.close()
        _write_final_status(os.path.join(work_dir, FINAL_STATUS_NAME), manager)
        os.unlink(pid_file)
        log.info("spfs-manager stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A safety margin for the swap engine and the mounts (the engine keeps one fd per
    # distinct file, not per reference; see spfs.swap.prepare)
    raise_fd_limit()
    if argv[:1] == ["switch"]:
        return run_switch(argv[1:])
    return run_daemon(daemon_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
