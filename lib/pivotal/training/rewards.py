"""Rewards for reward fine-tuning (the "textcraftor" training mode): the protocol, the registry and
the parsing of the ``reward`` setting.

A reward scores decoded images against their prompts, differentiably: the TextCraftor step
(:mod:`pivotal.training.textcraftor`) backpropagates its scores through the sampling chain into the
text-encoder LoRA. The built-ins (``clip``, ``aesthetic``: :mod:`pivotal.training.clip_rewards`)
load local weight files the user names in the settings; nothing is downloaded. Another reward (the
demo's tiny-world scorer, a test's, a plug-in's) registers a factory with :func:`register_reward`,
as LoRA algorithms do with :func:`~pivotal.adapters.algorithms.register_algorithm`: the core never
imports the code that provides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from pivotal.errors import ConfigError


class Reward(Protocol):
    """A differentiable image-text score; higher is better."""

    #: the name the ``reward`` setting uses
    name: str

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(B,) fp32 scores of ``images`` (B, 3, H, W) in [0, 1] for ``prompts`` (B strings),
        differentiable with respect to ``images``."""
        ...


#: Builds a reward for a run: ``factory(config, device)``; ``config`` is the run's
#: :class:`~pivotal.training.config.TrainConfig` (for the weight-file settings), ``device`` where
#: the images will be. A missing or bad file is a ConfigError naming its setting.
RewardFactory = Callable[[Any, torch.device], Reward]

_REGISTRY: dict[str, RewardFactory] = {}


def register_reward(name: str, factory: RewardFactory) -> None:
    """Make ``name`` usable in the ``reward`` setting (registering the same factory again is a no-op;
    another factory under a taken name is refused)."""
    if not name or ":" in name:
        raise ConfigError(f"reward name {name!r} must be non-empty and hold no ':'")
    other = _REGISTRY.get(name)
    if other is not None and other is not factory:
        raise ConfigError(f"reward name {name!r} is already registered by {getattr(other, '__module__', other)}")
    _REGISTRY[name] = factory


def unregister_reward(name: str) -> None:
    _REGISTRY.pop(name, None)


def reward_names() -> tuple[str, ...]:
    _register_builtins()
    return tuple(_REGISTRY)


@dataclass(frozen=True)
class RewardEntry:
    """One term of the total reward: ``weight`` x the reward called ``name``."""

    name: str
    weight: float = 1.0


def parse_reward_entries(entries: Sequence[str]) -> list[RewardEntry]:
    """``NAME[:WEIGHT]`` strings (the ``reward`` setting) as entries; ConfigError naming the setting
    for a bad weight or a name given twice."""
    out: list[RewardEntry] = []
    for text in entries:
        name, sep, weight_text = text.strip().partition(":")
        try:
            weight = float(weight_text) if sep else 1.0
        except ValueError:
            raise ConfigError(f"reward: {text!r} is not NAME[:WEIGHT] (WEIGHT a number, e.g. clip:0.5)") from None
        if not name.strip():
            raise ConfigError(f"reward: {text!r} has no reward name (NAME[:WEIGHT])")
        if any(e.name == name.strip() for e in out):
            raise ConfigError(f"reward: {name.strip()!r} is listed twice")
        out.append(RewardEntry(name.strip(), weight))
    return out


def build_rewards(config: Any, device: torch.device) -> list[tuple[Reward, float]]:
    """(reward, weight) for each entry of ``config.reward``; ConfigError naming the setting for an
    unknown name (with the known ones) or an empty list."""
    entries = parse_reward_entries(config.reward)
    if not entries:
        raise ConfigError(f"reward: textcraftor mode needs at least one reward (known: {', '.join(reward_names())})")
    known = reward_names()
    out = []
    for e in entries:
        if e.name not in _REGISTRY:
            raise ConfigError(f"reward: unknown reward {e.name!r} (known: {', '.join(known) or 'none'}; the tiny-world "
                              "reward is registered when the demo model is loaded)")
        out.append((_REGISTRY[e.name](config, device), e.weight))
    return out


def total_reward(rewards: Sequence[tuple[Reward, float]], images: torch.Tensor,
                 prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, float]]:
    """(B,) weighted sum of the rewards' scores, and each reward's batch mean (for progress)."""
    total = torch.zeros(images.shape[0], device=images.device)
    parts: dict[str, float] = {}
    for reward, weight in rewards:
        score = reward(images, prompts).float()
        if score.shape != (images.shape[0],):
            raise ConfigError(f"reward {reward.name!r} returned shape {tuple(score.shape)}, expected "
                              f"({images.shape[0]},): one score per image")
        total = total + weight * score
        parts[reward.name] = float(score.detach().mean())
    return total, parts


def _register_builtins() -> None:
    from pivotal.training.clip_rewards import aesthetic_reward, clip_reward

    register_reward("clip", clip_reward)
    register_reward("aesthetic", aesthetic_reward)
