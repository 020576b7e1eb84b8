"""A valid value away from its default for every declared setting (for the reachability tests).

Derived from each declaration (kind, limits, choices), so a new setting gets a sample without
editing this file; ``OVERRIDES`` is for a setting whose derived value would not validate.
"""

from __future__ import annotations

from typing import Any

from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.settings import DeclaredSetting, declared

OVERRIDES: dict[str, Any] = {}
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
    if s.spec.choices:
        return next(c for c in reversed(s.spec.choices) if c != s.default)
    limits = s.spec.limits
    if s.kind == "float" and limits is not None and limits.high is not None:
        return 0.75 if s.default == 0.25 else 0.25
    if s.kind == "int":
        return s.default * 2 if s.default else 1
    if s.kind == "float":
        return s.default * 2 if s.default else 0.5
    return f"sample_{s.name}"


def sample_values() -> dict[str, Any]:
    """``{setting name: sample value}`` for every declared setting."""
    return {s.name: sample_value(s) for s in declared(TrainConfig)}


def sample_config() -> TrainConfig:
    """A validated config holding every sample value."""
    return TrainConfig(**sample_values()).validate()
