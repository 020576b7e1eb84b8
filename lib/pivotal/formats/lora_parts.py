"""The LoRA tensors of a file, whatever wrote it, as kohya-keyed modules of one base model.

Steps (``read_lora_modules``): 1. group keys into modules by their weight names; 2. tell each
module's algorithm and refuse the file, naming them, when one is not applied yet; 3. tell the base
model from metadata, text-encoder prefixes, embeddings and the UNet blocks touched; 4. rename every
module to its kohya name for that base (peft/diffusers names, the other UNet naming) and peft's
``lora_A``/``lora_B`` to ``lora_down``/``lora_up`` with the alpha that gives peft's scale.
Keys that belong to no module are returned as unknown, never dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from pivotal.errors import BundleError
from pivotal.formats.json_limits import loads_limited
from pivotal.formats.lora_algorithms import Algorithm, algorithm_of, refuse_unsupported, split_module_key
from pivotal.formats.lora_keys import (
    kohya_name,
    kohya_part,
    peft_module,
    translate_unet_path,
    unet_base_hint,
    unet_naming,
)

#: safetensors metadata key of diffusers' LoRA config (peft ``LoraConfig`` per component).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_PEFT_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te2": "text_encoder_2"}


@dataclass
class _Module:
    source: str  # "kohya" | "peft"
    part: str
    path: str  # kohya: name after "lora_<part>_"; peft: dotted module path
    name: str  # the name in the file
    algo: Algorithm
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LoraModules:
    """Kohya-keyed LoRA tensors plus what was learnt reading them."""

    tensors: dict[str, torch.Tensor]
    base_hint: str | None  # from the keys alone (TE prefixes, UNet blocks); None: they do not tell
    formats: dict[str, list[str]]  # part -> formats seen ("kohya", "kohya, LDM UNet names", "peft/diffusers")
    algorithms: dict[str, list[str]]  # part -> algorithm names
    unknown: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _group(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, _Module], list[str]]:
    """1-2: modules by file name, and the keys that are no module's."""
    raw: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, t in tensors.items():
        split = split_module_key(key)
        if split is None:
            unknown.append(key)
        else:
            raw.setdefault(split[0], {})[split[1]] = t
    modules: dict[str, _Module] = {}
    for name, weights in raw.items():
        algo = algorithm_of(weights)
        part = kohya_part(name)
        if part is not None:
            source, path = "kohya", name[len(f"lora_{part}_"):]
        else:
            peft = peft_module(name)
            if peft is None or algo is None:
                unknown.extend(f"{name}.{w}" for w in weights)
                continue
            source, (part, path) = "peft", peft
        if algo is None:
            unknown.extend(f"{name}.{w}" for w in weights)
            continue
        modules[name] = _Module(source, part, path, name, algo, weights)
    return modules, unknown


def base_hint(modules: Mapping[str, _Module], sdxl_embeddings: bool, any_embeddings: bool) -> str | None:
    """3: "sd1" / "sdxl" from the keys alone, or None."""
    parts = {m.part for m in modules.values()}
    if parts & {"te1", "te2"} or sdxl_embeddings:
        return "sdxl"
    if "te" in parts or any_embeddings:
        return "sd1"
    unet = [m.path.replace(".", "_") for m in modules.values() if m.part == "unet"]
    return unet_base_hint(unet)


def read_lora_modules(path: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                      sdxl_embeddings: bool, any_embeddings: bool) -> tuple[LoraModules, dict[str, _Module]]:
    """1-3 of the module docstring; :func:`to_kohya` does 4 once the base model is known."""
    modules, unknown = _group(tensors)
    refuse_unsupported(path, {n: m.algo for n, m in modules.items()})
    if any(m.source == "peft" for m in modules.values()):
        _check_peft_config(path, metadata)
    hint = base_hint(modules, sdxl_embeddings, any_embeddings)
    return LoraModules({}, hint, {}, {}, sorted(unknown)), modules


def to_kohya(path: str, read: LoraModules, modules: Mapping[str, _Module], base: str,
             metadata: Mapping[str, str]) -> LoraModules:
    """4: every module under its kohya name for ``base``; ``read`` filled in and returned."""
    config = _peft_config(metadata)
    origin: dict[str, str] = {}
    for m in modules.values():
        if m.source == "kohya":
            name, label = m.name, "kohya"
            if m.part == "unet":
                naming = unet_naming(m.path)
                translated = translate_unet_path(m.path, base)
                if translated != m.path:
                    label = f"kohya, {naming.upper() if naming == 'ldm' else naming} UNet names"
                    name = "lora_unet_" + translated
            weights = dict(m.weights)
        else:
            name, label = kohya_name(m.part, m.path, base), "peft/diffusers"
            weights = _peft_weights(m, config)
        if name in origin:
            raise BundleError(path, f"modules {origin[name]!r} and {m.name!r} are the same layer ({name}); "
                                    "the file is ambiguous", key=m.name)
        origin[name] = m.name
        part = m.part if not (m.part == "te" and base == "sdxl") else "te1"
        read.formats.setdefault(part, [])
        if label not in read.formats[part]:
            read.formats[part].append(label)
        read.algorithms.setdefault(part, [])
        if m.algo.name not in read.algorithms[part]:
            read.algorithms[part].append(m.algo.name)
        for w, t in weights.items():
            read.tensors[f"{name}.{w}"] = t
    return read


def _peft_weights(m: _Module, config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """peft's A/B as kohya down/up, with the alpha that makes alpha / rank equal peft's scale."""
    down, up = m.weights.get("lora_A.weight"), m.weights.get("lora_B.weight")
    out: dict[str, torch.Tensor] = {}
    if down is not None:
        out["lora_down.weight"] = down
    if up is not None:
        out["lora_up.weight"] = up
    if down is None or down.dim() < 1:
        return out  # the shape checks name what is missing
    rank = int(down.shape[0])
    if "alpha" in m.weights:  # diffusers' "network alphas": kohya's meaning already
        out["alpha"] = m.weights["alpha"]
        return out
    prefix = _PEFT_COMPONENTS.get(m.part, "unet")
    r = _pattern(config, prefix, "rank_pattern", m.path, config.get(f"{prefix}.r", rank))
    lora_alpha = _pattern(config, prefix, "alpha_pattern", m.path, config.get(f"{prefix}.lora_alpha", r))
    try:
        # peft: scale = lora_alpha / r (rsLoRA: / sqrt(r)); without a config diffusers uses alpha = r
        scale = float(lora_alpha) / (math.sqrt(float(r)) if config.get(f"{prefix}.use_rslora") else float(r))
    except (TypeError, ValueError, ZeroDivisionError):
        scale = 1.0
    if not math.isfinite(scale):
        scale = 1.0
    out["alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out


def _pattern(config: Mapping[str, Any], prefix: str, which: str, module: str, default: Any) -> Any:
    """peft's per-module override: a pattern key that is the module path or ends it."""
    table = config.get(f"{prefix}.{which}")
    if isinstance(table, dict):
        for key, value in table.items():
            if isinstance(key, str) and (module == key or module.endswith("." + key)):
                return value
    return default


def _peft_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    raw = metadata.get(DIFFUSERS_METADATA_KEY)
    if not raw:
        return {}
    try:
        config = loads_limited(raw)
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def _check_peft_config(path: str, metadata: Mapping[str, str]) -> None:
    config = _peft_config(metadata)
    dora = sorted(k.split(".")[0] for k, v in config.items() if k.endswith(".use_dora") and v is True)
    if dora:
        raise BundleError(path, f"DoRA (use_dora in {DIFFUSERS_METADATA_KEY}, {', '.join(dora)}) is not supported "
                                "yet: Pivotal applies plain LoRA only and refuses rather than apply it wrongly")
