"""Proof that a tiny-world model follows its prompts, measured through the standalone host (the
same prompt encoding, UNet call and sampler that training and ``pivotal generate`` use):

* **loss gap**: the denoising loss on pictures it never saw, with their own captions versus the
  same captions shuffled among the pictures (and versus the empty prompt). A model that ignores
  its text scores the same on all three;
* **sampling accuracy**: one-object prompts are sampled and each image read back by
  :func:`pivotal.demo.world_read.read_picture` (background colour, object colour, place, shape).
  The same readings scored against *another* prompt give the chance level of that measure.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from pivotal.demo.pretrain.data import render_world_set
from pivotal.demo.world import BASE_WORLD, caption, sample_scene
from pivotal.demo.world_read import read_picture
from pivotal.text.embeddings import EmbeddingSet

#: World seed of the pictures the checks use: none of them was trained on.
CHECK_SEED = 1000
TIMESTEPS = (50, 200, 400, 600, 800)
ATTRIBUTES = ("background", "colour", "place", "shape")


@torch.no_grad()
def loss_gap(host: Any, count: int = 256, seed: int = CHECK_SEED, batch_size: int = 64) -> dict[str, float]:
    """Mean epsilon MSE over ``count`` unseen pictures x :data:`TIMESTEPS`, with the right,
    shuffled and empty captions (the same noise for all three). ``gap`` = shuffled - right."""
    world = render_world_set(seed, count, BASE_WORLD)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    shuffled = [world.captions[order[(order.index(i) + 1) % count]] for i in range(count)]  # never its own
    acp = host.alphas_cumprod().cpu()
    gen = torch.Generator().manual_seed(seed)
    totals = {"right": 0.0, "shuffled": 0.0, "empty": 0.0}
    empty = EmbeddingSet()
    for start in range(0, count, batch_size):
        index = torch.arange(start, min(count, start + batch_size))
        latents = host.encode_images(world.pixels(index))
        prompts = {"right": [world.captions[i] for i in index], "shuffled": [shuffled[i] for i in index],
                   "empty": [""] * len(index)}
        conds = {k: host.encode_prompts(v, empty) for k, v in prompts.items()}
        for t in TIMESTEPS:
            noise = torch.randn(latents.shape, generator=gen)
            a = acp[t]
            x = a.sqrt() * latents + (1 - a).sqrt() * noise
            steps = torch.full((len(index),), t, dtype=torch.long)
            for k, cond in conds.items():
                totals[k] += float((host.predict(x, steps, cond).cpu() - noise).square().mean(dim=(1, 2, 3)).sum())
    n = count * len(TIMESTEPS)
    out = {k: v / n for k, v in totals.items()}
    out["gap"] = out["shuffled"] - out["right"]
    out["relative_gap"] = out["gap"] / out["shuffled"]
    return out


def check_prompts(count: int, seed: int = CHECK_SEED + 1) -> list[tuple[str, Any]]:
    """``count`` one-object (prompt, scene) pairs of the base world."""
    rng = random.Random(f"pivotal-check:{seed}")
    scenes = [sample_scene(rng, BASE_WORLD, objects=1) for _ in range(count)]
    return [(caption(s), s) for s in scenes]


def _score(reading: Any, scene: Any) -> dict[str, bool]:
    obj = scene.objects[0]
    return {"background": reading.background == scene.background, "colour": reading.colour == obj.colour,
            "place": reading.place == obj.place, "shape": reading.shape == obj.shape}


def sampling_accuracy(host: Any, count: int = 64, steps: int = 20, guidance: float = 4.0,
                      seed: int = CHECK_SEED + 1, keep_images: bool = False) -> dict[str, Any]:
    """Sample one image per prompt of :func:`check_prompts` and read it back. Returns the share
    of images whose background / object colour / place / shape match their prompt, of images
    matching on background + colour + place ("all3") and on all four ("all4"); the same scores
    against the next prompt's scene (``chance``); and, with ``keep_images``, the images."""
    pairs = check_prompts(count, seed)
    images = [host.generate(p, "", EmbeddingSet(), steps, seed + i, 64, 64, guidance) for i, (p, _) in enumerate(pairs)]
    readings = [read_picture(im) for im in images]
    right = [_score(r, s) for r, (_, s) in zip(readings, pairs)]
    other = [_score(r, pairs[(i + 1) % count][1]) for i, r in enumerate(readings)]

    def shares(scores: Sequence[dict[str, bool]]) -> dict[str, float]:
        out = {a: sum(s[a] for s in scores) / len(scores) for a in ATTRIBUTES}
        out["all3"] = sum(all(s[a] for a in ATTRIBUTES[:3]) for s in scores) / len(scores)
        out["all4"] = sum(all(s.values()) for s in scores) / len(scores)
        return out

    result: dict[str, Any] = {"count": count, "steps": steps, "guidance": guidance,
                              "accuracy": shares(right), "chance": shares(other),
                              "prompts": [p for p, _ in pairs]}
    if keep_images:
        result["images"] = images
    return result


def contact_sheet(images: Sequence[Any], columns: int = 8, gap: int = 2) -> Any:
    """One PIL image laying ``images`` (equal sizes) out in rows of ``columns``."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + gap) - gap, rows * (h + gap) - gap), (128, 128, 128))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * (w + gap), (i // columns) * (h + gap)))
    return sheet
