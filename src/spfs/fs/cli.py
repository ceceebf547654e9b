"""`spfs MOUNTPOINT --mode {restore,stub,proxy} ...`: the stub/proxy FUSE filesystem."""

from __future__ import annotations

import argparse
import logging
import os
import select
import sys
import time

from spfs.fs.daemon import DaemonConfig, StartupError, run
from spfs.fs.manifest import ManifestError
from spfs.fs.modes import Mode
from spfs.fs.target_dir import TargetError
from spfs.fs.control_server import ControlSocketError
from spfs.fs.workers import DEFAULT_WORKERS

log = logging.getLogger("spfs")

_DAEMON_READY_TIMEOUT_S = 60.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spfs", description="SPFS: stub/proxy FUSE filesystem "
                                "standing in for an NFS mount while a container is restored.")
    p.add_argument("mountpoint")
    p.add_argument("--mode", required=True, choices=[m.value for m in Mode])
    p.add_argument("--proxy-dir", help="target directory (proxy mode)")
    p.add_argument("--proxy-mntns-pid", type=int,
                   help="open --proxy-dir in the mount namespace of this pid")
    p.add_argument("--manifest", help="restore-mode manifest (JSON)")
    p.add_argument("--socket-path", help="control socket (AF_UNIX SOCK_SEQPACKET)")
    p.add_argument("--ready-fd", type=int, action="append", default=[],
                   help="descriptor closed once the mount is usable (repeatable)")
    p.add_argument("--log", help="log file (default: stderr)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="extra FUSE mount options, comma separated")
    p.add_argument("--foreground", "-f", action="store_true", help="do not daemonize")
    p.add_argument("--stub-timeout", type=float,
                   help="answer EIO to requests parked longer than this many seconds "
                        "(default: wait forever, like an NFS hard mount)")
    p.add_argument("--max-parked", type=int, default=20000,
                   help="most requests handled at once, parked ones included (default 20000)")
    p.add_argument("--cache-timeout", type=float, default=1.0,
                   help="kernel attribute/entry cache timeout in restore/proxy mode (s)")
    p.add_argument("--read-ahead-kb", type=int, default=1024,
                   help="FUSE bdi readahead; 0 keeps the kernel default (128)")
    p.add_argument("--inode-soft-limit", type=int,
                   help="proxy inodes (one descriptor each) above which the kernel is asked to "
                        "forget old ones (default: 80%% of RLIMIT_NOFILE)")
    p.add_argument("--direct-io", action="store_true",
                   help="proxy-mode opens bypass the page cache (faster, but no shared mmap)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help="threads making the syscalls on the proxy target, so that a target "
                        f"that hangs stalls only its own requests (default {DEFAULT_WORKERS})")
    return p


def setup_logging(verbosity: int, log_file: str | None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s spfs[%(process)d] %(levelname)s "
                                           "%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if verbosity > 1 else logging.WARNING)


def config_from_args(args: argparse.Namespace) -> DaemonConfig:
    options = [o for group in args.options for o in group.split(",") if o]
    if args.stub_timeout is not None and args.stub_timeout <= 0:
        raise StartupError("--stub-timeout must be positive")
    if args.max_parked < 10:
        raise StartupError("--max-parked must be at least 10")
    if not 1 <= args.workers <= 1024:
        raise StartupError("--workers must be between 1 and 1024")
    return DaemonConfig(
        mountpoint=os.path.abspath(args.mountpoint), mode=Mode(args.mode),
        proxy_dir=args.proxy_dir, proxy_mntns_pid=args.proxy_mntns_pid,
        manifest=args.manifest, socket_path=args.socket_path, ready_fds=list(args.ready_fd),
        stub_timeout=args.stub_timeout, fuse_options=options, max_parked=args.max_parked,
        cache_timeout=args.cache_timeout, read_ahead_kb=args.read_ahead_kb,
        direct_io=args.direct_io, inode_soft_limit=args.inode_soft_limit,
        workers=args.workers)


def _daemonize(config: DaemonConfig) -> int | None:
    """Fork; the parent exits 0 once the child says it is ready, or with the child's
    status if it dies first. Returns None in the child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.setsid()
        config.ready_notify_fd = write_end
        return None
    os.close(write_end)
    deadline = time.monotonic() + _DAEMON_READY_TIMEOUT_S
    message = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_end], [], [], 0.5)
        if ready:
            message = os.read(read_end, 1)
            break
    os.close(read_end)
    if message == b"R":
        return 0
    if not ready:
        print(f"spfs: daemon {pid} not ready after {_DAEMON_READY_TIMEOUT_S:.0f} s", file=sys.stderr)
        return 1
    _, status = os.waitpid(pid, 0)  # it closed the pipe without being ready: it is exiting
    return os.waitstatus_to_exitcode(status) or 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose, args.log)
    try:
        config = config_from_args(args)
        if not args.foreground:
            code = _daemonize(config)
            if code is not None:
                return code
        return run(config)
    except (StartupError, ManifestError, TargetError, ControlSocketError) as exc:
        log.error("not mounted: %s", exc)
        print(f"spfs: not mounted: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # pyfuse3 reports mount failures this way
        log.error("not mounted: %s", exc)
        print(f"spfs: not mounted: {exc}", file=sys.stderr)
        return 2
    except Exception:
        # A bug, or pyfuse3's loop giving up: the log is often the only thing an operator
        # keeps (stderr of a daemon goes nowhere), so the traceback goes there too.
        log.exception("spfs failed")
        raise


if __name__ == "__main__":
    sys.exit(main())
