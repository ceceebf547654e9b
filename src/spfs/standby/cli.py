"""spfs-standby [--socket PATH] [--log FILE] [-v] [--daemon]

Run on a container host before restores (a service); criu-spfs restore and spfs-manager use
it when it answers at PATH (default /run/spfs/standby.sock), and start their programs
themselves when it does not. With --daemon it returns once it accepts requests, its
imports done.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from spfs.standby import DEFAULT_SOCKET
from spfs.sys.daemon import detach
from spfs.standby.server import StandbyServer

log = logging.getLogger("spfs.standby")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spfs-standby", description=__doc__.splitlines()[2])
    p.add_argument("-s", "--socket", default=DEFAULT_SOCKET, help="where to accept requests")
    p.add_argument("-l", "--log", help="log file (default: stderr)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-d", "--daemon", action="store_true",
                   help="detach once requests are accepted")
    p.add_argument("--pid-file", help="write the serving process's pid here")
    return p


def _setup_logging(path: str | None, verbose: bool) -> None:
    handler: logging.Handler = (logging.FileHandler(path) if path
                                else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: "
                                           "%(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger("spfs").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log, args.verbose)
    server = StandbyServer(os.path.abspath(args.socket))
    server.preload()
    try:
        server.bind()
    except OSError as exc:
        print(f"spfs-standby: {exc}", file=sys.stderr)
        return 1
    if args.daemon:
        detach()
    if args.pid_file:
        partial = f"{args.pid_file}.partial"  # renamed whole: a reader never sees it empty
        with open(partial, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.rename(partial, args.pid_file)
    try:
        server.serve()
    finally:
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except FileNotFoundError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
