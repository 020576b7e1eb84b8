"""Parameter names of SD's VAE in its two layouts: diffusers ``AutoencoderKL`` and the LDM
``AutoencoderKL`` the webui runs (``ldm.modules.diffusionmodules.model.Encoder`` / ``Decoder``).

With ``L`` levels::

    encoder.down_blocks.i.resnets.j      <->  encoder.down.i.block.j
    encoder.down_blocks.i.downsamplers.0 <->  encoder.down.i.downsample
    decoder.up_blocks.i.resnets.j        <->  decoder.up.{L-1-i}.block.j     (LDM counts up from
    decoder.up_blocks.i.upsamplers.0     <->  decoder.up.{L-1-i}.upsample     the lowest resolution)
    *.mid_block.resnets.0 / .1           <->  *.mid.block_1 / block_2
    *.mid_block.attentions.0             <->  *.mid.attn_1  (group_norm/to_q/to_k/to_v/to_out.0 <->
                                                             norm/q/k/v/proj_out)
    *.conv_norm_out                      <->  *.norm_out
    resnet conv_shortcut                 <->  nin_shortcut

diffusers' mid-block attention projections are ``nn.Linear`` (C, C); LDM's are 1x1 convolutions
(C, C, 1, 1), so those weights are reshaped. Nothing here imports diffusers.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from pivotal.errors import ModelLayoutError

_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_TOP_TO_LDM = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
_RESNET_TO_LDM = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "conv_shortcut": "nin_shortcut"}

_BLOCK = re.compile(r"^(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets\.(\d+)|downsamplers\.0|upsamplers\.0)"
                    r"\.(.+)$")
_MID = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets\.([01])|attentions\.0)\.(.+)$")
_TOP = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)\.(weight|bias)$")


def _resnet_rest(rest: str, name: str) -> str:
    layer, _, leaf = rest.partition(".")
    if layer not in _RESNET_TO_LDM or leaf not in ("weight", "bias"):
        raise ModelLayoutError(f"VAE parameter {name!r} has no LDM counterpart")
    return f"{_RESNET_TO_LDM[layer]}.{leaf}"


def vae_name_to_ldm(name: str, levels: int) -> str:
    """The LDM name of diffusers VAE parameter ``name`` (ModelLayoutError if it has none)."""
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    m = _TOP.match(name)
    if m:
        return f"{m.group(1)}.{_TOP_TO_LDM[m.group(2)]}.{m.group(3)}"
    m = _MID.match(name)
    if m:
        side, rest = m.group(1), m.group(4)
        if m.group(3) is not None:
            return f"{side}.mid.block_{int(m.group(3)) + 1}.{_resnet_rest(rest, name)}"
        for diff, ldm in _ATTN_TO_LDM.items():
            if rest.startswith(diff + ".") and rest[len(diff) + 1:] in ("weight", "bias"):
                return f"{side}.mid.attn_1.{ldm}.{rest[len(diff) + 1:]}"
        raise ModelLayoutError(f"VAE parameter {name!r} has no LDM counterpart")
    m = _BLOCK.match(name)
    if m:
        i = int(m.group(2))
        if i >= levels:
            raise ModelLayoutError(f"VAE parameter {name!r}: the VAE has {levels} levels")
        encoder = m.group(1).startswith("encoder")
        side, level = ("encoder.down", i) if encoder else ("decoder.up", levels - 1 - i)
        rest = m.group(5)
        if m.group(4) is not None:
            return f"{side}.{level}.block.{m.group(4)}.{_resnet_rest(rest, name)}"
        sampler = "downsample" if encoder else "upsample"
        if (m.group(3).startswith("down") != encoder) or rest not in ("conv.weight", "conv.bias"):
            raise ModelLayoutError(f"VAE parameter {name!r} has no LDM counterpart")
        return f"{side}.{level}.{sampler}.{rest}"
    raise ModelLayoutError(f"VAE parameter {name!r} has no LDM counterpart")


def vae_state_to_ldm(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict renamed (and attention weights reshaped) for the LDM layout."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        ldm = vae_name_to_ldm(name, levels)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and value.dim() == 2:
            value = value.reshape(*value.shape, 1, 1)  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[ldm] = value
    return out
