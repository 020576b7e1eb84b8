"""The kohya key spelling, in one place: ``<part prefix><module path>.<tensor name>``.

A LoRA file (kohya, LyCORIS, Pivotal's bundle) names each adapted host module
``lora_unet_…`` / ``lora_te_…`` (SD1) / ``lora_te1_…`` + ``lora_te2_…`` (SDXL), and each of its
tensors ``<module name>.<tensor name>``. The tensor names belong to the algorithm
(``lora_down.weight``, ``hada_w1_a``, ``lokr_w1``…: see :mod:`pivotal.adapters.algorithms`); two are
shared by every algorithm and are spelled here: ``alpha`` and ``dora_scale``.

A packed ``nn.MultiheadAttention`` (open_clip's text tower) is written as four modules named
``<module>_q_proj`` / ``_k_proj`` / ``_v_proj`` / ``_out_proj``, the names the equivalent HF
``CLIPTextModel`` layers have.
"""

from __future__ import annotations

from typing import Iterable

from pivotal.errors import LoraTargetError

#: Kohya key prefix → part of the model. Order matters: ``lora_te1_`` before ``lora_te_``.
PART_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
)
#: The prefixes each base model's files may use.
BASE_PREFIXES: dict[str, tuple[str, ...]] = {
    "sd1": ("lora_unet_", "lora_te_"),
    "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_"),
}
#: Tensor names every algorithm shares.
ALPHA = "alpha"
DORA_SCALE = "dora_scale"
#: Module-name suffixes of a packed MultiheadAttention, in the order of the packed in_proj rows
#: (q, k, v), then the output projection.
MHA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def part_of_key(key: str) -> str:
    """The model part ("unet", "te", "te1", "te2") a kohya key belongs to."""
    for prefix, part in PART_PREFIXES:
        if key.startswith(prefix):
            return part
    raise LoraTargetError(f"LoRA key {key!r} has no known prefix (expected one of "
                          f"{', '.join(p for p, _ in PART_PREFIXES)})")


def part_prefix(part: str) -> str:
    """``"unet"`` → ``"lora_unet_"``; LoraTargetError for an unknown part."""
    for prefix, p in PART_PREFIXES:
        if p == part:
            return prefix
    raise LoraTargetError(f"unknown model part {part!r} (known: {', '.join(p for _, p in PART_PREFIXES)})")


def has_part_prefix(key: str) -> bool:
    return key.startswith(tuple(p for p, _ in PART_PREFIXES))


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x.lora_down.weight"`` → ``("lora_unet_x", "lora_down.weight")``."""
    module, _, tensor = key.partition(".")
    return module, tensor


def tensor_key(module: str, tensor: str) -> str:
    return f"{module}.{tensor}"


def group_by_module(tensors: dict) -> dict[str, dict]:
    """``{key: value}`` → ``{module name: {tensor name: value}}``."""
    mods: dict[str, dict] = {}
    for k, v in tensors.items():
        module, tensor = split_key(k)
        mods.setdefault(module, {})[tensor] = v
    return mods


def mha_module_names(key: str) -> list[str]:
    """The four kohya module names a packed MultiheadAttention at ``key`` is saved as."""
    return [f"{key}_{p}" for p in MHA_PROJECTIONS]


def count_parts(keys: Iterable[str]) -> dict[str, int]:
    """Number of kohya *modules* per part among tensor ``keys``."""
    names = {split_key(k)[0] for k in keys}
    counts: dict[str, int] = {}
    for n in names:
        p = part_of_key(n)
        counts[p] = counts.get(p, 0) + 1
    return counts
