"""Fixtures of the manager tests: a private-mount-namespace "container", freezer cgroups (v1
and v2) and a live spfs-manager daemon.  Everything is torn down even when a test fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from manager_helpers import (CGROUP_V2, FREEZER_V1, Cgroup, Container, Daemon, kill_and_reap,
                             start_daemon, stop_daemon, unmount_below, wait_for)


@pytest.fixture
def container(tmp_path: Path) -> Iterator[Container]:
    base = tmp_path / "ct"
    base.mkdir()
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "--",
                             sys.executable, "-c", "import time; time.sleep(600)"])
    ct = Container(proc, base)
    try:
        own = os.stat("/proc/self/ns/mnt").st_ino
        wait_for(lambda: os.stat(f"/proc/{proc.pid}/ns/mnt").st_ino != own
                 and "python" in Path(f"/proc/{proc.pid}/cmdline").read_text(),
                 what="container start")
        yield ct
    finally:
        for worker in ct.workers:
            kill_and_reap(worker)
        kill_and_reap(proc)
        unmount_below(tmp_path)


def _make_cgroup(version: str) -> Iterator[Cgroup]:
    base = FREEZER_V1 if version == "v1" else CGROUP_V2
    path = base / f"spfs-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    cg = Cgroup(path, version)
    try:
        yield cg
    finally:
        cg.thaw()
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                (base / "cgroup.procs").write_text(pid)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while True:
            try:
                path.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture(params=["v1", "v2"])
def cgroup(request: pytest.FixtureRequest) -> Iterator[Cgroup]:
    yield from _make_cgroup(request.param)


@pytest.fixture
def cgroup_v1() -> Iterator[Cgroup]:
    yield from _make_cgroup("v1")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path)
    try:
        yield d
    finally:
        stop_daemon(d)
        unmount_below(tmp_path)
