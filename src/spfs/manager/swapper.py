"""The swap engine (issue 4) behind the manager's ReferenceSwapper interface.

The engine lives in spfs.swap and is being written in parallel; until its API is importable
every swap fails with ENOSYS, which the replace pipeline treats like any other failure of the
SWAPPING phase (rollback: SPFS stays in place, proxying).
"""

from __future__ import annotations

import errno
import importlib
import logging
from types import ModuleType

from spfs.manager.interfaces import SwapJob

log = logging.getLogger(__name__)

SWAP_API_MODULE = "spfs.swap.api"


def _engine() -> ModuleType:
    try:
        return importlib.import_module(SWAP_API_MODULE)
    except ImportError:
        raise OSError(errno.ENOSYS, "the swap engine (spfs.swap, issue 4) is not available "
                                    "yet") from None


class SwapEngineAdapter:
    def swap(self, job: SwapJob) -> None:
        engine = _engine()
        if not hasattr(engine, "swap_mount"):
            raise OSError(errno.ENOSYS, f"{SWAP_API_MODULE} has no swap_mount()")
        engine.swap_mount(job)

    def switch(self, source: str | None, device: int | None, target: str, cgroup: str,
               ns_pid: int | None) -> None:
        engine = _engine()
        if not hasattr(engine, "switch"):
            raise OSError(errno.ENOSYS, f"{SWAP_API_MODULE} has no switch()")
        engine.switch(source=source, device=device, target=target, cgroup=cgroup,
                      ns_pid=ns_pid)
