"""Run one switch in a separate process so a test can kill it at a random point.

usage: python kill_harness.py SOURCE TARGET CGROUP
Prints "go" right before the commit, then the report as JSON.
"""

import json
import signal
import sys

from spfs import swap
from spfs.swap.engine import abort_requested


def main() -> int:
    source, target, cgroup = sys.argv[1:4]
    plan = swap.discover(source, target, cgroup=cgroup)
    swap.prepare(plan)
    plan.prepared.watchdog.wait_ready(10)  # so that "go" is right before the stop window
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: abort_requested.set())
    print("go", flush=True)
    report = swap.commit(plan)
    print(json.dumps(report.as_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
