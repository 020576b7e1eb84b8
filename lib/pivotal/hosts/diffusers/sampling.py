"""The small sampling loop behind ``DiffusersHost.generate``: scheduler, denoising, PIL output.

diffusers' scheduler classes do the step arithmetic; the loop, classifier-free guidance and the
conditioning stay ours, so previews use exactly the prompt encoding and UNet call the trainer uses.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from pivotal.errors import ConfigError, ModelLayoutError

SAMPLERS = ("euler", "ddim")


def make_scheduler(config: Mapping[str, Any], sampler: str) -> Any:
    """A fresh diffusers scheduler of kind ``sampler`` from the model's scheduler config.

    Fresh per image: schedulers keep a step counter, so sharing one between calls would break
    determinism.
    """
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    classes = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}
    if sampler not in classes:
        raise ConfigError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)} (setting: sampler)")
    # Keys like "_class_name" describe the saved scheduler, not the one we build.
    cfg = {k: v for k, v in config.items() if not str(k).startswith("_")}
    return classes[sampler].from_config(cfg)


def denoise(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler: Any,
            noise: torch.Tensor, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Run ``steps`` sampler steps from ``noise`` (B, C, h, w), fp32; returns the final latents.

    ``model_fn(x, t)`` gets the scaled model input and the scheduler's timestep and returns the
    (guided) model output in the space of the schedule's ``prediction_type``.
    """
    scheduler.set_timesteps(steps, device=noise.device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        out = model_fn(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out.float(), t, x, generator=generator).prev_sample
    return x


def to_pil(image: torch.Tensor) -> Any:
    """PIL RGB image of one decoded image (3, H, W) in [-1, 1] (values outside are clipped)."""
    from PIL import Image

    if image.dim() != 3 or image.shape[0] != 3:
        raise ModelLayoutError(f"expected one decoded (3, H, W) image, got {tuple(image.shape)}")
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy())
