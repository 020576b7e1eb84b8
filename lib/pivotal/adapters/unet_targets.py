"""Which UNet modules get a LoRA, and under which kohya key, for a diffusers or an LDM UNet.

Kohya keys are what the webuis (A1111, Forge, ComfyUI) load, and they name the UNet differently
per base model: SD1 files use the *diffusers* module path (``lora_unet_down_blocks_0_attentions_0_
proj_in``), SDXL files the *LDM* path (``lora_unet_input_blocks_4_1_proj_in``). The key must not
depend on which host we train in, so names are translated through :class:`UNetLayout` whichever
side the model is.

Presets are defined once, on diffusers names; an LDM model's names are mapped to diffusers first.
"""

from __future__ import annotations

import re

from torch import nn

from pivotal.adapters.lora_layers import is_linear_like
from pivotal.adapters.unet_names import UNetLayout, is_diffusers_unet, is_ldm_unet
from pivotal.errors import LoraTargetError, ModelLayoutError

#: The preset names, smallest first.
PRESETS: tuple[str, ...] = ("attn", "attn-mlp", "attn-mlp-conv")
#: Base model -> which naming its kohya UNet keys use.
KOHYA_UNET_NAMING: dict[str, str] = {"sd1": "diffusers", "sdxl": "ldm"}
#: The user-facing setting the preset comes from, named in errors.
PRESET_SETTING = "lora_targets"

_BLOCK = r"^(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)\."
_ATTN = [_BLOCK + r"attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out\.0)$"]
_MLP = [
    _BLOCK + r"attentions\.\d+\.transformer_blocks\.\d+\.ff\.net\.(?:0\.proj|2)$",
    _BLOCK + r"attentions\.\d+\.(?:proj_in|proj_out)$",
]
_CONV = [
    _BLOCK + r"resnets\.\d+\.(?:conv1|conv2|conv_shortcut|time_emb_proj)$",
    _BLOCK + r"(?:downsamplers|upsamplers)\.0\.conv$",
]
_PATTERNS: dict[str, re.Pattern[str]] = {
    "attn": re.compile("|".join(_ATTN)),
    "attn-mlp": re.compile("|".join(_ATTN + _MLP)),
    "attn-mlp-conv": re.compile("|".join(_ATTN + _MLP + _CONV)),
}


def kohya_unet_key(diffusers_name: str, layout: UNetLayout, base: str) -> str:
    """The kohya key of the UNet module with this diffusers name, for ``base``."""
    naming = _naming(base)
    path = diffusers_name if naming == "diffusers" else layout.to_ldm(diffusers_name)
    return "lora_unet_" + path.replace(".", "_")


def unet_lora_targets(unet: nn.Module, base: str, preset: str) -> list[tuple[str, nn.Module]]:
    """(kohya key, module) for every Linear / Conv2d the preset selects, sorted by key.

    ``unet`` is a diffusers ``UNet2DConditionModel`` or an LDM/sgm ``UNetModel`` (detected by
    structure). LoraTargetError for an unknown base or preset, or when nothing matches;
    ModelLayoutError when the UNet's layout is not one we can name.
    """
    _naming(base)
    pattern = _PATTERNS.get(preset)
    if pattern is None:
        raise LoraTargetError(f"unknown LoRA target preset {preset!r} (setting: {PRESET_SETTING}; "
                              f"allowed: {', '.join(PRESETS)})")
    if is_diffusers_unet(unet):
        layout, side = UNetLayout.from_diffusers(unet), "diffusers"
    elif is_ldm_unet(unet):
        layout, side = UNetLayout.from_ldm(unet), "ldm"
    else:
        raise ModelLayoutError(f"{type(unet).__name__} is neither a diffusers nor an LDM UNet")
    found: list[tuple[str, nn.Module]] = []
    for name, module in unet.named_modules():
        if not (isinstance(module, nn.Conv2d) or is_linear_like(module)):
            continue
        if side == "diffusers":
            diffusers_name = name
        else:
            try:
                diffusers_name = layout.to_diffusers(name)
            except ModelLayoutError:
                # Layers outside the mapped blocks (extras some LDM variants carry, e.g.
                # id_predictor) have no diffusers name and so are in no preset.
                continue
        if pattern.match(diffusers_name):
            found.append((kohya_unet_key(diffusers_name, layout, base), module))
    if not found:
        raise LoraTargetError(f"LoRA target preset {preset!r} matched no Linear/Conv2d module of this "
                              f"{side} UNet ({type(unet).__name__})")
    found.sort(key=lambda kv: kv[0])
    return found


def _naming(base: str) -> str:
    naming = KOHYA_UNET_NAMING.get(base)
    if naming is None:
        raise LoraTargetError(f"unknown base model {base!r} for UNet LoRA targets "
                              f"(allowed: {', '.join(KOHYA_UNET_NAMING)})")
    return naming
