"""DreamArtist++: a negative embedding per positive one, trained with classifier-free guidance in
the loss (HCP-Diffusion's description of DreamArtist++: positive and negative prompt embeddings plus
LoRA, the model's guided prediction is what the loss sees).

Each step the batch's latents are noised once and the UNet runs twice (one batch of 2B): on the
captions (the *positive* branch, with ``NAME``) and on the same captions with every ``NAME``
replaced by ``NAME-neg`` (the *negative* branch). The prediction the loss compares with the target is

    uncond + cfg · (cond − uncond)

so the negative vectors learn what guidance should push away from, as they will be used: in the
negative prompt of a generation at CFG > 1. HCP-Diffusion's example trains a separate LoRA per branch
(it merges them at generation with its own loader); here one LoRA serves both, because the webuis
apply a bundle's LoRA to the positive and the negative pass alike, and that is what it trains for.

Class images of prior preservation carry no trigger, so their two branches would be equal and the
guided prediction is their plain one: they are run once, unguided (the same number, half the work).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

from pivotal.training.config import EmbeddingSpec, TrainConfig


def negative_specs(cfg: TrainConfig) -> list[EmbeddingSpec]:
    """The negative embeddings of a DreamArtist++ run (none when it is off): ``NAME + suffix`` for
    each positive, with ``dreamartist_vectors`` vectors (0: as many as the positive) and the
    positive's init text (both start where the positive does; training pulls them apart)."""
    if not cfg.dreamartist:
        return []
    return [EmbeddingSpec(e.name + cfg.dreamartist_suffix, cfg.dreamartist_vectors or e.vectors, e.init_text)
            for e in cfg.embeddings]


def negative_pairs(cfg: TrainConfig) -> dict[str, str]:
    """{positive name: negative name} (empty when DreamArtist++ is off)."""
    return {e.name: n.name for e, n in zip(cfg.embeddings, negative_specs(cfg))}


def negative_captions(captions: Sequence[str], pairs: Mapping[str, str]) -> list[str]:
    """Each caption with every positive name (a whole word, any letter case, as prompts match names)
    replaced by its negative's. A caption without a name stays as it is."""
    if not pairs:
        return list(captions)
    # longest first, so a name that contains another is replaced whole
    names = sorted(pairs, key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Za-z0-9_-])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9_-])",
                         re.IGNORECASE)
    lower = {n.lower(): pairs[n] for n in names}
    return [pattern.sub(lambda m: lower[m.group(1).lower()], c) for c in captions]


def guided_prediction(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale · (cond − uncond)``, shapes (B, C, h, w)."""
    return uncond + float(scale) * (cond - uncond)
