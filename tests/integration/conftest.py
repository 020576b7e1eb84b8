"""Fixtures of the opt-in real-webui tests (see webui_server.py for the environment variables)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import pytest
from webui_server import Webui, configuration_problem, start_or_reach, start_webui

EMBEDDING = "pvtchar"
#: an SDXL checkpoint the webui lists (e.g. a tiny random one); the SDXL tests switch to it and back
SDXL_CHECKPOINT = os.environ.get("PIVOTAL_WEBUI_SDXL_CHECKPOINT", "")
SDXL_MISSING = "set PIVOTAL_WEBUI_SDXL_CHECKPOINT to an SDXL checkpoint the webui lists (e.g. tiny-sdxl.safetensors)"


def train_bundle(webui: Webui, dataset: Path, name: str, **settings: Any) -> dict[str, Any]:
    """Train bundle ``name`` on ``dataset`` through ``POST /pivotal/v1/train`` (embedding
    EMBEDDING, 2 vectors) and wait for it; the run's final status."""
    body = {"config": {"data_dir": str(dataset), "output_name": name,
                       "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}], **settings}}
    code, started = webui.status_of("POST", "/pivotal/v1/train", body)
    assert code == 200, started
    snap = webui.wait_run()
    assert snap["result_status"] == "completed", snap["message"]
    return snap


@contextlib.contextmanager
def checkpoint(webui: Webui, name: str) -> Iterator[Webui]:
    """The webui with checkpoint ``name`` loaded for the block, the previous one again after it."""
    previous = webui.request("GET", "/sdapi/v1/options")["sd_model_checkpoint"]
    webui.request("POST", "/sdapi/v1/refresh-checkpoints")
    webui.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": name})
    try:
        yield webui
    finally:
        webui.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": previous})


#: for tests that start a webui of their own (a reload or other flags would disturb the shared one)
needs_own_webui = pytest.mark.skipif(
    bool(os.environ.get("PIVOTAL_WEBUI_URL")) or not os.environ.get("PIVOTAL_WEBUI_DIR"),
    reason="starts its own webui: needs PIVOTAL_WEBUI_DIR + PIVOTAL_WEBUI_PYTHON")


@contextlib.contextmanager
def own_webui(port_offset: int, extra_args: tuple[str, ...] = ()) -> Iterator[Webui]:
    """A webui of PIVOTAL_WEBUI_DIR on PIVOTAL_WEBUI_PORT + ``port_offset``, its model loaded; stopped after."""
    webui = start_webui(int(os.environ.get("PIVOTAL_WEBUI_PORT", "7871")) + port_offset, extra_args)
    try:
        webui.request("GET", "/pivotal/v1/host", timeout=300)  # waits for the model
        yield webui
    finally:
        webui.stop()


#: test files that drive Forge / reForge, configured by their own variables (see test_forge_family.py)
FORGE_FAMILY_FILES = ("test_forge_family",)


def pytest_collection_modifyitems(items: list) -> None:
    problem = configuration_problem()
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
            if problem and not any(name in str(item.fspath) for name in FORGE_FAMILY_FILES):
                item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture(scope="session")
def webui() -> Iterator[Webui]:
    server = start_or_reach()
    try:
        server.request("GET", "/pivotal/v1/host", timeout=300)  # waits for the model to be loaded
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six tiny captioned images of the synthetic demo concept, captions naming the embedding."""
    from pivotal.demo.data import make_demo_dataset

    folder = tmp_path_factory.mktemp("pivotal-webui-data")
    make_demo_dataset(folder, [EMBEDDING], count=6, size=64, seed=0)
    return folder
