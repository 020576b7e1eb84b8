"""Training outside Pivotal's trainer, for methods it does not have: a webui hypernetwork and
DreamBooth (the whole UNet fine-tuned, text encoder frozen, with prior preservation).

The loop is Pivotal's objective, step for step, so only the method differs from the other rows:
batches of ``batch_size`` drawn by a seeded shuffle per epoch, timesteps uniform over the 1000-step
schedule, epsilon targets, min-SNR-5 weighting, AdamW (betas 0.9/0.999, weight decay 1e-2),
gradients clipped at norm 1, constant LR, fp32. Captions are encoded as plain text (no embeddings).
With ``prior`` (class latents and their prompt) each step adds the loss of a class batch of the
same size, times ``prior_weight`` (diffusers' ``train_dreambooth``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from pivotal.host_api import Conditioning
from pivotal.hosts.diffusers.host import DiffusersHost
from pivotal.text.embeddings import EmbeddingSet
from pivotal.training.losses import add_noise, diffusion_loss, min_snr_weights, sample_noise, sample_timesteps


@dataclass(frozen=True)
class DirectSettings:
    steps: int
    lr: float
    batch_size: int = 4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 5.0
    seed: int = 0
    prior_weight: float = 1.0


def image_latents(host: DiffusersHost, images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 4, h, w) latents of RGB pictures."""
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                          for im in images]) / 127.5 - 1.0
    return host.encode_images(pixels.to(host.device)).cpu()


def read_folder(folder: Path) -> tuple[list[Image.Image], list[str]]:
    """The ``NNN.png`` + ``NNN.txt`` pairs of a training folder, in name order."""
    pngs = sorted(folder.glob("*.png"))
    return ([Image.open(p).convert("RGB") for p in pngs],
            [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in pngs])


class _Batches:
    """Index batches: a seeded permutation per epoch, cut into ``size`` (the last partial one dropped)."""

    def __init__(self, count: int, size: int, gen: torch.Generator) -> None:
        self.count, self.size, self.gen, self.queue = count, min(size, count), gen, []  # type: ignore[var-annotated]

    def next(self) -> list[int]:
        if len(self.queue) < self.size:
            self.queue = torch.randperm(self.count, generator=self.gen).tolist()
        out, self.queue = self.queue[:self.size], self.queue[self.size:]
        return out


def _step_loss(host: DiffusersHost, latents: torch.Tensor, cond_context: torch.Tensor, gen: torch.Generator,
               gamma: float) -> torch.Tensor:
    alphas = host.alphas_cumprod().cpu()
    t = sample_timesteps(latents.shape[0], alphas.shape[0], gen)
    noise = sample_noise(latents.shape, gen)
    noisy = add_noise(latents, noise, t, alphas)
    pred = host.predict(noisy, t, Conditioning(cond_context, {}))
    return diffusion_loss(pred, noise.to(pred.device), min_snr_weights(t, alphas, gamma, "epsilon"))


def train_direct(host: DiffusersHost, folder: Path, params: Callable[[], list[torch.nn.Parameter]],
                 settings: DirectSettings, applied: Callable[[], ContextManager[None]] = contextlib.nullcontext,
                 prior: tuple[torch.Tensor, str] | None = None) -> list[float]:
    """Train ``params()`` (called inside the training session, where every host weight is frozen
    first; the returned parameters get requires_grad) on the folder's pictures with ``applied()``
    active; returns the seconds of each step. The caller saves what trained."""
    images, captions = read_folder(folder)
    latents = image_latents(host, images)
    gen = torch.Generator().manual_seed(settings.seed)
    batches = _Batches(len(captions), settings.batch_size, gen)
    with torch.no_grad():  # the text encoder is frozen and has no dropout: encode once
        context = host.encode_prompts(captions, EmbeddingSet()).context.detach()
        prior_context = (host.encode_prompts([prior[1]], EmbeddingSet()).context.detach() if prior else None)
    prior_batches = _Batches(prior[0].shape[0], settings.batch_size, gen) if prior else None
    seconds: list[float] = []
    with host.training_session(gradient_checkpointing=False), applied():
        trained = params()
        for p in trained:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(trained, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=settings.weight_decay)
        for _ in range(settings.steps):
            t0 = time.perf_counter()
            idx = batches.next()
            loss = _step_loss(host, latents[idx], context[idx], gen, settings.min_snr_gamma)
            if prior is not None and prior_batches is not None and prior_context is not None:
                pidx = prior_batches.next()
                ctx = prior_context.expand(len(pidx), *prior_context.shape[1:])
                loss = loss + settings.prior_weight * _step_loss(host, prior[0][pidx], ctx, gen,
                                                                 settings.min_snr_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if settings.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trained, settings.max_grad_norm)
            opt.step()
            seconds.append(time.perf_counter() - t0)
    return seconds


@contextlib.contextmanager
def unet_weights(unet: torch.nn.Module, state: dict[str, torch.Tensor]) -> Iterator[None]:
    """``unet`` with ``state`` loaded for the block; its own weights are put back exactly after."""
    saved = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    try:
        with torch.no_grad():
            unet.load_state_dict(state)
        yield
    finally:
        with torch.no_grad():
            unet.load_state_dict(saved)
