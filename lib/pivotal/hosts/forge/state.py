"""What Forge's loaded model looks like now, for ``GET /pivotal/v1/host``: a training run must leave
every entry as it found it (weights, flags, Forge's LoRA state, memory management, the engines'
embedding databases). Hashing the weights takes seconds on a full-size model."""

from __future__ import annotations

from typing import Any

import torch

from pivotal.hosts.a1111.session import module_flags, weights_fingerprint
from pivotal.hosts.forge.session import FORGE_OBJECT_FIELDS, merged_weight_count
from pivotal.hosts.forge.webui import ForgeWebui


def _role(sd_model: Any, patcher: Any) -> str:
    """Which part of the model a loaded patcher is, and whether it carries LoRA patches."""
    originals = sd_model.forge_objects_original
    for name in FORGE_OBJECT_FIELDS:
        part = getattr(originals, name, None)
        original = getattr(part, "patcher", part)
        if original is None or getattr(original, "model", None) is not getattr(patcher, "model", _NOTHING):
            continue
        loras = len(getattr(patcher, "lora_patches", {}) or {})
        return f"{name} ({'original' if patcher is original else f'clone with {loras} LoRA'})"
    return type(getattr(patcher, "model", patcher)).__name__


_NOTHING = object()


def _objects(sd_model: Any, attr: str) -> dict[str, str]:
    """Which patchers a ForgeObjects holds: the originals or clones (with how many LoRAs)."""
    objs = getattr(sd_model, attr, None)
    originals = sd_model.forge_objects_original
    out: dict[str, str] = {}
    for name in ("unet", "clip"):
        value = getattr(objs, name, None)
        if value is getattr(originals, name, None):
            out[name] = "original"
        else:
            patcher = getattr(value, "patcher", value)
            out[name] = f"clone with {len(getattr(patcher, 'lora_patches', {}) or {})} LoRA"
    return out


def host_state(webui: ForgeWebui) -> dict[str, Any]:
    """The summary (see the module docstring); ``{"loaded": False}`` before Forge loaded a model."""
    try:
        model = webui.sd_model
    except Exception:  # noqa: BLE001 - no model yet is a state, not an error
        return {"loaded": False, "model_pending": True}
    originals = model.forge_objects_original
    parts = {"unet": originals.unet.model, "text_encoders": originals.clip.cond_stage_model,
             "vae": originals.vae.first_stage_model}
    with torch.no_grad():
        weights = {name: weights_fingerprint(m) for name, m in parts.items()}
    flags = {name: module_flags(m) for name, m in parts.items()}
    inference = sum(1 for m in parts.values() for p in m.parameters() if p.is_inference())
    databases = {}
    for attr, engine in webui.engines(model).items():
        db = engine.embeddings
        databases[attr] = {"embeddings": sorted(db.word_embeddings), "ids_lookup": len(db.ids_lookup),
                           "skipped": sorted(db.skipped_embeddings), "clip_skip": engine.clip_skip}
    networks = webui.networks
    cache = getattr(getattr(networks, "load_lora_state_dict", None), "cache_info", None)
    return {
        "loaded": True,
        "checkpoint": str(getattr(getattr(model, "sd_checkpoint_info", None), "title", "")),
        "model_pending": webui.model_pending(),
        "weights": weights,
        "requires_grad": {k: v[0] for k, v in flags.items()},
        "training_modules": {k: v[1] for k, v in flags.items()},
        "instance_forwards": {k: v[2] for k, v in flags.items()},
        "inference_parameters": inference,
        "storage_dtype": str(getattr(originals.unet.model, "storage_dtype", "")),
        "current_lora_hash": str(getattr(model, "current_lora_hash", "")),
        "forge_objects": _objects(model, "forge_objects"),
        "forge_objects_after_applying_lora": _objects(model, "forge_objects_after_applying_lora"),
        "merged_lora_weights": merged_weight_count(model),
        "loaded_models": [_role(model, entry.model) for entry in webui.memory_management.current_loaded_models],
        "lora_state_dicts_cached": getattr(cache(), "currsize", -1) if callable(cache) else -1,
        "embedding_databases": databases,
    }
