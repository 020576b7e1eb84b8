"""The sd1 demo really learns its held-out character: ``pivotal app --demo``'s own dataset and
settings, trained on the pre-trained tiny-world model, then sampled with the bundle on backgrounds
none of the training pictures had. The pictures are read back (:mod:`pivotal.demo.world_read`):
with the bundle the object takes the character's colours (orange, striped purple); without it the
model draws something else for the same prompt (mostly a white blob). This is the automatic form of
"train in the Train tab, then prompt the Generate tab with the embedding name"."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # trains the demo for its full 300 steps, then samples 16 pictures

pytest.importorskip("diffusers", reason="the demo model's UNet and VAE are diffusers modules")

from pivotal.demo.world import COLOURS, EXAMPLE_CHARACTER  # noqa: E402
from pivotal.inference.generate import generate_image  # noqa: E402

PLACES = ("top left", "bottom right")
from pivotal.demo.world_read import read_picture  # noqa: E402

SEEDS = range(4)
#: Share of pictures (with the bundle) whose object reads as one of the character's colours, and
#: how far above the share without the bundle it must be. The shipped model (v2, 300 steps)
#: measures 1.0 against 0.125 (README, "The tiny-world demo model").
MIN_WITH_BUNDLE = 0.75
MIN_LIFT = 0.4


def _training_backgrounds(data_dir: Path) -> set[str]:
    words = " ".join(p.read_text(encoding="utf-8") for p in data_dir.glob("*.txt"))
    return {c for c in COLOURS if f"{c} background" in words}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from pivotal.demo.host import build_demo_host
    from pivotal.training.trainer import train
    from pivotal.ui.app import demo_setup

    out = tmp_path_factory.mktemp("demo")
    base, data_dir = demo_setup(out)
    base.preview_every = 0  # previews cost time and prove nothing here
    host = build_demo_host("sd1", device="cpu")
    result = train(base.validate(), host, lambda event: None, threading.Event())
    assert result.status == "completed", result.summary()
    return {"host": host, "out": out, "data_dir": Path(data_dir), "result": result}


def test_the_demo_character_appears_on_new_backgrounds(trained: dict[str, Any]) -> None:
    host, out = trained["host"], trained["out"]
    seen = _training_backgrounds(trained["data_dir"])
    new = [c for c in COLOURS if c not in seen and c not in (EXAMPLE_CHARACTER.colour, EXAMPLE_CHARACTER.accent)]
    assert len(new) >= 2, f"the demo dataset used nearly every background ({sorted(seen)}): no unseen ones left"
    colours = (EXAMPLE_CHARACTER.colour, EXAMPLE_CHARACTER.accent)
    counts = {"bundle": 0, "base": 0, "background": 0, "main colour": 0}
    total = 0
    readings = []
    for background in new:
        for seed in SEEDS:
            # worded like the training captions (and the Generate tab's default prompt): with a place
            prompt = f"{EXAMPLE_CHARACTER.name} on a {background} background, {PLACES[seed % len(PLACES)]}"
            total += 1
            for key, text in (("bundle", f"{prompt} <lora:pivotal:1>"), ("base", prompt)):
                image, info = generate_image(host, text, "", [str(out)], 12, seed, 64, 64, 4.0)
                reading = read_picture(image)
                readings.append((key, background, seed, reading))
                counts[key] += reading.colour in colours
                if key == "bundle":
                    counts["main colour"] += reading.colour == EXAMPLE_CHARACTER.colour
                    assert info["embeddings"] == [EXAMPLE_CHARACTER.name]
                    counts["background"] += reading.background == background
    shares = {k: v / total for k, v in counts.items()}
    detail = f"{shares}; readings: {[(k, b, s, r.colour, r.background) for k, b, s, r in readings]}"
    assert shares["bundle"] >= MIN_WITH_BUNDLE, detail
    assert shares["bundle"] - shares["base"] >= MIN_LIFT, detail
    assert shares["main colour"] >= 0.25, detail  # not only the purple a bare unknown word often gets
    assert shares["background"] >= 0.75, detail  # the prompt still decides the rest of the picture


def test_the_ablation_grid_shows_where_the_character_comes_from(trained: dict[str, Any]) -> None:
    """The grid's cells read back from the sheet itself: the character's colours in the full-bundle
    and embeddings-only columns, not in the base column (names as plain text)."""
    from PIL import Image

    from pivotal.demo.data import GRID_CONTEXTS
    from pivotal.inference.grid import bundle_grid_plan, host_renderer, render_grid
    from pivotal.inference.grid_sheet import save_grid

    host, out = trained["host"], trained["out"]
    plan = bundle_grid_plan(str(out / "pivotal.safetensors"), [], auto_prompts=4, contexts=GRID_CONTEXTS)
    assert len(plan.rows) == 4, plan.rows  # backgrounds the demo pictures never had
    png, record_path = save_grid(out / "grid.png", render_grid(plan, host_renderer(host, [str(out)], 12, 64, 64, 4.0)))
    record = __import__("json").loads(record_path.read_text(encoding="utf-8"))
    colours = (EXAMPLE_CHARACTER.colour, EXAMPLE_CHARACTER.accent)
    hits: dict[str, int] = {c: 0 for c in plan.columns}
    with Image.open(png) as sheet:
        for cell in record["cells"]:
            box = cell["box"]
            crop = sheet.convert("RGB").crop((box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]))
            hits[cell["column"]] += read_picture(crop.resize(tuple(cell["size"]), Image.NEAREST)).colour in colours
    rows = len(plan.rows)
    assert hits["full"] >= rows - 1 and hits["emb"] >= rows - 1, hits
    assert hits["base"] <= 1, hits
