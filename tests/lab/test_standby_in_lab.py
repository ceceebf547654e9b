"""criu-spfs restore with spfs-standby running, as a container host would run it: the
manager and each SPFS are forked by the standby, and the migration is the same as without."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from spfs.lab.ct import workload
from spfs.standby import DEFAULT_SOCKET, service
from tests.lab.migration import assert_all_pass, migrate, verdicts


@pytest.fixture
def standby(images: Path) -> Iterator[int]:
    log = Path(os.environ.get("SPFS_LAB_RESULTS", images.parent)) / "standby.log"
    with service.running(DEFAULT_SOCKET, log) as pid:
        yield pid


@pytest.mark.parametrize("vers", ["4.1", "3"])
def test_migration_with_the_standby(make_ct, images, standby: int, vers: str) -> None:
    ct = make_ct(nfs=[f"{vers}:a:/mnt/nfs"])
    loads = [workload.start(ct.name, "append", "/mnt/nfs/standby.log"),
             workload.start(ct.name, "mmap", "/mnt/nfs/standby.dat"),
             workload.start(ct.name, "posix", "/mnt/nfs/standby.lock")]
    try:
        workload.wait_running(loads)
        timeline = migrate(ct, images)
        steps = [s["what"] for s in timeline["steps"]]
        assert any("spfs-manager started by spfs-standby" in s for s in steps), steps
        workload.wait_progress(loads)
    finally:
        results = verdicts(loads)
    assert_all_pass(results)
    manager_log = (images / "spfs-manager" / "spfs-manager.log").read_text()
    assert "standby forked" in manager_log  # SPFS too came from the standby
    assert os.path.exists(f"/proc/{standby}")  # and it serves on after the migration
