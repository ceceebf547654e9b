"""`spfs-lab demo` (host side): boot a fresh lab guest and run the demo in it."""

from __future__ import annotations

import argparse
import sys

from spfs.lab import vm
from spfs.lab.paths import CHECKOUT


def run_demo(args: argparse.Namespace) -> int:
    print("spfs-lab demo: booting a fresh lab guest (qemu, Debian kernel 6.1, no network)",
          flush=True)
    spec = vm.RunSpec(argv=[str(CHECKOUT / ".venv" / "bin" / "python"), "-m",
                            "spfs.lab.demo_guest"], cwd=CHECKOUT, timeout=900)
    result = vm.run(spec)
    print(f"spfs-lab demo: guest booted in {result.boot_seconds} s; whole run "
          f"{result.wall_seconds:.0f} s; timeline JSON in {result.results}", flush=True)
    return result.status


if __name__ == "__main__":
    sys.exit(run_demo(argparse.Namespace()))
