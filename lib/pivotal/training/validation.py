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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pivotal.data.dataset import DatasetItem
from pivotal.data.images import load_pixels
from pivotal.data.latent_cache import LatentCache
from pivotal.host_api import Conditioning, SizeInfo
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
        runner = self.runner
        host = runner.host
        if self._samples is None:
            self._samples = self._prepare()
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
                    if runner.negatives:  # DreamArtist++: the guided prediction, as training sees it
                        pred = runner.predict(noisy, t, [s.caption] * count, [s.size] * count)
                    else:
                        cond = host.encode_prompts([s.caption], runner.embeddings, [s.size])
                        cond = _repeat(cond, count)
                        pred = host.predict(noisy.to(host.dtype), t, cond)
                total += float(diffusion_loss(pred, target, weights))
        return total / len(self._samples) if self._samples else math.nan


def _repeat(cond: Conditioning, count: int) -> Conditioning:
    """One prompt's conditioning (1, ...) repeated for ``count`` rows (count, ...)."""
    def rows(x: torch.Tensor) -> torch.Tensor:
        return x.repeat(count, *([1] * (x.dim() - 1)))
    return Conditioning(rows(cond.context), {k: rows(v) for k, v in cond.extra.items()})
