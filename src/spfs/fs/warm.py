"""A warm spfs daemon: `python -m spfs.fs.warm CONFIG_FD` pays for the interpreter and the
imports (trio, pyfuse3: seconds on an emulated machine) up front, then waits for its command
line (JSON, the arguments of `spfs`) on CONFIG_FD and runs as that daemon. spfs-manager keeps
one spare, so a mount request during a restore does not wait for a Python start. EOF without
a command line (the manager went away) ends it."""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    from spfs.fs import cli  # imported before the wait: the reason this exists
    with os.fdopen(int(sys.argv[1]), "rb") as config:
        data = config.read()
    if not data:
        return 0
    argv = json.loads(data)
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        print("spfs.fs.warm: the command line must be a JSON list of strings", file=sys.stderr)
        return 2
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
