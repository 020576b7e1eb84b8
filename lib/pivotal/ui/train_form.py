"""The Train tab's form values → a validated :class:`TrainConfig` (no gradio here).

The form shows the settings a user changes most; every other setting comes from the ``base``
config the tab was built with (so the webui and the demo can preset e.g. ``bucket_step``).
Number boxes hand back floats, or None when left empty, in every gradio version: each value is
converted here, and a bad one raises ConfigError naming the setting.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from pivotal.errors import ConfigError
from pivotal.training.config import TrainConfig

#: rows of the embeddings table (name, vectors, init text); empty names are skipped
EMBEDDING_ROWS = 3

INT_FIELDS = ("unet_rank", "te_rank", "embedding_steps", "steps", "batch_size", "resolution", "seed",
              "save_every", "preview_every", "grad_accum", "warmup_steps")
FLOAT_FIELDS = ("unet_alpha", "unet_lr", "te_alpha", "te_lr", "embedding_lr", "freeze_embeddings_at",
                "weight_decay", "min_snr_gamma", "noise_offset", "caption_dropout")
TEXT_FIELDS = ("data_dir", "out_dir", "output_name", "lora_preset", "phase_plan", "on_interrupt", "optimizer",
               "schedule", "precision")
BOOL_FIELDS = ("te_lora", "gradient_checkpointing", "flip")


def embedding_field_names() -> list[str]:
    """``emb0_name, emb0_vectors, emb0_init, emb1_name, ...`` in table order."""
    return [f"emb{i}_{part}" for i in range(EMBEDDING_ROWS) for part in ("name", "vectors", "init")]


def form_field_names() -> list[str]:
    """Every value the form hands to the Start / Check handlers, in a fixed order."""
    return [*TEXT_FIELDS, *embedding_field_names(), *INT_FIELDS, *FLOAT_FIELDS, *BOOL_FIELDS,
            "preview_prompts", "resume"]


def form_values_from_config(cfg: TrainConfig) -> dict[str, Any]:
    """Initial form values for ``cfg`` (the inverse of :func:`config_from_form`)."""
    values: dict[str, Any] = {n: getattr(cfg, n) for n in (*TEXT_FIELDS, *INT_FIELDS, *FLOAT_FIELDS, *BOOL_FIELDS)}
    for i in range(EMBEDDING_ROWS):
        spec = cfg.embeddings[i] if i < len(cfg.embeddings) else None
        values[f"emb{i}_name"] = spec.name if spec else ""
        values[f"emb{i}_vectors"] = spec.vectors if spec else 2
        values[f"emb{i}_init"] = spec.init_text if spec else ""
    values["preview_prompts"] = "\n".join(cfg.preview_prompts)
    values["resume"] = ""
    return values


def config_from_form(base: TrainConfig, values: Mapping[str, Any]) -> tuple[TrainConfig, str]:
    """(validated config, resume path or "") from the form's values; ConfigError when one is bad."""
    data = base.to_dict()
    for name in TEXT_FIELDS:
        data[name] = str(values.get(name) or "").strip()
    for name in INT_FIELDS:
        data[name] = _whole(name, values.get(name))
    for name in FLOAT_FIELDS:
        data[name] = _number(name, values.get(name))
    for name in BOOL_FIELDS:
        data[name] = bool(values.get(name))
    data["embeddings"] = _embeddings(values)
    prompts = str(values.get("preview_prompts") or "")
    data["preview_prompts"] = [line.strip() for line in prompts.splitlines() if line.strip()]
    cfg = TrainConfig.from_dict(data).validate()
    return cfg, str(values.get("resume") or "").strip()


def _embeddings(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i in range(EMBEDDING_ROWS):
        name = str(values.get(f"emb{i}_name") or "").strip()
        if not name:
            continue
        vectors = _whole(f"embedding {name!r} vectors", values.get(f"emb{i}_vectors"))
        out.append({"name": name, "vectors": vectors, "init_text": str(values.get(f"emb{i}_init") or "").strip()})
    return out


def _number(name: str, value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{name}: enter a number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name}: {value!r} is not a finite number")
    return v


def _whole(name: str, value: Any) -> int:
    v = _number(name, value)
    if not v.is_integer():
        raise ConfigError(f"{name}: must be a whole number, got {value!r}")
    return int(v)

