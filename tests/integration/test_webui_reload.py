"""Checklist 34: the webui's "Reload UI" (Settings) pressed while a run trains. The webui closes
its server, calls the scripts-unloaded callbacks, re-runs every extension's scripts and builds a
new app in the same process. Pivotal's run must stop at its next step and restore the model;
after the reload the new app has the routes and the new page the tab once, the host is exactly as before (weights,
flags, patched forwards, attention optimization, embedding database), and a new run trains and
its bundle works in txt2img (the re-run scripts registered their callbacks once, or training and
the bundle loader would trip over their own patches).

Starts its own webui of PIVOTAL_WEBUI_DIR on PIVOTAL_WEBUI_PORT + 2 (skipped for a webui reached
at PIVOTAL_WEBUI_URL), because a reload would disturb the other tests' webui.
"""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path
from typing import Any, Iterator

import pytest
from webui_server import Webui

from conftest import EMBEDDING, needs_own_webui, own_webui

pytestmark = needs_own_webui
PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def own() -> Iterator[Webui]:
    with own_webui(2) as webui:
        yield webui


def _reload_ui_fn_index(webui: Webui) -> int:
    """The gradio event of the Settings tab's "Reload UI" button (elem_id settings_restart_gradio)."""
    config = webui.request("GET", "/config")
    ids = {c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "settings_restart_gradio"}
    assert ids, "no Reload UI button in the webui's page"
    for index, dep in enumerate(config["dependencies"]):
        targets = {t[0] if isinstance(t, (list, tuple)) else t for t in dep.get("targets", [])}
        if targets & ids:
            return index
    raise AssertionError("no event bound to the Reload UI button")


def _wait_back(webui: Webui, marks_before: int, timeout: float = 300.0) -> None:
    """Wait until the webui printed a new "Startup time:" and answers again."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sum("Startup time:" in line for line in webui.log) > marks_before:
            try:
                webui.request("GET", "/pivotal/v1/status", timeout=10)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
        time.sleep(0.5)
    raise TimeoutError("the webui did not come back after Reload UI:\n" + "\n".join(webui.log[-30:]))


def _config(dataset: Path, name: str, steps: int) -> dict[str, Any]:
    return {"config": {"data_dir": str(dataset), "output_name": name, "steps": steps, "resolution": 64,
                       "bucket_step": 16, "unet_lr": 5e-4, "embedding_lr": 5e-3, "latent_cache": "off",
                       "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}]}}


def _routes(webui: Webui) -> list[str]:
    """Pivotal's routes in the webui's OpenAPI schema."""
    paths = webui.request("GET", "/openapi.json")["paths"]
    return sorted(p for p in paths if p.startswith("/pivotal/"))


def _start_buttons(webui: Webui) -> int:
    """How many Start buttons of the Pivotal tab the page has (a tab built twice would show two)."""
    components = webui.request("GET", "/config")["components"]
    return sum(c.get("props", {}).get("elem_id") == "pivotal-start" for c in components)


def test_reload_ui_mid_run_stops_restores_and_registers_once(own: Webui, dataset: Path) -> None:
    webui = own
    before_image, _ = webui.txt2img(PROMPT)
    before_host = webui.request("GET", "/pivotal/v1/host")
    routes = _routes(webui)
    assert len(routes) >= 4 and _start_buttons(webui) == 1, routes
    fn_index = _reload_ui_fn_index(webui)

    code, body = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, "pvtreload", 100000))
    assert code == 200, body
    assert webui.wait_step(2)["state"] == "running"
    marks = sum("Startup time:" in line for line in webui.log)
    webui.request("POST", "/run/predict", {"fn_index": fn_index, "data": [], "session_hash": "pivotaltest"})
    _wait_back(webui, marks)

    snap = webui.request("GET", "/pivotal/v1/status")
    assert snap["state"] != "running" and snap["result_status"] == "interrupted" and 2 <= snap["step"] < 100000, snap
    assert webui.request("GET", "/pivotal/v1/host") == before_host
    assert webui.txt2img(PROMPT)[0] == before_image
    assert _routes(webui) == routes and _start_buttons(webui) == 1  # the new app and page have them once

    name = "pvtafterreload"
    code, body = webui.status_of("POST", "/pivotal/v1/train", _config(dataset, name, 4))
    assert code == 200, body
    assert webui.wait_run()["result_status"] == "completed"
    image, info = webui.txt2img(f"{PROMPT}, {EMBEDDING} <lora:{name}:1>")
    assert f'Lora hashes: "{name}: ' in info and image != before_image
    # The Lora extension keeps its weights merged until the next generation without it: have one
    assert webui.txt2img(PROMPT)[0] == before_image
    assert webui.request("GET", "/pivotal/v1/host") == before_host
