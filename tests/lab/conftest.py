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

_names = itertools.count(1)


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
