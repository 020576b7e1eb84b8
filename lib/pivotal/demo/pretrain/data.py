"""Training data for pre-training the tiny-world model: rendered pictures and their token ids.

Pictures come from :func:`pivotal.demo.world.world_item`, so a set is fixed by its seed, count,
world spec and style mix; captions are tokenized exactly as the standalone host tokenizes prompts
(:class:`pivotal.text.inject.PromptTokenizer`: ``[BOS] words [EOS] pad...``, 77 ids, padded
with EOS for clip_l), so the model learns on the same ids it later sees.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pivotal.demo.world import BASE_STYLE, BASE_WORLD, WorldSpec, WorldStyle, world_item
from pivotal.text.inject import CONTEXT_LENGTH, PromptTokenizer

CLIP_L_PAD = 49407


@dataclass
class WorldSet:
    """``count`` pictures: ``images`` (N, 3, S, S) uint8 and their ``captions``."""

    images: torch.Tensor
    captions: list[str]

    def __len__(self) -> int:
        return len(self.captions)

    def pixels(self, index: torch.Tensor) -> torch.Tensor:
        """Pictures ``index`` (B,) as (B, 3, S, S) fp32 in [-1, 1], the VAE's input range."""
        return self.images[index].float().div_(127.5).sub_(1.0)

    def digest(self) -> str:
        """sha256 over the pixels and captions (to record exactly what a model was trained on)."""
        h = hashlib.sha256(self.images.numpy().tobytes())
        h.update("\n".join(self.captions).encode("utf-8"))
        return h.hexdigest()


def render_world_set(seed: int, count: int, spec: WorldSpec = BASE_WORLD,
                     styles: Sequence[tuple[WorldStyle, float]] = ((BASE_STYLE, 1.0),), size: int = 64) -> WorldSet:
    """Pictures ``0 .. count-1`` of the world ``seed``. ``styles``: (style, share) pairs; picture
    ``i`` takes the style whose cumulative share first exceeds ``(i * golden ratio) mod 1``, an
    even, seed-free interleaving."""
    total = sum(share for _, share in styles)
    bounds = np.cumsum([share / total for _, share in styles])
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    captions: list[str] = []
    for i in range(count):
        pick = int(np.searchsorted(bounds, (i * 0.6180339887498949) % 1.0, side="right"))
        item = world_item(seed, i, spec, styles[min(pick, len(styles) - 1)][0], size)
        images[i] = np.asarray(item.image, dtype=np.uint8)
        captions.append(item.caption)
    return WorldSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions)


def prompt_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(N, 77) int64 token ids of ``prompts`` for clip_l, as the standalone host builds them."""
    pt = PromptTokenizer(tokenizer, {}, pad_id=CLIP_L_PAD, max_length=CONTEXT_LENGTH)
    unique = sorted(set(prompts))
    rows = dict(zip(unique, pt.build_batch(unique).ids)) if unique else {}
    if not prompts:
        return torch.empty(0, CONTEXT_LENGTH, dtype=torch.int64)
    return torch.stack([rows[p] for p in prompts])
