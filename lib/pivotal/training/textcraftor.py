"""One optimizer step of the "textcraftor" mode: reward fine-tuning through the sampling chain
(TextCraftor, Li et al. 2024, "Your Text Encoder Can be Image Quality Controller").

Per micro-batch: draw prompts from the run's prompt list and noise (both from the run's CPU
generator, so a resumed run continues the same stream), encode the prompts and the empty prompt
through the text encoder with its LoRA attached, sample latents with DDIM and classifier-free
guidance where only the last K steps carry grad (:mod:`pivotal.training.reward_chain`), decode
them differentiably (the host's :meth:`~pivotal.host_api.TrainingHost.decode_latents`), score the
pictures with the rewards and step on loss = -(weighted reward). No dataset, no embeddings: what
trains is the text-encoder LoRA (and the UNet LoRA with ``textcraftor_unet``), whose ``te=``
weight in a prompt then interpolates between the original encoder (0) and the fine-tuned one (1).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import torch

from pivotal.errors import ConfigError
from pivotal.host_api import SizeInfo, TrainingHost
from pivotal.text.embeddings import EmbeddingSet
from pivotal.training.config import TrainConfig
from pivotal.training.reward_chain import sample_latents
from pivotal.training.rewards import Reward, total_reward
from pivotal.training.step import AUTOCAST_DTYPES, _grad_scaler, clip_gradients


def read_prompts(config: TrainConfig) -> list[str]:
    """``reward_prompts`` then the non-empty lines of ``reward_prompts_file``; ConfigError naming the
    setting when the file cannot be read or no prompt is left."""
    prompts = [p for p in config.reward_prompts if p.strip()]
    if config.reward_prompts_file:
        path = Path(config.reward_prompts_file)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as e:
            raise ConfigError(f"reward_prompts_file: cannot read {path}: {e.strerror or e}") from e
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("reward_prompts: no training prompt given (reward_prompts or reward_prompts_file)")
    return prompts


class RewardStepRunner:
    """Computes one TextCraftor step's loss (-reward) and applies the update (or refuses to), with
    :class:`~pivotal.training.step.StepRunner`'s interface."""

    def __init__(self, config: TrainConfig, host: TrainingHost, prompts: Sequence[str],
                 rewards: Sequence[tuple[Reward, float]], generator: torch.Generator) -> None:
        self.config = config
        self.host = host
        self.prompts = list(prompts)
        self.rewards = list(rewards)
        self.generator = generator
        self.device = host.device
        self.alphas = host.alphas_cumprod().float().to(host.device)
        self.prediction = config.prediction_type if config.prediction_type != "auto" else host.prediction_type
        self.autocast_dtype = AUTOCAST_DTYPES.get(config.precision)
        self.scaler = _grad_scaler(config.precision == "fp16" and self.device.type == "cuda")
        self.latent_shape = self._latent_shape(config.resolution)
        #: the last step's mean score per reward (for progress)
        self.last_rewards: dict[str, float] = {}
        #: the last step's gradient norm before clipping (None: clipping off, or no step yet)
        self.grad_norm: float | None = None

    def _latent_shape(self, size: int) -> tuple[int, int, int]:
        """(C, h, w) of the model's latents for ``size`` px pictures: one blank picture encoded and
        decoded again, so a host that cannot decode refuses here, before the first step."""
        with torch.no_grad():
            z = self.host.encode_images(torch.zeros(1, 3, size, size))
            self.host.decode_latents(z)
        return int(z.shape[1]), int(z.shape[2]), int(z.shape[3])

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def draw(self, count: int) -> tuple[list[str], torch.Tensor]:
        """``count`` prompts (with replacement) and their starting noise (B, C, h, w), from the run's
        generator."""
        picks = torch.randint(0, len(self.prompts), (count,), generator=self.generator).tolist()
        noise = torch.randn((count, *self.latent_shape), generator=self.generator)
        return [self.prompts[i] for i in picks], noise

    def images(self, prompts: Sequence[str], noise: torch.Tensor) -> torch.Tensor:
        """Pictures (B, 3, H, W) in [0, 1] sampled for ``prompts`` from ``noise``, differentiable
        through the last ``textcraftor_grad_steps`` steps and the decoder."""
        cfg, host = self.config, self.host
        count = len(prompts)
        guided = cfg.textcraftor_guidance != 1.0
        texts = ([""] * count if guided else []) + list(prompts)
        size = cfg.resolution
        sizes = [SizeInfo((size, size), (0, 0), (size, size))] * len(texts) if host.base_model == "sdxl" else None
        cond = host.encode_prompts(texts, EmbeddingSet(), sizes)
        rows = len(texts)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xin = torch.cat([x] * (rows // count))
            out = host.predict(xin.to(host.dtype), torch.cat([t] * (rows // count)), cond)
            if not guided:
                return out
            uncond, text = out.float().chunk(2)
            return uncond + cfg.textcraftor_guidance * (text - uncond)

        latents = sample_latents(model_fn, noise.to(self.device), self.alphas, cfg.textcraftor_sample_steps,
                                 cfg.textcraftor_grad_steps, self.prediction, cfg.gradient_checkpointing)
        pictures = host.decode_latents(latents)
        return ((pictures.float() + 1) / 2).clamp(0, 1)

    def run(self, step: int, optimizer: torch.optim.Optimizer) -> float | None:
        """The loss (-weighted reward, mean over the accumulated micro-batches) of optimizer step
        ``step`` after applying the update; None when it was NaN/inf (nothing updated)."""
        cfg = self.config
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            prompts, noise = self.draw(cfg.batch_size)
            with self.autocast():
                pictures = self.images(prompts, noise)
            score, parts = total_reward(self.rewards, pictures, prompts)
            loss = -score.mean() / cfg.grad_accum
            if not torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                return None
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v / cfg.grad_accum
        self.last_rewards = sums
        if cfg.max_grad_norm > 0:
            self.grad_norm = clip_gradients(self.scaler, optimizer, cfg.max_grad_norm)
        self.scaler.step(optimizer)
        self.scaler.update()
        return total

