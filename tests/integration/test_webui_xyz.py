"""The webui's built-in X/Y/Z plot with Pivotal's axes, in a real A1111 webui over HTTP (opt-in: see
webui_server.py). The axes are found by label in ``/sdapi/v1/script-info``.

A tiny bundle is trained; a second one is its copy with the LoRA doubled. Proves: "Pivotal: bundle
part" rewrites each cell's ``<lora:…>`` tag (full / emb / base), the parts render differently, and
the base cell is pixel for pixel the webui's own ``/sdapi/v1/txt2img`` of the prompt without the
tag; "Pivotal: bundle" swaps the tag's bundle, each cell equal to a plain generation naming that
bundle; the loaded model is as it was before (``/pivotal/v1/host``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Iterator

import pytest
from webui_server import Webui
from xyz_plot import xyz_txt2img

from conftest import EMBEDDING, train_bundle

SEED, STEPS, SIZE = 5, 4, 64
TRAIN = {"resolution": 64, "bucket_step": 16, "unet_lr": 5e-4, "embedding_lr": 5e-3, "seed": 3, "steps": 6}
PROMPT = f"a photo of {EMBEDDING}"
BODY = {"steps": STEPS, "width": SIZE, "height": SIZE, "seed": SEED, "sampler_name": "Euler", "cfg_scale": 7.0}


def _doubled_copy(src: str, dst: Path) -> Path:
    """``src`` with every LoRA up weight doubled (the same embeddings), written as a Pivotal bundle."""
    from pivotal.formats.bundle import read_bundle, write_bundle
    from pivotal.formats.bundle_metadata import TrainingInfo

    bundle = read_bundle(src)
    lora = {k: (v * 2 if ".lora_up." in k else v) for k, v in bundle.lora.items()}
    write_bundle(dst, "sd1", lora, list(bundle.embeddings.values()), TrainingInfo(dst.stem))
    return dst


@pytest.fixture(scope="module")
def bundles(webui: Webui, dataset: Path) -> Iterator[list[str]]:
    name = f"pvtxyz{uuid.uuid4().hex[:6]}"
    src = Path(train_bundle(webui, dataset, name, **TRAIN)["bundle_path"])
    copy = _doubled_copy(str(src), src.with_name(f"{name}x2.safetensors"))
    webui.request("POST", "/sdapi/v1/refresh-loras")
    try:
        yield [name, copy.stem]
    finally:
        copy.unlink(missing_ok=True)


def test_the_bundle_part_axis_renders_each_part(webui: Webui, bundles: list[str]) -> None:
    from pivotal.webui.xyz_axes import PART_AXIS

    before = webui.request("GET", "/pivotal/v1/host")
    name = bundles[0]
    grid, cells = xyz_txt2img(webui, {**BODY, "prompt": f"{PROMPT} <lora:{name}:1>"},
                              (PART_AXIS, ["full", "emb", "base"]))
    assert grid[:8] == b"\x89PNG\r\n\x1a\n"
    expected = {"full": f"{PROMPT} <lora:{name}:1>", "emb": f"{PROMPT} <lora:{name}:0>", "base": PROMPT}
    by_part = {c.x: c for c in cells}
    assert {part: c.prompt for part, c in by_part.items()} == expected and all(c.seed == SEED for c in cells)
    full, emb, base = (by_part[p].image().tobytes() for p in ("full", "emb", "base"))
    assert full != base and emb != base and full != emb, "a Pivotal part did not change the picture"
    assert f'Lora hashes: "{name}: ' in by_part["full"].infotext
    plain, _info = webui.txt2img(PROMPT, seed=SEED, steps=STEPS, size=SIZE)
    assert base == _rgb(plain), "the base cell is not the webui's own generation of the prompt without the tag"
    assert webui.request("GET", "/pivotal/v1/host") == before


def test_the_bundle_axis_swaps_the_bundle(webui: Webui, bundles: list[str]) -> None:
    from pivotal.webui.xyz_axes import BUNDLE_AXIS

    before = webui.request("GET", "/pivotal/v1/host")
    grid, cells = xyz_txt2img(webui, {**BODY, "prompt": f"{PROMPT} <lora:{bundles[0]}:0.8>"}, (BUNDLE_AXIS, bundles))
    assert {c.x: c.prompt for c in cells} == {b: f"{PROMPT} <lora:{b}:0.8>" for b in bundles}
    pictures = {c.x: c.image().tobytes() for c in cells}
    assert pictures[bundles[0]] != pictures[bundles[1]], "the two bundles drew the same picture"
    for b in bundles:
        plain, _info = webui.txt2img(f"{PROMPT} <lora:{b}:0.8>", seed=SEED, steps=STEPS, size=SIZE)
        assert pictures[b] == _rgb(plain), f"the cell of {b} is not the webui's own generation of its prompt"
    webui.txt2img(PROMPT, seed=SEED, steps=STEPS, size=SIZE)  # the webui un-merges a LoRA at its next generation
    assert webui.request("GET", "/pivotal/v1/host") == before


def _rgb(png: bytes) -> bytes:
    import io

    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB").tobytes()

