"""The order of one test folder's modules within a session's collection (the e2e and integration conftests)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

__all__ = ["module_name", "order_folder"]


def module_name(item: pytest.Item) -> str:
    return Path(str(item.fspath)).name


def order_folder(items: list[pytest.Item], folder: Path, rank: Callable[[str], int]) -> list[pytest.Item]:
    """Stable-sort, in place, the items of the modules directly in `folder` by `rank(module file name)`, in the
    places the folder's items held (other folders' items stay where they are); return them in their new order."""
    places = [i for i, item in enumerate(items) if Path(str(item.fspath)).parent == folder]
    ordered = sorted((items[i] for i in places), key=lambda item: rank(module_name(item)))
    for i, item in zip(places, ordered):
        items[i] = item
    return ordered
