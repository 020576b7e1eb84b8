"""A webui started with ``--medvram`` (its low-VRAM mode moves modules between devices on every
forward, which backward does not expect): a training run is refused with a message naming the flag
and the fix, nothing trains, and the webui keeps generating. Starts a second webui of
PIVOTAL_WEBUI_DIR on PIVOTAL_WEBUI_PORT + 1 (skipped for a webui reached at PIVOTAL_WEBUI_URL).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from webui_server import Webui

from conftest import EMBEDDING, needs_own_webui, own_webui

pytestmark = needs_own_webui


@pytest.fixture(scope="module")
def medvram() -> Iterator[Webui]:
    with own_webui(1, ("--medvram",)) as webui:
        yield webui


def test_training_is_refused_under_medvram(medvram: Webui, dataset: Path) -> None:
    before, _ = medvram.txt2img("a photo of a cat")
    config = {"data_dir": str(dataset), "output_name": "pvtmedvram", "steps": 4, "resolution": 64,
              "bucket_step": 16, "embeddings": [{"name": EMBEDDING, "vectors": 2, "init_text": "person"}]}
    code, body = medvram.status_of("POST", "/pivotal/v1/train", {"config": config})
    snap = medvram.wait_run() if code == 200 else {"state": "refused", "message": str(body), "step": 0}
    assert snap["state"] in ("failed", "refused") and snap["step"] == 0, snap
    assert "--lowvram/--medvram" in snap["message"], snap["message"]
    assert not medvram.request("GET", "/pivotal/v1/bundles")["bundles"] or all(
        b["name"] != "pvtmedvram" for b in medvram.request("GET", "/pivotal/v1/bundles")["bundles"])
    assert medvram.txt2img("a photo of a cat")[0] == before  # the webui generates as before
