"""Watchdog process (see cgroup.Watchdog): restores a freezer state when the manager dies."""

from __future__ import annotations

import os
import signal
import sys

from spfs.swap.cgroup import Freezer


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    armed: str | None = None
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["arm"]:
            armed = words[1]
        elif words[:1] == ["disarm"]:
            armed = None
    if armed is not None and os.path.isdir(argv[0]):
        freezer = Freezer(argv[0])
        frozen = armed == "frozen"
        try:
            freezer.freeze(10) if frozen else freezer.thaw(10)
        except Exception as exc:  # noqa: BLE001 - last resort, report and exit
            print(f"spfs swap watchdog: could not restore {freezer.path}: {exc}", file=sys.stderr)
            return 1
        print(f"spfs swap watchdog: manager gone, {freezer.path} {armed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
