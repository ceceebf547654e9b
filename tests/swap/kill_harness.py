"""Run one switch in a separate process so a test can kill it at a random point.

usage: python kill_harness.py SOURCE TARGET CGROUP
Prints "go" right before the commit, then the report as JSON, with commit_s: the time
from "go" to the end of the commit (the span a test spreads its kills over).
"""

import json
import signal
import sys
import time

from spfs import swap
from spfs.swap.engine import abort_requested


def main() -> int:
    source, target, cgroup = sys.argv[1:4]
    plan = swap.discover(source, target, cgroup=cgroup)
    swap.prepare(plan)
    plan.prepared.watchdog.wait_ready(60)  # so that "go" is right before the stop window
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: abort_requested.set())
    print("go", flush=True)
    start = time.perf_counter()
    report = swap.commit(plan)
    print(json.dumps({**report.as_dict(), "commit_s": time.perf_counter() - start}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
