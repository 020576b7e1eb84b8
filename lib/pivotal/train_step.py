"""One optimizer step: gradient accumulation over micro-batches, mixed precision, the
non-finite guard, and the update."""

from __future__ import annotations

import contextlib

import torch

from pivotal.embeddings import EmbeddingSet
from pivotal.host_api import TrainingHost
from pivotal.lora_network import LoraNetwork
from pivotal.losses import add_noise, diffusion_loss, min_snr_weights, sample_noise, sample_timesteps, training_target
from pivotal.train_batches import BatchSource
from pivotal.train_config import TrainConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _grad_scaler(enabled: bool):
    """A CUDA GradScaler for fp16 (torch >= 2.3 spells it torch.amp, the webui's 2.1 torch.cuda.amp)."""
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


class StepRunner:
    """Computes the loss of one optimizer step and applies the update (or refuses to)."""

    def __init__(self, config: TrainConfig, host: TrainingHost, net: LoraNetwork, embeddings: EmbeddingSet,
                 batches: BatchSource, generator: torch.Generator) -> None:
        self.config = config
        self.host = host
        self.net = net
        self.embeddings = embeddings
        self.batches = batches
        self.generator = generator
        self.alphas = host.alphas_cumprod().float()
        self.prediction = config.prediction_type if config.prediction_type != "auto" else host.prediction_type
        self.device = host.device
        autocast_dtype = AUTOCAST_DTYPES.get(config.precision)
        self.autocast_dtype = autocast_dtype
        # fp16 gradients underflow without loss scaling; bf16 and fp32 do not need it.
        self.scaler = _grad_scaler(config.precision == "fp16" and self.device.type == "cuda")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def run(self, step: int, optimizer: torch.optim.Optimizer) -> float | None:
        """Loss of optimizer step ``step`` (mean over accumulated micro-batches) after applying the
        update; None when the loss was NaN/inf, in which case nothing was updated."""
        cfg = self.config
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(cfg.grad_accum):
            latents, captions, sizes = self.batches.get(step * cfg.grad_accum + k)
            t = sample_timesteps(latents.shape[0], self.alphas.shape[0], self.generator)
            noise = sample_noise(latents.shape, self.generator, cfg.noise_offset)
            noisy = add_noise(latents.cpu(), noise, t, self.alphas)
            target = training_target(self.prediction, latents.cpu(), noise, t, self.alphas).to(self.device)
            weights = min_snr_weights(t, self.alphas, cfg.min_snr_gamma, self.prediction)
            with self._autocast():
                cond = self.host.encode_prompts(captions, self.embeddings, sizes)
                pred = self.host.predict(noisy.to(self.device, self.host.dtype), t.to(self.device), cond)
            loss = diffusion_loss(pred, target, weights) / cfg.grad_accum
            if not torch.isfinite(loss):
                # Nothing reaches the weights: the gradients of this step are dropped whole.
                optimizer.zero_grad(set_to_none=True)
                return None
            self.scaler.scale(loss).backward()
            total += float(loss.detach())
        self.scaler.step(optimizer)
        self.scaler.update()
        return total
