"""Test the checkout's own code, whatever else is installed; fixtures several test files share."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

LIB = str(Path(__file__).resolve().parent.parent / "lib")
if LIB not in sys.path:
    sys.path.insert(0, LIB)


def pytest_collection_modifyitems(config, items) -> None:
    """The long fuzz run (marker ``fuzz``) runs only when asked for (``pytest -m fuzz``; CI does):
    the plain suite has its quick deterministic slice instead."""
    if "fuzz" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz run: select it with -m fuzz (CI does)")
    for item in items:
        if "fuzz" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo dataset for training tests: 4 captioned 64 px pictures of "mychar" (seed 0)."""
    from pivotal.demo.data import make_demo_dataset

    folder = tmp_path_factory.mktemp("demo_data")
    make_demo_dataset(folder, ["mychar"], count=4, size=64, seed=0)
    return folder


@pytest.fixture(scope="module")
def host():
    """The pre-trained demo sd1 model as a standalone (diffusers) host, one per test module."""
    pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")
    from pivotal.demo.host import build_demo_host

    return build_demo_host("sd1")
