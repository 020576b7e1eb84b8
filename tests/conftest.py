"""Test the checkout's own code, whatever else is installed."""

import sys
from pathlib import Path

LIB = str(Path(__file__).resolve().parent.parent / "lib")
if LIB not in sys.path:
    sys.path.insert(0, LIB)


def pytest_collection_modifyitems(config, items) -> None:
    """The long fuzz run (marker ``fuzz``) runs only when asked for (``pytest -m fuzz``; CI does):
    the plain suite has its quick deterministic slice instead."""
    import pytest

    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz run: select it with -m fuzz (CI does)")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)
