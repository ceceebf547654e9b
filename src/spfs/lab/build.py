"""`spfs-lab build`: everything the lab needs on disk, idempotent and cheap when done."""

from __future__ import annotations

import logging
import time

from spfs.lab.initramfs import ensure_initramfs
from spfs.lab.kernel import ensure_kernel
from spfs.lab.paths import LabPaths
from spfs.lab.workloads import ensure_workloads

log = logging.getLogger(__name__)


def build(paths: LabPaths | None = None) -> None:
    paths = paths or LabPaths.default()
    t0 = time.monotonic()
    kernel = ensure_kernel(paths)
    ensure_initramfs(paths, kernel)
    ensure_workloads(paths)
    log.info("lab ready: kernel %s (%.1f s)", kernel.version, time.monotonic() - t0)
