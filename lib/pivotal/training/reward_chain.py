"""The differentiable sampling chain of reward fine-tuning (TextCraftor, Li et al. 2024): DDIM
(eta 0) from noise to latents with classifier-free guidance, where only the last ``grad_steps``
denoising steps build a graph; the earlier ones run without grad, so memory grows with K, not
with the number of steps. The decoded images then go to the rewards.

Our own DDIM over the host's ``alphas_cumprod`` (no scheduler object: every step must be a plain
differentiable tensor expression), with SD's "leading" timestep spacing and ``steps_offset`` 1,
and the final step to ᾱ_0 (``set_alpha_to_one`` False), as diffusers' DDIMScheduler for SD.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from pivotal.errors import ConfigError

#: model_fn(x (B, C, h, w) fp32, t (B,) long) -> the guided model output (B, C, h, w)
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000, offset: int = 1) -> list[int]:
    """The ``steps`` timesteps of DDIM, highest first ("leading" spacing + offset, as SD's)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ConfigError(f"textcraftor_sample_steps: {steps} must be between 1 and {num_train_timesteps}")
    ratio = num_train_timesteps // steps
    return [min(i * ratio + offset, num_train_timesteps - 1) for i in reversed(range(steps))]


def ddim_step(x: torch.Tensor, out: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
              prediction_type: str) -> torch.Tensor:
    """One deterministic DDIM step from x_t to x_prev, given the model output ``out`` (ε or v)."""
    a, a_prev = alpha, alpha_prev
    if prediction_type == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
        eps = (1 - a).sqrt() * x + a.sqrt() * out
    else:
        eps = out
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


def sample_latents(model_fn: ModelFn, noise: torch.Tensor, alphas_cumprod: torch.Tensor, steps: int,
                   grad_steps: int, prediction_type: str, checkpointed: bool = False) -> torch.Tensor:
    """Latents (B, C, h, w) fp32 after ``steps`` DDIM steps from ``noise``; the graph covers the
    last ``grad_steps`` steps only (the input to the first of them is detached).

    ``checkpointed``: each of those K model calls is recomputed in the backward pass instead of
    keeping its activations (memory of one UNet call instead of K, at one more forward each).
    """
    if not 0 <= grad_steps <= steps:
        raise ConfigError(f"textcraftor_grad_steps: {grad_steps} must be between 0 and "
                          f"textcraftor_sample_steps ({steps})")
    acp = alphas_cumprod.float().to(noise.device)
    times = ddim_timesteps(steps, acp.shape[0])
    x = noise.float()
    first_grad = steps - grad_steps
    for i, t in enumerate(times):
        with_grad = i >= first_grad
        prev = times[i + 1] if i + 1 < steps else -1
        a, a_prev = acp[t], (acp[prev] if prev >= 0 else acp[0])
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        with contextlib.nullcontext() if with_grad else torch.no_grad():
            if with_grad and checkpointed:
                out = checkpoint(model_fn, x, tt, use_reentrant=False)
            else:
                out = model_fn(x, tt)
            x = ddim_step(x, out.float(), a, a_prev, prediction_type)
    return x
