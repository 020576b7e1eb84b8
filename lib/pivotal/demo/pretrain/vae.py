"""Stage 1 of pre-training the tiny-world model: the VAE, then the latents of the training set.

The VAE is trained as SD's was, minus the perceptual and adversarial terms: reconstruction
(L1 + MSE on pixels in [-1, 1]) of a latent sampled from the posterior, plus a small KL pull
toward N(0, 1). Three things make it learn in minutes on a CPU rather than hours:

* most steps see random 32 px crops (on the latent grid) of the 64 px pictures, a quarter of the
  work per picture for the same content per latent cell (the network is convolutional); the last
  steps see whole pictures;
* a *colour guide* pulls the latent mean toward the 8x8 average colour of its cell plus the
  cell's contrast, fading (cosine) to a small weight: the encoder starts from an obvious code
  instead of searching for one, and the latents stay image-like, as SD's are;
* errors on object pixels (far from the picture's median colour) weigh ``object_weight`` times
  more: objects are a small share of the pixels but what the captions talk about (SD's VAE got
  the same emphasis on structure from its perceptual loss);
* the posterior's log-variance starts at ``logvar_init`` (bias of the encoder's last conv), so
  early reconstructions are not drowned in sampling noise of std 1.

The latent scaling factor is then measured as SD did: 1 / std of the latents of the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pivotal.demo.pretrain.data import WorldSet

Log = Callable[[str], None]


@dataclass(frozen=True)
class VaeSettings:
    crop_steps: int = 1200    # steps on random ``crop`` px crops
    crop: int = 32
    steps: int = 60           # then steps on whole pictures
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    kl_weight: float = 1e-4   # per latent element
    guide_weight: float = 1.0
    guide_floor: float = 0.1  # the guide's weight fades to guide_floor x guide_weight
    logvar_init: float = -6.0
    object_weight: float = 5.0  # objects are a small share of the pixels but all of the meaning
    seed: int = 1


def lr_at(step: int, steps: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine down to ``floor * peak``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def colour_guide(pixels: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(B, 4, H/f, W/f): each latent cell's average RGB and its contrast (2 x the variance of
    the cell's grey levels), of pixels (B, 3, H, W) in [-1, 1]."""
    mean = F.avg_pool2d(pixels, factor)
    grey = pixels.mean(dim=1, keepdim=True)
    contrast = F.avg_pool2d(grey.square(), factor) - F.avg_pool2d(grey, factor).square()
    return torch.cat([mean, 2.0 * contrast], dim=1)


def init_logvar_(vae: nn.Module, value: float) -> None:
    """Set the bias of the encoder's log-variance outputs (the second half of its last conv)."""
    conv = vae.encoder.conv_out
    half = conv.out_channels // 2
    with torch.no_grad():
        conv.bias[half:].fill_(value)


def salience(pixels: torch.Tensor, object_weight: float) -> torch.Tensor:
    """(B, 1, H, W) loss weights: ``object_weight`` where a pixel's colour is far from its
    picture's per-channel median (the background fills most of a picture), 1 elsewhere."""
    median = pixels.flatten(2).median(dim=2).values[:, :, None, None]
    far = (pixels - median).abs().sum(dim=1, keepdim=True) > 0.3
    return 1.0 + (object_weight - 1.0) * far.to(pixels.dtype)


def vae_losses(vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator, object_weight: float = 1.0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reconstruction, KL, guide distance) of a batch (B, 3, H, W) in [-1, 1]; the latent is
    sampled from the posterior with ``generator``. Reconstruction errors on object pixels count
    ``object_weight`` times (see :func:`salience`)."""
    dist = vae.encode(pixels).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator)
    recon = vae.decode(z).sample
    weight = salience(pixels, object_weight)
    rec = (weight * ((recon - pixels).abs() + (recon - pixels).square())).mean() / weight.mean()
    kl = 0.5 * (dist.mean.square() + dist.var - 1.0 - dist.logvar).mean()
    guide = (dist.mean - colour_guide(pixels)).square().mean()
    return rec, kl, guide


def random_crops(pixels: torch.Tensor, size: int, generator: torch.Generator, grid: int = 8) -> torch.Tensor:
    """One ``size`` x ``size`` crop per picture of (B, C, H, W), at offsets on the latent grid."""
    h, w = pixels.shape[-2:]
    ys = torch.randint(0, (h - size) // grid + 1, (pixels.shape[0],), generator=generator) * grid
    xs = torch.randint(0, (w - size) // grid + 1, (pixels.shape[0],), generator=generator) * grid
    return torch.stack([p[:, y:y + size, x:x + size] for p, y, x in zip(pixels, ys.tolist(), xs.tolist())])


def train_vae(vae: nn.Module, data: WorldSet, settings: VaeSettings, log: Log = print) -> dict[str, float]:
    """Train ``vae`` in place: ``settings.crop_steps`` on crops of ``data``'s pictures, then
    ``settings.steps`` on whole ones. Returns the mean losses of the last 10% of the steps on whole
    pictures."""
    gen = torch.Generator().manual_seed(settings.seed)
    init_logvar_(vae, settings.logvar_init)
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.lr, betas=(0.9, 0.99), weight_decay=0.0)
    vae.train()
    total = settings.crop_steps + settings.steps
    tail: list[tuple[float, float]] = []
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, settings.lr, settings.warmup)
        fade = 0.5 * (1 + math.cos(math.pi * step / max(1, total - 1)))
        guide_weight = settings.guide_weight * (settings.guide_floor + (1 - settings.guide_floor) * fade)
        pixels = data.pixels(torch.randint(0, len(data), (settings.batch_size,), generator=gen))
        if step < settings.crop_steps:
            pixels = random_crops(pixels, settings.crop, gen)
        rec, kl, guide = vae_losses(vae, pixels, gen, settings.object_weight)
        loss = rec + settings.kl_weight * kl + guide_weight * guide
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        values = (float(rec.detach()), float(kl.detach()))
        if step >= total - max(1, settings.steps // 10):
            tail.append(values)
        if step % 50 == 0 or step == total - 1:
            log(f"vae step {step + 1}/{total} ({pixels.shape[-1]} px): reconstruction {values[0]:.4f} "
                f"kl {values[1]:.3f} guide {float(guide.detach()):.4f}")
    vae.eval()
    n = max(1, len(tail))
    return {"reconstruction": sum(r for r, _ in tail) / n, "kl": sum(k for _, k in tail) / n}


@torch.no_grad()
def encode_world(vae: nn.Module, data: WorldSet, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior (mean, std), each (N, 4, h, w) fp32 and unscaled, of every picture of ``data``."""
    vae.eval()
    means, stds = [], []
    for start in range(0, len(data), batch_size):
        index = torch.arange(start, min(len(data), start + batch_size))
        dist = vae.encode(data.pixels(index)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def scaling_factor(mean: torch.Tensor) -> float:
    """1 / std of the latents (SD's recipe for its 0.18215), rounded to 5 significant digits so
    it reads well in configs."""
    return float(f"{1.0 / float(mean.float().std()):.5g}")
