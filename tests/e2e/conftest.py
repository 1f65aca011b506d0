"""The e2e tests' shared fixture: one trained user folder per session, copied into each test's own folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from e2e._user import train_folder


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    return train_folder(tmp_path_factory.mktemp("trained"))
