"""Fixtures for tests that run inside the lab guest (`spfs-lab run`, see tools/run-tests)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from spfs.lab.ct import container
from spfs.lab.ct.spec import BindMount, CtState, NfsMount
from spfs.lab.env import in_guest
from tests.lab import watchdog

_names = itertools.count(1)
_items_run = itertools.count(1)
NO_FORK_VAR = "SPFS_LAB_NO_FORK"  # set to 1: run lab tests in the session process


@pytest.fixture(autouse=True)
def _only_in_guest() -> None:
    if not in_guest():
        pytest.fail("lab tests run inside the lab guest: use `make test` or "
                    "`spfs-lab run -- .venv/bin/pytest -m lab`")


@pytest.fixture
def images(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A CRIU image dir; kept in the lab run's results (logs of criu, the manager and spfs)
    so a failure can be read on the host afterwards."""
    results = os.environ.get("SPFS_LAB_RESULTS")
    if not results:
        return tmp_path / "img"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    return Path(results) / "images" / name


@pytest.fixture
def make_ct() -> Iterator[Callable[..., CtState]]:
    """Create containers for a test; every one is destroyed afterwards, pass or fail."""
    made: list[str] = []

    def make(nfs: list[str] = (), binds: list[str] = (), cgroup: str = "v2") -> CtState:
        name = f"t{next(_names)}"
        made.append(name)
        return container.create(name, [NfsMount.parse(n) for n in nfs],
                                [BindMount.parse(b) for b in binds], cgroup)

    yield make
    for name in reversed(made):
        container.destroy(name, missing_ok=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        report.sections.append(("guest kernel log (tail)", "\n".join(dmesg.splitlines()[-30:])))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Each lab test in a forked child, bounded by its timeout plus watchdog.GRACE even when
    it is stuck in the kernel (see tests/lab/watchdog.py)."""
    if not in_guest() or os.environ.get(NO_FORK_VAR) == "1" or item.get_closest_marker(
            "lab") is None:
        return None
    ordinal = next(_items_run)

    def in_child() -> None:
        global _names
        # container names unique across children (each starts from the session's counter)
        _names = itertools.count(ordinal * 100 + 1)

    watchdog.run_item(item, in_child)
    return True
