"""Training of the tiny-world reward's scorer (:class:`pivotal.demo.reward.WorldScorer`) on rendered
one-object pictures of the world, and the writing of its weight file.

The pictures are renders, never the model's samples: the reward must not be fitted to the model it
later judges, nor to the reader that measures the result. Each batch is augmented toward what a
decoded sample looks like (a little blur, grain, brightness wobble), so the scorer reads samples as
well as renders. Deterministic from the seed on one thread.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pivotal.demo.reward import CLASSES, METADATA_KEY, SIZE, WorldScorer
from pivotal.demo.world import BASE_WORLD, PLACES, render, sample_scene

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ScorerSettings:
    seed: int = 0
    pictures: int = 6000
    steps: int = 1500
    batch: int = 64
    lr: float = 3e-3
    width: int = 16
    hidden: int = 32


def one_object_set(seed: int, count: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(images (N, 3, 64, 64) fp32 in [0, 1], {attribute: (N,) class index}) of ``count`` one-object
    scenes of the base world (scene ``i`` drawn from a generator seeded by ``seed`` and ``i``)."""
    images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    labels: dict[str, list[int]] = {k: [] for k in CLASSES}
    for i in range(count):
        rng = random.Random(f"pivotal-reward:{seed}:{i}")
        scene = sample_scene(rng, BASE_WORLD, objects=1)
        images[i] = np.asarray(render(scene, SIZE, SIZE), dtype=np.uint8)
        obj = scene.objects[0]
        values = {"background": scene.background, "colour": obj.colour, "shape": obj.shape, "place": obj.place}
        for k, v in values.items():
            labels[k].append(CLASSES[k].index(v))
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return pixels, {k: torch.tensor(v) for k, v in labels.items()}


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur (a 3x3 box mixed in by a random share), grain and a brightness wobble per picture."""
    b = x.shape[0]
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=gen)
    x = (1 - mix) * x + mix * blur
    x = x + 0.04 * torch.rand(b, 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    x = x * (1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5))
    return x.clamp(0, 1)


def train_scorer(settings: ScorerSettings = ScorerSettings(), log: Any = None) -> tuple[WorldScorer, dict[str, Any]]:
    """A trained scorer and its report (settings, accuracy per attribute on unseen renders)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = WorldScorer(settings.width, settings.hidden)
    images, labels = one_object_set(settings.seed, settings.pictures)
    gen = torch.Generator().manual_seed(settings.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    for step in range(settings.steps):
        lr = settings.lr * 0.5 * (1 + np.cos(np.pi * step / settings.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, settings.pictures, (settings.batch,), generator=gen)
        out = model(augment(images[idx], gen))
        loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in CLASSES)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        if log is not None and (step + 1) % 250 == 0:
            log(f"step {step + 1}/{settings.steps} loss {float(loss.detach()):.4f}")
    model.eval().requires_grad_(False)
    report = {"settings": asdict(settings), "accuracy": scorer_accuracy(model, settings.seed + 1, 1000)}
    return model, report


@torch.no_grad()
def scorer_accuracy(model: WorldScorer, seed: int, count: int) -> dict[str, float]:
    """Share of ``count`` unseen renders whose every attribute the scorer reads right, per attribute."""
    images, labels = one_object_set(seed, count)
    out = model(images)
    return {k: float((out[k].argmax(-1) == labels[k]).float().mean()) for k in CLASSES}


def write_scorer(model: WorldScorer, report: dict[str, Any], path: str | Path) -> None:
    """The weight file (fp16 tensors; metadata: sizes and the report), written atomically."""
    from pivotal.formats.safetensors_io import atomic_save

    s = report["settings"]
    meta = {"format": FORMAT_VERSION, "width": s["width"], "hidden": s["hidden"], "report": report,
            "places": list(PLACES)}
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    atomic_save(Path(path), tensors, {METADATA_KEY: json.dumps(meta, sort_keys=True)})
