"""The e2e tests' shared fixture: one trained user folder per session, copied into each test's own folder; and
their order: test_cli.py first (its Ray jobs leave the machine most idle: `make test` runs the unit tests beside
the cluster tests, and they overlap there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _collection_order import order_folder
from e2e._user import train_folder

FIRST = "test_cli.py"


def pytest_collection_modifyitems(session, config, items):
    order_folder(items, Path(__file__).parent, lambda module: module != FIRST)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    return train_folder(tmp_path_factory.mktemp("trained"))
