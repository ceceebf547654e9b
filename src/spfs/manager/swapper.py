"""The swap engine (issue 4) behind the manager's ReferenceSwapper interface.

If spfs.swap.api cannot be imported every swap fails with ENOSYS, which the replace pipeline
treats like any other failure of the SWAPPING phase (rollback: SPFS stays in place, proxying).
"""

from __future__ import annotations

import errno
import importlib
import logging
from types import ModuleType
from typing import Any

from spfs.manager.interfaces import SwapJob

log = logging.getLogger(__name__)

SWAP_API_MODULE = "spfs.swap.api"


def _engine() -> ModuleType:
    try:
        return importlib.import_module(SWAP_API_MODULE)
    except ImportError:
        raise OSError(errno.ENOSYS, "the swap engine (spfs.swap, issue 4) is not available "
                                    "yet") from None


def host_view(target_pid: int | None, path: str) -> str:
    """A path of the container as the manager can open it."""
    return path if target_pid is None else f"/proc/{target_pid}/root{path}"


class SwapEngineAdapter:
    def __init__(self, timeout: float = 5.0) -> None:
        self.timeout = timeout

    def swap(self, job: SwapJob) -> dict[str, Any]:
        """Move every reference of the frozen cgroup's tasks from SPFS to the real fs.

        References the engine cannot move stay on SPFS, which keeps proxying them (the C
        manager's safety net too); they are listed in the report."""
        engine = _engine()
        source = host_view(job.target.pid if job.target else None, job.spfs_paths[0])
        report = engine.switch(source, job.real_root, cgroup=job.cgroup, freeze=True,
                               timeout=self.timeout, allow_unmovable=True)
        result = report.as_dict()
        if not report.ok:
            raise OSError(errno.EIO, f"swap engine: {report.error}")
        if report.unmovable:
            log.warning("%d references stay on SPFS: %s", len(report.unmovable),
                        report.unmovable[:5])
        return result

    def switch(self, source: str | None, device: int | None, target: str, cgroup: str,
               ns_pid: int | None) -> dict[str, Any]:
        engine = _engine()
        if source is None:
            raise OSError(errno.ENOTSUP, "switch by device= is not supported by the swap "
                                         "engine: give source=")
        report = engine.switch(host_view(ns_pid, source), host_view(ns_pid, target),
                               cgroup=cgroup, freeze=True, timeout=self.timeout)
        if not report.ok:
            raise OSError(errno.EIO, f"swap engine: {report.error}")
        return report.as_dict()
