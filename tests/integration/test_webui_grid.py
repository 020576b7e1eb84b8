"""The ablation grid in a real A1111 webui, over HTTP only (opt-in: see webui_server.py).

A tiny bundle is trained, then ``POST /pivotal/v1/grid`` renders 2 rows (one prompt, one in a new
context) × the five columns through the webui's own txt2img. Proves: the sheet and its record are
saved under the webui's outputs; each column's prompt carries the right ``<lora:…>`` tag; the whole
bundle changes the picture; the base column is pixel for pixel the webui's own ``/sdapi/v1/txt2img``
of the same prompt, seed, size, steps, sampler and CFG (so the grid renders as a user's generation
does); and the loaded model is as it was before (``/pivotal/v1/host``).
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from webui_server import Webui

from conftest import EMBEDDING, train_bundle

SEED, STEPS, SIZE = 11, 4, 64
TRAIN = {"resolution": 64, "bucket_step": 16, "unet_lr": 5e-4, "embedding_lr": 5e-3, "preview_steps": 4,
         "seed": 3, "steps": 6}


def _cell(sheet: Any, cell: dict) -> Any:
    """A cell's pixels back at the size the webui rendered (the sheet enlarges small cells by a
    whole factor, nearest neighbour)."""
    from PIL import Image

    box = cell["box"]
    crop = sheet.crop((box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]))
    return crop.resize(tuple(cell["size"]), Image.Resampling.NEAREST).convert("RGB")


def _pixels(image: Any) -> bytes:
    return bytes(image.tobytes())


@pytest.fixture(scope="module")
def bundle(webui: Webui, dataset: Path) -> str:
    name = f"pvtgrid{uuid.uuid4().hex[:6]}"
    train_bundle(webui, dataset, name, **TRAIN)
    return name


def test_grid_renders_each_part_through_the_webui_txt2img(webui: Webui, bundle: str) -> None:
    from PIL import Image

    before = webui.request("GET", "/pivotal/v1/host")
    prompt = f"a photo of {EMBEDDING}"
    out = webui.request("POST", "/pivotal/v1/grid", {
        "bundle": bundle, "prompts": [prompt], "auto_prompts": 1, "steps": STEPS, "cfg_scale": 7.0,
        "sampler_name": "Euler", "width": SIZE, "height": SIZE, "seed": SEED, "negative_prompt": ""})
    assert out["interrupted"] is False
    png, js = Path(out["png"]), Path(out["json"])
    assert png.is_file() and js.is_file() and png.parent.name == "grids" and png.name.startswith(f"{bundle}-")
    record = json.loads(js.read_text(encoding="utf-8"))
    assert record == out["record"] and record["complete"]
    assert record["columns"] == ["full", "unet", "te", "emb", "base"] and len(record["rows"]) == 2
    assert record["rows"][0] == prompt and EMBEDDING in record["rows"][1] and record["seeds"] == [SEED, SEED + 1]
    cells = {(c["row"], c["column"]): c for c in record["cells"]}
    assert len(cells) == 2 * 5
    for r, row in enumerate(record["rows"]):
        expected = {"full": f"{row} <lora:{bundle}:1>", "unet": f"{row} <lora:{bundle}:te=0:unet=1>",
                    "te": f"{row} <lora:{bundle}:te=1:unet=0>", "emb": f"{row} <lora:{bundle}:0>", "base": row}
        for column, text in expected.items():
            assert cells[(r, column)]["prompt"] == text
            assert cells[(r, column)]["seed"] == SEED + r
    assert f'Lora hashes: "{bundle}: ' in cells[(0, "full")]["infotext"]

    sheet = Image.open(png)
    sheet.load()
    full, base = _cell(sheet, cells[(0, "full")]), _cell(sheet, cells[(0, "base")])
    assert full.size == base.size == (SIZE, SIZE)
    assert _pixels(full) != _pixels(base), "the whole bundle did not change the picture"
    # the base column is the webui's own generation of the same prompt and settings
    plain, _info = webui.txt2img(prompt, seed=SEED, steps=STEPS, size=SIZE)
    assert _pixels(base) == _pixels(Image.open(io.BytesIO(plain)).convert("RGB"))

    assert webui.request("GET", "/pivotal/v1/host") == before


def test_grid_refuses_bad_requests_by_field(webui: Webui, bundle: str) -> None:
    code, body = webui.status_of("POST", "/pivotal/v1/grid", {"bundle": "no-such-bundle", "prompts": ["x"]})
    assert code == 404 and "bundle" in body["detail"]
    code, body = webui.status_of("POST", "/pivotal/v1/grid", {"bundle": bundle, "columns": ["lora"]})
    assert code == 400 and "columns" in body["detail"]
