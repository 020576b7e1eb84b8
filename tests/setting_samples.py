"""A valid value away from its default for every declared setting (for the reachability tests).

Derived from each declaration (kind, limits, choices), so a new setting gets a sample without
editing this file; ``OVERRIDES`` is for a setting whose derived value would not validate.

Some settings cannot all leave their defaults in one valid config (activation dropout and the
weight-based algorithms LoHa / LoKr / DoRA): :data:`VARIANTS` are two sample sets, each valid,
and every setting leaves its default in at least one of them.
"""

from __future__ import annotations

from typing import Any

from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.settings import DeclaredSetting, declared

OVERRIDES: dict[str, Any] = {"lokr_factor": 4, "validation_every": 3, "sweep": ["te_lr=1e-05", "unet_rank=8"]}
#: Settings at their defaults in variant 0 and moved in variant 1; lora_dropout the other way round.
#: validation_count is moved in variant 1 only and validation_dir in variant 0 only (both at once is refused).
WEIGHT_ALGORITHM_SETTINGS = ("dora", "unet_algorithm", "te_algorithm", "conv_tucker", "lokr_factor")
VARIANTS = (0, 1)
SAMPLE_EMBEDDINGS = [EmbeddingSpec("zed", 3, "a dog"), EmbeddingSpec("kay", 1, "")]
SAMPLE_PROMPTS = ["a photo of zed", "kay on a hill"]


def sample_value(s: DeclaredSetting) -> Any:
    """A value for ``s`` that differs from its default and passes its own limits/choices."""
    if s.name in OVERRIDES:
        return OVERRIDES[s.name]
    if s.kind == "embeddings":
        return list(SAMPLE_EMBEDDINGS)
    if s.kind == "str_list":
        return list(SAMPLE_PROMPTS)
    if s.kind == "bool":
        return not s.default
    if s.choices:
        return next(c for c in reversed(s.choices) if c != s.default)
    limits = s.spec.limits
    if s.kind == "float" and limits is not None and limits.high is not None:
        return 0.75 if s.default == 0.25 else 0.25
    if s.kind == "int":
        return s.default * 2 if s.default else 1
    if s.kind == "float":
        return s.default * 2 if s.default else 0.5
    return f"sample_{s.name}"


def sample_values(variant: int = 0) -> dict[str, Any]:
    """``{setting name: sample value}`` for every declared setting (see :data:`VARIANTS`)."""
    values = {s.name: sample_value(s) for s in declared(TrainConfig)}
    defaults = TrainConfig()
    for name in (WEIGHT_ALGORITHM_SETTINGS + ("validation_count",) if variant == 0
                 else ("lora_dropout", "validation_dir")):
        values[name] = getattr(defaults, name)
    return values


def sample_config(variant: int = 0) -> TrainConfig:
    """A validated config holding every sample value of ``variant``."""
    return TrainConfig(**sample_values(variant)).validate()
