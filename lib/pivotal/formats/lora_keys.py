"""Other trainers' LoRA module names, translated to the kohya names Pivotal applies.

Kohya names (what the webuis load) are ``lora_unet_<path>`` / ``lora_te_<path>`` (SD1) /
``lora_te1_`` + ``lora_te2_`` (SDXL), the module path with ``_`` for ``.``; SD1 UNet paths are
the *diffusers* ones, SDXL UNet paths the *LDM* ones (``adapters/unet_targets.KOHYA_UNET_NAMING``).
Other spellings seen in the wild, all read here:

* peft / diffusers (``save_lora_weights``): ``unet.<diffusers path>``, ``text_encoder.<path>``,
  ``text_encoder_2.<path>`` with ``lora_A.weight`` (down) / ``lora_B.weight`` (up); a bare peft
  adapter has ``base_model.model.<path>``;
* kohya names with the other UNet naming: SD1 files with LDM paths (``lora_unet_input_blocks_1_1_…``,
  which A1111 and ComfyUI load) and SDXL files with diffusers paths (diffusers' own kohya
  conversion writes these).

UNet names are translated with the standard block layout of the base model (SD1: 4 levels, SDXL: 3,
two layers per block); the demo models share those indices.
"""

from __future__ import annotations

import re

from pivotal.adapters.unet_names import UNetLayout
from pivotal.errors import ModelLayoutError

#: Standard UNet layouts. Index arithmetic depends only on layers_per_block (2 for every SD1/SDXL
#: model); the flags decide which blocks hold transformers.
LAYOUTS = {
    "sd1": UNetLayout(levels=4, layers_per_block=2, down_attention=(True, True, True, False),
                      up_attention=(False, True, True, True)),
    "sdxl": UNetLayout(levels=3, layers_per_block=2, down_attention=(False, True, True),
                       up_attention=(True, True, False)),
}
KOHYA_PARTS = (("lora_unet_", "unet"), ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te_", "te"))
#: peft / diffusers component prefix -> part ("te" becomes "te1" in an SDXL file).
PEFT_PARTS = (("unet.", "unet"), ("text_encoder_2.", "te2"), ("text_encoder.", "te"))
PEFT_ADAPTER_PREFIX = "base_model.model."

_LDM_HEAD = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.*))?$")
_LDM_MID = re.compile(r"^middle_block_(\d+)(?:_(.*))?$")
_DIFF_HEAD = re.compile(r"^(down_blocks|up_blocks)_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)(?:_(.*))?$")
_DIFF_MID = re.compile(r"^mid_block_(attentions|resnets)_(\d+)(?:_(.*))?$")
# Leaves whose underscore spelling hides a dot (resnet internals, samplers) in each naming.
_LDM_LEAVES = {"in_layers_2": "in_layers.2", "out_layers_3": "out_layers.3", "emb_layers_1": "emb_layers.1",
               "skip_connection": "skip_connection", "op": "op", "conv": "conv"}
_DIFF_LEAVES = {"conv1": "conv1", "conv2": "conv2", "time_emb_proj": "time_emb_proj",
                "conv_shortcut": "conv_shortcut", "conv": "conv"}


def kohya_part(module: str) -> str | None:
    for prefix, part in KOHYA_PARTS:
        if module.startswith(prefix):
            return part
    return None


def unet_naming(path: str) -> str | None:
    """"ldm" / "diffusers" for a kohya UNet path (after ``lora_unet_``), None when neither."""
    if _LDM_HEAD.match(path) or _LDM_MID.match(path):
        return "ldm"
    if _DIFF_HEAD.match(path) or _DIFF_MID.match(path):
        return "diffusers"
    return None


def _dotted(path: str) -> tuple[str, str] | None:
    """(dotted block path the layout can map, attention tail kept in underscores) of a kohya UNet path."""
    m = _LDM_HEAD.match(path)
    if m:
        head, rest = f"{m[1]}.{m[2]}.{m[3]}", m[4] or ""
        leaves = _LDM_LEAVES
    elif (m := _LDM_MID.match(path)) is not None:
        head, rest, leaves = f"middle_block.{m[1]}", m[2] or "", _LDM_LEAVES
    elif (m := _DIFF_HEAD.match(path)) is not None:
        head, rest, leaves = f"{m[1]}.{m[2]}.{m[3]}.{m[4]}", m[5] or "", _DIFF_LEAVES
    elif (m := _DIFF_MID.match(path)) is not None:
        head, rest, leaves = f"mid_block.{m[1]}.{m[2]}", m[3] or "", _DIFF_LEAVES
    else:
        return None
    if rest in leaves:
        return f"{head}.{leaves[rest]}", ""
    return head, rest


def translate_unet_path(path: str, base: str) -> str:
    """The kohya UNet path (after ``lora_unet_``) in the naming ``base`` uses; unchanged when it is
    already, or when it has no counterpart (it is then reported as matching no module)."""
    want = "diffusers" if base == "sd1" else "ldm"
    have = unet_naming(path)
    split = _dotted(path)
    if have in (None, want) or split is None:
        return path
    head, tail = split
    layout = LAYOUTS[base]
    try:
        mapped = layout.to_diffusers(head) if want == "diffusers" else layout.to_ldm(head)
    except ModelLayoutError:
        return path
    out = mapped.replace(".", "_")
    return f"{out}_{tail}" if tail else out


def peft_module(module: str) -> tuple[str, str] | None:
    """(part, dotted module path) of a peft / diffusers module name; None when it is not one.

    A bare peft adapter (``base_model.model.<path>``) is a UNet or a text encoder by its path.
    """
    if module.startswith(PEFT_ADAPTER_PREFIX):
        path = module[len(PEFT_ADAPTER_PREFIX):]
        return ("te" if path.startswith("text_model.") else "unet"), path
    for prefix, part in PEFT_PARTS:
        if module.startswith(prefix):
            return part, module[len(prefix):]
    return None


def kohya_name(part: str, path: str, base: str) -> str:
    """The kohya module name of a dotted module path of ``part`` in a ``base`` model."""
    if part == "unet":
        if base == "sdxl":
            try:
                path = LAYOUTS["sdxl"].to_ldm(path)
            except ModelLayoutError:
                pass  # no counterpart: left as is, reported as matching no module
        return "lora_unet_" + path.replace(".", "_")
    if part == "te" and base == "sdxl":
        part = "te1"
    return f"lora_{part}_" + path.replace(".", "_")


def unet_base_hint(paths: list[str]) -> str | None:
    """"sd1" / "sdxl" from the UNet blocks a LoRA touches (kohya paths after ``lora_unet_``, either
    naming), or None when they do not tell. SD1 has transformers in the first level and one
    transformer per block; SDXL has none in the first level, several per block, and only 3 levels.
    """
    sd1 = re.compile(r"^(input_blocks_[12]_1_|input_blocks_1[01]_|output_blocks_(9|1[01])_|down_blocks_0_attentions_"
                     r"|down_blocks_3_|up_blocks_3_)")
    sdxl = re.compile(r"(^output_blocks_[012]_1_|^up_blocks_0_attentions_|_transformer_blocks_[1-9]_|^label_emb)")
    votes = {"sd1": any(sd1.match(p) for p in paths), "sdxl": any(sdxl.search(p) for p in paths)}
    if votes["sd1"] != votes["sdxl"]:
        return "sd1" if votes["sd1"] else "sdxl"
    return None
