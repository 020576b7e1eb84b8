"""Stage 2 of pre-training the tiny-world model: UNet and text encoder together, on cached latents.

SD's objective: noise a latent to a uniformly drawn timestep of the scaled_linear schedule, have
the UNet predict the noise (epsilon) from the noisy latent and the caption's text states. Choices:

* min-SNR weighting (gamma 5): the easy, low-noise timesteps stop dominating, which converges
  several times faster than the plain loss (Hang et al. 2023) - the budget is minutes on a CPU;
* offset noise: besides white noise, a little noise (std 0.2) constant over the whole latent, the
  "offset noise" of SD fine-tuners, so flat backgrounds of any brightness can be drawn. Noise
  drawn on coarser grids as well (2x2, 4x4 cells: :func:`layout_noise` supports it) was tried to
  hide a picture's layout in the noisiest latents, so the model would take the object's place from
  the caption; it did not teach place and left blotches (sampling starts from white noise), so the
  default is the offset alone;
* 10% of captions are dropped to the empty prompt, so classifier-free guidance works;
* the token embedding gets no weight decay: AdamW then leaves every row of a token that never
  occurs exactly as initialised (zero gradient, zero moments, zero update), which is what lets
  the weight file keep only the trained rows (:mod:`pivotal.demo.tiny_world`);
* two knobs for teaching place (issue 17): a learning-rate multiple for the UNet's cross-attention
  (off: it did not teach place) and timesteps drawn leaning toward the noisy end, where the epsilon
  loss weighs a picture's layout least (its x0 error counts ``SNR`` times). The v2 file (the
  default since) draws them with density ~ t and trains 3000 steps: place 22 % -> 80 % (v1 drew
  them uniformly, 1800 steps);
* an exponential moving average of the weights (``lerp``, so unchanged rows stay bit-exact) is
  what is kept: it samples visibly cleaner than the last step's weights after a short run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pivotal.demo.pretrain.vae import lr_at

Log = Callable[[str], None]


@dataclass(frozen=True)
class DiffusionSettings:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    #: std of extra noise at 1x1 (the "offset"), 2x2 and 4x4 latent cells, see :func:`layout_noise`
    coarse_noise: tuple[float, ...] = (0.2,)
    ema_decay: float = 0.998
    seed: int = 2
    #: learning-rate multiplier of the UNet's cross-attention (``attn2``) weights, see :func:`_groups`
    cross_attention_lr_scale: float = 1.0
    #: timesteps are drawn with density proportional to ``t ** (timestep_power - 1)``: above 1,
    #: the noisy timesteps, where a picture's layout is decided, are drawn more often
    timestep_power: float = 2.0


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``sqrt(a_t) x + sqrt(1 - a_t) noise`` for latents (B, C, h, w) and timesteps (B,)."""
    a = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return a.sqrt() * latents + (1 - a).sqrt() * noise


def _upsampled(cells: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Noise ``cells`` (B, C, g, g) upsampled bilinearly to ``size``, rescaled per pixel back to
    unit variance (interpolating between cells averages them, which lowers the variance)."""
    g = cells.shape[-1]
    basis = torch.eye(g * g).reshape(g * g, 1, g, g)
    variance = F.interpolate(basis, size=size, mode="bilinear", align_corners=False).square().sum(dim=0)
    return F.interpolate(cells, size=size, mode="bilinear", align_corners=False) / variance.sqrt()


def layout_noise(shape: torch.Size, coarse: tuple[float, ...], generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise (B, C, h, w) plus noise drawn on grids of 1x1, 2x2, 4x4, ... cells (std
    ``coarse[k]`` on the 2^k grid) and upsampled, the sum rescaled to unit variance per pixel."""
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    for k, std in enumerate(coarse):
        if std:
            cells = torch.randn((b, c, 2 ** k, 2 ** k), generator=generator)
            noise = noise + std * _upsampled(cells, (h, w))
    return noise / (1.0 + sum(s * s for s in coarse)) ** 0.5


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) weights ``min(SNR, gamma) / SNR`` of the epsilon loss; SNR = a_t / (1 - a_t)."""
    a = alphas_cumprod[timesteps]
    snr = a / (1 - a)
    return snr.clamp(max=gamma) / snr


def epsilon_losses(unet: nn.Module, te: nn.Module, latents: torch.Tensor, ids: torch.Tensor,
                   timesteps: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(B,) mean squared error of the predicted noise, per sample: latents (B, 4, h, w) already
    scaled, ids (B, 77) the captions' token ids."""
    context = te(input_ids=ids).last_hidden_state
    x = noisy_latents(latents, noise, timesteps, alphas_cumprod)
    pred = unet(x, timesteps, encoder_hidden_states=context).sample
    return (pred.float() - noise).square().mean(dim=(1, 2, 3))


def draw_timesteps(count: int, steps: int, power: float, generator: torch.Generator) -> torch.Tensor:
    """(count,) int64 timesteps in ``0 .. steps-1`` with density proportional to ``t ** (power - 1)``
    (``power`` 1: uniform, SD's choice; 2: linearly more of the noisy ones)."""
    if power == 1.0:
        return torch.randint(0, steps, (count,), generator=generator)
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    return (u.pow(1.0 / power) * steps).long().clamp_(0, steps - 1)


def _groups(unet: nn.Module, te: nn.Module, settings: DiffusionSettings) -> list[dict]:
    """Parameter groups: the UNet's cross-attention (``lr_scale``), the rest of the UNet and the
    text encoder, and the token embedding (no weight decay: see the module docstring)."""
    token = te.get_input_embeddings().weight
    # Without a scale the groups are v1's, in its order (the gradient norm sums in that order).
    cross = [p for n, p in unet.named_parameters() if ".attn2." in n] if settings.cross_attention_lr_scale != 1 else []
    taken = {id(p) for p in cross}
    rest = [p for p in unet.parameters() if id(p) not in taken] + [p for p in te.parameters() if p is not token]
    groups = [{"params": rest, "weight_decay": settings.weight_decay, "lr_scale": 1.0},
              {"params": [token], "weight_decay": 0.0, "lr_scale": 1.0}]
    if cross:
        groups.append({"params": cross, "weight_decay": settings.weight_decay,
                       "lr_scale": settings.cross_attention_lr_scale})
    return groups


def train_diffusion(unet: nn.Module, te: nn.Module, mean: torch.Tensor, std: torch.Tensor, ids: torch.Tensor,
                    empty_ids: torch.Tensor, alphas_cumprod: torch.Tensor, scale: float,
                    settings: DiffusionSettings, log: Log = print) -> dict[str, float]:
    """Train ``unet`` and ``te`` in place; on return they hold the EMA weights, in eval mode.

    ``mean`` / ``std`` (N, 4, h, w): the VAE posterior of each picture (a latent is sampled per
    visit, times ``scale``); ``ids`` (N, 77) its caption; ``empty_ids`` (77,) the empty prompt.
    Returns the mean unweighted loss of the first and last 10% of steps.
    """
    gen = torch.Generator().manual_seed(settings.seed)
    groups = _groups(unet, te, settings)
    opt = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.99))
    params = [p for g in groups for p in g["params"]]
    ema = [p.detach().clone() for p in params]
    unet.train()
    te.train()
    first: list[float] = []
    last: list[float] = []
    window: list[float] = []
    n, b = mean.shape[0], settings.batch_size
    for step in range(settings.steps):
        lr = lr_at(step, settings.steps, settings.lr, settings.warmup)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        index = torch.randint(0, n, (b,), generator=gen)
        latents = (mean[index] + std[index] * torch.randn(mean[index].shape, generator=gen)) * scale
        timesteps = draw_timesteps(b, alphas_cumprod.shape[0], settings.timestep_power, gen)
        noise = layout_noise(latents.shape, settings.coarse_noise, gen)
        drop = torch.rand(b, generator=gen) < settings.caption_dropout
        batch_ids = torch.where(drop[:, None], empty_ids[None, :], ids[index])
        per_sample = epsilon_losses(unet, te, latents, batch_ids, timesteps, noise, alphas_cumprod)
        loss = (per_sample * min_snr_weights(timesteps, alphas_cumprod, settings.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(settings.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1.0 - decay)
        plain = float(per_sample.detach().mean())
        window.append(plain)
        if step < max(1, settings.steps // 10):
            first.append(plain)
        if step >= settings.steps - max(1, settings.steps // 10):
            last.append(plain)
        if (step + 1) % 50 == 0 or step == settings.steps - 1:
            log(f"diffusion step {step + 1}/{settings.steps}: loss {sum(window) / len(window):.4f}")
            window.clear()
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    te.eval()
    return {"first_loss": sum(first) / len(first), "last_loss": sum(last) / len(last)}
