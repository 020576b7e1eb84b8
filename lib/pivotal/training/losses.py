"""The diffusion training objective: noise, timesteps, targets and min-SNR weighting.

All randomness comes from an explicit CPU ``torch.Generator`` (then moved to the device), so a
seed reproduces a run on any device and a resumed run continues the same random stream.
"""

from __future__ import annotations

import torch


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) long, uniform over [0, num_timesteps)."""
    return torch.randint(0, num_timesteps, (batch,), generator=generator)


def sample_noise(shape: torch.Size, generator: torch.Generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise (B, C, H, W); ``noise_offset`` adds a per-channel constant so the model
    can learn overall brightness (the "noise offset" trick)."""
    noise = torch.randn(shape, generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=generator)
    return noise


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped (B, 1, 1, ...) to broadcast over a (B, ...) tensor of ``ndim`` dims."""
    return values.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


def add_noise(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·ε, computed in fp32."""
    a = _gather(alphas_cumprod.float(), t, latents.dim())
    return a.sqrt() * latents.float() + (1 - a).sqrt() * noise.float()


def training_target(prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """ε for "epsilon"; v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x_0 for "v_prediction"."""
    if prediction_type == "epsilon":
        return noise.float()
    a = _gather(alphas_cumprod.float(), t, latents.dim())
    return a.sqrt() * noise.float() - (1 - a).sqrt() * latents.float()


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """(T,) ᾱ rescaled so that the last timestep has SNR 0 (Lin et al. 2023, Algorithm 1).

    sqrt(ᾱ) is shifted so its last value is 0 and scaled so its first is unchanged; computed in
    fp64 and returned in the input's dtype and device. ᾱ[-1] is exactly 0: x_T is pure noise, the
    v-target there is -x_0 (ε-prediction cannot learn anything at that step)."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    return (root * root).to(alphas_cumprod.dtype)


def min_snr_weights(t: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """(B,) per-sample weights of min-SNR-γ (Hang et al. 2023); ones when ``gamma`` is 0.

    With SNR = ᾱ/(1-ᾱ): ε-prediction weight min(SNR, γ)/SNR; v-prediction min(SNR, γ)/(SNR+1).
    SNR 0 (the last step of a zero-terminal-SNR schedule) is finite either way: v-prediction weighs
    it 0, ε-prediction 1 (the limit of min(SNR, γ)/SNR as SNR → 0).
    """
    if gamma <= 0:
        return torch.ones(t.shape[0])
    a = alphas_cumprod.float()[t.cpu()]
    snr = a / (1 - a)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted MSE: mean over each sample, then the weighted mean over the batch (fp32 scalar).

    ``prediction``/``target`` (B, C, h, w); ``weights`` (B,) per-sample (min-SNR times the image's
    loss weight). ``mask`` (B, 1, h, w) in [0, 1] (latent size): each sample's squared error is
    averaged with these weights over its pixels (the masked area's mean, so a small mask does not
    shrink the step); a sample whose mask is all 0 contributes 0."""
    err = (prediction.float() - target.float()).pow(2)
    if mask is None:
        per_sample = err.flatten(1).mean(dim=1)
    else:
        m = mask.to(err.device, torch.float32).expand_as(err)
        total = m.flatten(1).sum(dim=1)
        per_sample = (err * m).flatten(1).sum(dim=1) / total.clamp(min=1e-8)
    return (per_sample * weights.to(per_sample.device)).mean()
