"""spfs-manager that pauses on entering one replace phase, for the lab tests that kill it
there (the frozen phases last milliseconds otherwise). The pause is injected through the
phase observer of spfs.manager.phases; production code has no such hook of its own.

usage: python paused_manager.py PHASE SECONDS [spfs-manager arguments]
"""

from __future__ import annotations

import logging
import sys
import time

from spfs.manager import cli, phases


def main() -> int:
    phase, seconds, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]

    def pause(mount_id: str, entered: phases.ReplacePhase) -> None:
        if entered.value == phase:
            logging.getLogger("spfs.manager.phases").warning(
                "paused_manager: replace %s pauses %.0f s on entering %s", mount_id, seconds,
                entered.name)
            time.sleep(seconds)

    phases.observe(pause)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
