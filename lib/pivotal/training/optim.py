"""Parameter groups, optimizers, learning-rate schedules and the phase plan.

Three groups, each with its own learning rate: ``unet`` (UNet LoRA), ``te`` (text-encoder LoRA,
only when enabled) and ``embeddings``. The LR of every group is set explicitly before each step
from (base LR × schedule factor × phase factor), so a resumed run needs only the step number to
land on exactly the same LRs; no scheduler object carries hidden state.

Phase plans:
* ``together``: all groups train from step 0; the embeddings freeze after ``freeze_embeddings_at``
  of the steps (the diffusers/cog "ti_frac" recipe);
* ``embeddings_first``: only the embeddings train for ``phase1_steps``; then the LoRA trains and
  the embeddings continue at ``embedding_lr_after`` (0 = frozen) — true pivotal tuning.

A frozen group gets ``requires_grad=False``: no gradient is computed for it and the optimizer
skips it (AdamW would otherwise still apply weight decay and momentum).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
from torch import nn

from pivotal.errors import ConfigError
from pivotal.training.config import TrainConfig

GROUPS = ("unet", "te", "embeddings")


@dataclass
class GroupSpec:
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float


def schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of ``total``: linear warm-up, then
    constant, cosine (to 0) or linear (to 0)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear


def phase_of(config: TrainConfig, step: int) -> str:
    """"embeddings", "lora" or "together" / "lora_only" — the phase step ``step`` belongs to."""
    if config.mode == "textcraftor":  # no embeddings: every step trains the LoRA
        return "lora"
    k = config.phase1_steps()
    if config.phase_plan == "embeddings_first":
        return "embeddings" if step < k else "lora"
    return "together" if step < k else "lora_only"


def phase_factors(config: TrainConfig, step: int) -> dict[str, float]:
    """Multiplier of each group's LR at ``step`` (0 = frozen)."""
    phase = phase_of(config, step)
    if phase == "embeddings":
        return {"unet": 0.0, "te": 0.0, "embeddings": 1.0}
    if phase == "lora":
        after = config.embedding_lr_after / config.embedding_lr if config.embedding_lr else 0.0
        return {"unet": 1.0, "te": 1.0, "embeddings": after}
    if phase == "together":
        return {"unet": 1.0, "te": 1.0, "embeddings": 1.0}
    return {"unet": 1.0, "te": 1.0, "embeddings": 0.0}


def build_optimizer(config: TrainConfig, groups: list[GroupSpec]) -> torch.optim.Optimizer:
    """The optimizer over the non-empty groups; each param group carries ``name`` and ``base_lr``."""
    param_groups = [{"params": g.params, "lr": g.lr, "weight_decay": g.weight_decay, "name": g.name,
                     "base_lr": g.lr} for g in groups if g.params]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, betas=(0.9, 0.999), eps=1e-8)
    if config.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("optimizer: adamw8bit needs the 'bitsandbytes' package (pip install bitsandbytes); "
                              "or choose adamw")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, betas=(0.9, 0.999), eps=1e-8)
    if importlib.util.find_spec("prodigyopt") is None:
        raise ConfigError("optimizer: prodigy needs the 'prodigyopt' package (pip install prodigyopt); or choose adamw")
    from prodigyopt import Prodigy

    # Prodigy finds the step size itself: every group's LR is a multiplier (1.0 = as found).
    return Prodigy(param_groups, betas=(0.9, 0.99), weight_decay=config.weight_decay)


def apply_lrs(optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> dict[str, float]:
    """Set every group's LR for ``step`` and switch frozen groups' ``requires_grad`` off.

    Returns {group name: LR} for progress reporting.
    """
    sched = schedule_factor(config.schedule, step, config.steps, config.warmup_steps)
    phase = phase_factors(config, step)
    lrs = {}
    for g in optimizer.param_groups:
        factor = phase[g["name"]]
        g["lr"] = g["base_lr"] * sched * factor
        trainable = factor > 0
        for p in g["params"]:
            if p.requires_grad != trainable:
                p.requires_grad_(trainable)
        lrs[g["name"]] = g["lr"]
    return lrs


@torch.no_grad()
def pull_norms(vectors: list[torch.Tensor], target_norm: float, strength: float) -> None:
    """Move each row's norm part-way toward ``target_norm``: v ← v·(target/‖v‖)^strength.

    New vectors that drift far above the vocabulary's norm dominate the prompt (the "burnt
    embedding" failure); a gentle pull each step keeps them at the vocabulary's scale.
    """
    if strength <= 0:
        return
    for v in vectors:
        norms = v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        v.mul_((target_norm / norms) ** strength)
