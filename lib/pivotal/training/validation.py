"""Held-out validation loss: the training loss on images the run never trains on.

Each validation image is noised at the same ``validation_timesteps`` timesteps (spread evenly over
the noise schedule) with the same noise (drawn once, from its own seed) at every evaluation, and
the loss is the training formula (prediction type, min-SNR weights, noise offset) averaged over
images x timesteps, without gradients, dropout or the text cache, under the training autocast.
The same weights therefore always give the same number, and a change of the number between two
evaluations is the model's doing, not the random timestep's (which makes single-step training
losses swing).

An evaluation draws nothing from the training generator and restores the global random state it
runs under, so a run with validation trains exactly as one without (and resumes exactly).

Drift (``validation_drift``), the efficacy benchmark's measure (``bench/efficacy.py``): the same
loss on the validation captions *without* the trigger (the embedding names taken out: plain
prompts), of the model as trained (LoRA on, no new embedding) against the base model's (LoRA at
strength 0), at the same timesteps and noise, in %: ``100 * (trained / base - 1)``. Positive means
the bundle made the model worse at what it already drew. The base model's loss is measured once
per session (its weights never change).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from pivotal.adapters.network import LoraNetwork
from pivotal.data.dataset import DatasetItem
from pivotal.data.images import load_pixels
from pivotal.data.latent_cache import LatentCache
from pivotal.host_api import Conditioning, SizeInfo
from pivotal.text.embeddings import EmbeddingSet
from pivotal.training.losses import add_noise, diffusion_loss, min_snr_weights, sample_noise, training_target
from pivotal.training.step import StepRunner

#: added to the run's seed for the validation noise (seed + 1 initialises the embeddings)
NOISE_SEED_OFFSET = 0x7A11D


def fixed_timesteps(count: int, num_timesteps: int) -> torch.Tensor:
    """(count,) long: the middles of ``count`` equal slices of [0, num_timesteps), e.g. 4 of 1000
    -> 125, 375, 625, 875."""
    return torch.tensor([(2 * k + 1) * num_timesteps // (2 * count) for k in range(count)], dtype=torch.long)


@dataclass
class _Sample:
    """One validation image, ready to evaluate: latents (1, C, h, w) and noise (T, C, h, w), fp32 on
    the CPU; the caption with the trigger (no dropout, no shuffling) and its size conditioning."""

    latents: torch.Tensor
    noise: torch.Tensor
    caption: str
    size: SizeInfo


class Validator:
    """Measures the validation loss of the model as it is now (the LoRA attached and in eval mode)."""

    def __init__(self, items: list[DatasetItem], runner: StepRunner, cache: LatentCache | None,
                 timesteps: int, seed: int, noise_offset: float = 0.0) -> None:
        self.items = list(items)
        self.runner = runner
        self.cache = cache
        self.t = fixed_timesteps(timesteps, runner.alphas.shape[0])
        self.seed = seed
        self.noise_offset = noise_offset
        self._samples: list[_Sample] | None = None
        self._base_plain: float | None = None

    def _prepare(self) -> list[_Sample]:
        """Encode every image once (through the latent cache when there is one) and draw its fixed
        noise, in item order, from a generator of its own."""
        host, count = self.runner.host, self.t.shape[0]
        gen = torch.Generator().manual_seed(self.seed + NOISE_SEED_OFFSET)
        samples = []
        for item in self.items:
            if self.cache is not None:
                latents = self.cache.encode_batch([item], [False], host.encode_images, host.device)
            else:
                latents = host.encode_images(load_pixels(item, False).unsqueeze(0)).float()
            latents = latents.detach().float().cpu()
            noise = sample_noise(torch.Size((count, *latents.shape[1:])), gen, self.noise_offset)
            y, x = item.crop_yx
            size = SizeInfo(original=item.original_hw, crop_top_left=(y, x), target=item.target_hw)
            samples.append(_Sample(latents, noise, item.caption, size))
        return samples

    def evaluate(self) -> float:
        """Mean over images x timesteps of the weighted training loss (a float; NaN/inf when the
        model gives non-finite predictions). The caller puts the network in eval mode."""
        return self._loss(plain=False)

    def evaluate_drift(self) -> float:
        """Drift in % (see the module docstring): the loss on the plain captions (embedding names
        taken out, no embedding used) with the LoRA as trained, against the base model's (LoRA at
        strength 0, measured once). NaN when either is not finite or the base loss is 0."""
        if self._base_plain is None:
            with strength_zero(self.runner.net):
                self._base_plain = self._loss(plain=True)
        trained = self._loss(plain=True)
        base = self._base_plain
        if not (math.isfinite(trained) and math.isfinite(base)) or base <= 0:
            return math.nan
        return 100.0 * (trained / base - 1.0)

    def _loss(self, plain: bool) -> float:
        """The mean loss over the samples; ``plain``: their captions without the embedding names,
        encoded without the run's embeddings."""
        runner = self.runner
        host = runner.host
        if self._samples is None:
            self._samples = self._prepare()
        names = runner.embeddings.names()
        embeddings = EmbeddingSet() if plain else runner.embeddings
        devices = [host.device] if host.device.type == "cuda" else []
        total = 0.0
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            t = self.t.to(host.device)
            weights = min_snr_weights(self.t, runner.alphas, runner.config.min_snr_gamma, runner.prediction)
            for s in self._samples:
                count = self.t.shape[0]
                latents = s.latents.to(host.device).expand(count, *s.latents.shape[1:])
                noise = s.noise.to(host.device)
                noisy = add_noise(latents, noise, t, runner.alphas)
                target = training_target(runner.prediction, latents, noise, t, runner.alphas)
                with runner.autocast():
                    if runner.negatives and not plain:  # DreamArtist++: the guided prediction, as trained
                        pred = runner.predict(noisy, t, [s.caption] * count, [s.size] * count)
                    else:
                        caption = plain_caption(s.caption, names) if plain else s.caption
                        cond = host.encode_prompts([caption], embeddings, [s.size])
                        cond = _repeat(cond, count)
                        pred = host.predict(noisy.to(host.dtype), t, cond)
                total += float(diffusion_loss(pred, target, weights))
        return total / len(self._samples) if self._samples else math.nan


def plain_caption(caption: str, names: Sequence[str]) -> str:
    """``caption`` without the trigger words ``names`` (whole words, any case), with the commas
    and spaces they leave tidied: "mychar, a cat on a mat" -> "a cat on a mat"."""
    text = caption
    for name in names:
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    text = re.sub(r"\s+", " ", text).strip(" ,")
    return re.sub(r"\s+,", ",", text)


@contextlib.contextmanager
def strength_zero(net: LoraNetwork) -> Iterator[None]:
    """Every LoRA module of ``net`` at strength 0 (the base model) for the block, then each back
    at the strength it had."""
    modules = list(net.modules_of())
    before = [m.multiplier for m in modules]
    try:
        for m in modules:
            m.multiplier = 0.0
        yield
    finally:
        for m, value in zip(modules, before):
            m.multiplier = value


def _repeat(cond: Conditioning, count: int) -> Conditioning:
    """One prompt's conditioning (1, ...) repeated for ``count`` rows (count, ...)."""
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.repeat(count, *([1] * (x.dim() - 1)))
    return Conditioning(rows(cond.context), {k: rows(v) for k, v in cond.extra.items()})
