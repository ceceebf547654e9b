"""spfs-manager raises its soft RLIMIT_NOFILE to the hard limit at start (a margin for the
swap engine, which itself needs one fd per distinct file: tests/swap/test_many_mappings.py)."""

from __future__ import annotations

import resource
import subprocess
import sys

PROBE = ("import contextlib, io, resource\n"
         "from spfs.manager import cli\n"
         "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
         "    cli.main(['switch', '--help'])\n"
         "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n")


def test_manager_start_raises_the_soft_fd_limit_to_the_hard_one():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard > 1024, "this host's hard limit leaves nothing to raise"

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))

    run = subprocess.run([sys.executable, "-c", PROBE], preexec_fn=low_soft_limit, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout.split()[-1]) == hard
