"""Shared pytest configuration: tests under tests/lab/ run inside the lab guest."""

from pathlib import Path

import pytest

from spfs.sys import forkserver

LAB_DIR = Path(__file__).parent / "lab"


def pytest_configure(config: pytest.Config) -> None:
    # As spfs-manager and spfs do at start: every worker the code under test forks (namespace
    # work, guards, watchdogs, donors) comes from a server made while we have one thread.
    forkserver.start()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if LAB_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lab)
