"""Module and parameter names of the SD UNet in its two layouts, and the mapping between them.

The webui runs the LDM ``UNetModel`` (``input_blocks.N.M``, ``middle_block``, ``output_blocks``);
the standalone host runs diffusers' ``UNet2DConditionModel`` (``down_blocks.i.resnets.j``,
``mid_block``, ``up_blocks``). Kohya LoRA files name SD1 modules the diffusers way and SDXL
modules the LDM way, so whichever model we are attached to, some names must be translated.

Everything here works on names and module *structure* only. Nothing imports diffusers: the webui
environment does not have it.

With ``n = layers_per_block`` the block indices are::

    down_blocks.i.resnets.j / attentions.j  <->  input_blocks.{1 + i*(n+1) + j}.0 / .1
    down_blocks.i.downsamplers.0            <->  input_blocks.{(i+1)*(n+1)}.0  (conv <-> op)
    mid_block.resnets.0 / attentions.0 / resnets.1  <->  middle_block.0 / .1 / .2
    up_blocks.i.resnets.j / attentions.j    <->  output_blocks.{i*(n+1) + j}.0 / .1
    up_blocks.i.upsamplers.0                <->  output_blocks.{i*(n+1) + n}.{2 if attention else 1}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, cast

import torch
from torch import nn

from pivotal.errors import ModelLayoutError

# Resnet internals: diffusers ResnetBlock2D name -> LDM ResBlock name. The LDM side keeps its
# layers in Sequentials, hence the numeric indices (SiLU and Dropout fill the gaps).
_RESNET_TO_LDM: dict[str, tuple[str, ...]] = {
    "norm1": ("in_layers", "0"),
    "conv1": ("in_layers", "2"),
    "time_emb_proj": ("emb_layers", "1"),
    "norm2": ("out_layers", "0"),
    "conv2": ("out_layers", "3"),
    "conv_shortcut": ("skip_connection",),
}
_RESNET_TO_DIFFUSERS: dict[tuple[str, ...], str] = {v: k for k, v in _RESNET_TO_LDM.items()}

# Top-level leaves outside the blocks: diffusers prefix -> LDM prefix.
_TOP_TO_LDM: dict[tuple[str, ...], tuple[str, ...]] = {
    ("conv_in",): ("input_blocks", "0", "0"),
    ("time_embedding", "linear_1"): ("time_embed", "0"),
    ("time_embedding", "linear_2"): ("time_embed", "2"),
    # SDXL "text_time" embedding; sgm's label_emb is Sequential(Sequential(Linear, SiLU, Linear)).
    ("add_embedding", "linear_1"): ("label_emb", "0", "0"),
    ("add_embedding", "linear_2"): ("label_emb", "0", "2"),
    ("conv_norm_out",): ("out", "0"),
    ("conv_out",): ("out", "2"),
}
_TOP_TO_DIFFUSERS: dict[tuple[str, ...], tuple[str, ...]] = {v: k for k, v in _TOP_TO_LDM.items()}

_DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}
_UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
_MID_TYPES = {"UNetMidBlock2DCrossAttn": True}


def _no_counterpart(path: str, side: str, why: str = "") -> ModelLayoutError:
    detail = f" ({why})" if why else ""
    return ModelLayoutError(f"UNet name {path!r} has no {side} counterpart{detail}")


def _index(part: str, path: str, side: str) -> int:
    """A block index; only canonical decimals, so that mapping there and back is the identity."""
    if not part.isdecimal() or str(int(part)) != part:
        raise _no_counterpart(path, side, f"{part!r} is not a block index")
    return int(part)


def _strip_prefix(parts: Sequence[str], table: Mapping[tuple[str, ...], tuple[str, ...]]):
    """The table key that prefixes ``parts`` (no key prefixes another), mapped, plus the rest."""
    for key, value in table.items():
        if tuple(parts[: len(key)]) == key:
            return list(value) + list(parts[len(key):])
    return None


@dataclass(frozen=True)
class UNetLayout:
    """The block structure both layouts share; all that the name mapping needs to know.

    ``down_attention[i]``: diffusers ``down_blocks.i`` has transformers. ``up_attention[i]``:
    ``up_blocks.i`` has them (up level 0 is the lowest resolution, as in diffusers).
    """

    levels: int
    layers_per_block: int
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    mid_attention: bool = True

    def __post_init__(self) -> None:
        if self.levels < 1 or self.layers_per_block < 1:
            raise ModelLayoutError(f"UNet layout needs levels >= 1 and layers_per_block >= 1, got "
                                   f"{self.levels} and {self.layers_per_block}")
        if len(self.down_attention) != self.levels or len(self.up_attention) != self.levels:
            raise ModelLayoutError(f"UNet layout has {self.levels} levels but attention flags for "
                                   f"{len(self.down_attention)} down and {len(self.up_attention)} up levels")

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, unet: Any) -> "UNetLayout":
        """Layout of a diffusers ``UNet2DConditionModel`` (or its ``config`` mapping)."""
        config = getattr(unet, "config", unet)
        if not isinstance(config, Mapping):
            raise ModelLayoutError(f"{type(unet).__name__} has no diffusers config; not a diffusers UNet")
        try:
            down_types = tuple(config["down_block_types"])
            up_types = tuple(config["up_block_types"])
            lpb = config["layers_per_block"]
            mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        except KeyError as e:
            raise ModelLayoutError(f"diffusers UNet config lacks {e.args[0]!r}") from None
        if isinstance(lpb, (list, tuple)):
            # Per-level counts exist in diffusers; no LDM UNet the webui loads has them.
            if len(set(lpb)) != 1:
                raise ModelLayoutError(f"diffusers UNet has per-level layers_per_block {list(lpb)}; "
                                       "only a uniform count has an LDM counterpart")
            lpb = lpb[0]
        if len(down_types) != len(up_types):
            raise ModelLayoutError(f"diffusers UNet has {len(down_types)} down and {len(up_types)} up blocks")
        for kind, types, known in (("down", down_types, _DOWN_TYPES), ("up", up_types, _UP_TYPES),
                                   ("mid", (mid_type,), _MID_TYPES)):
            for t in types:
                if t not in known:
                    raise ModelLayoutError(f"diffusers UNet {kind} block type {t!r} has no LDM counterpart "
                                           f"(supported: {', '.join(known)})")
        return cls(levels=len(down_types), layers_per_block=int(lpb),
                   down_attention=tuple(_DOWN_TYPES[t] for t in down_types),
                   up_attention=tuple(_UP_TYPES[t] for t in up_types),
                   mid_attention=_MID_TYPES[mid_type])

    @classmethod
    def from_ldm(cls, unet: nn.Module) -> "UNetLayout":
        """Layout of an LDM / sgm ``UNetModel``, read from its module structure."""
        if not is_ldm_unet(unet):
            raise ModelLayoutError(f"{type(unet).__name__} is not an LDM UNetModel (no input_blocks / "
                                   "middle_block / output_blocks / time_embed)")
        down, n = _ldm_down_levels(cast(nn.ModuleList, unet.input_blocks))
        up = _ldm_up_levels(cast(nn.ModuleList, unet.output_blocks), len(down), n)
        return cls(levels=len(down), layers_per_block=n, down_attention=down, up_attention=up,
                   mid_attention=_ldm_mid_attention(cast(nn.Module, unet.middle_block)))

    # -- name mapping ------------------------------------------------------------------------
    def to_ldm(self, path: str) -> str:
        """The LDM name of a diffusers module or parameter path (ModelLayoutError if none)."""
        parts = path.split(".")
        n = self.layers_per_block
        top = _strip_prefix(parts, _TOP_TO_LDM)
        if top is not None:
            return ".".join(top)
        head = parts[0]
        if head == "down_blocks" and len(parts) >= 4:
            i, kind, j = _index(parts[1], path, "LDM"), parts[2], _index(parts[3], path, "LDM")
            rest = parts[4:]
            if i >= self.levels:
                raise _no_counterpart(path, "LDM", f"the UNet has {self.levels} levels")
            if kind == "resnets" and j < n:
                return _join("input_blocks", 1 + i * (n + 1) + j, "0", *_resnet_to_ldm(rest, path))
            if kind == "attentions" and j < n and self.down_attention[i]:
                return _join("input_blocks", 1 + i * (n + 1) + j, "1", *rest)
            if kind == "downsamplers" and j == 0 and i < self.levels - 1 and rest[:1] in ([], ["conv"]):
                # diffusers calls the downsampling conv "conv", LDM calls it "op".
                return _join("input_blocks", (i + 1) * (n + 1), "0", *(["op", *rest[1:]] if rest else []))
        elif head == "mid_block" and len(parts) >= 3:
            kind, j, rest = parts[1], _index(parts[2], path, "LDM"), parts[3:]
            if kind == "resnets" and j in (0, 1):
                k = 0 if j == 0 else (2 if self.mid_attention else 1)
                return _join("middle_block", k, *_resnet_to_ldm(rest, path))
            if kind == "attentions" and j == 0 and self.mid_attention:
                return _join("middle_block", 1, *rest)
        elif head == "up_blocks" and len(parts) >= 4:
            i, kind, j = _index(parts[1], path, "LDM"), parts[2], _index(parts[3], path, "LDM")
            rest = parts[4:]
            if i >= self.levels:
                raise _no_counterpart(path, "LDM", f"the UNet has {self.levels} levels")
            if kind == "resnets" and j <= n:
                return _join("output_blocks", i * (n + 1) + j, "0", *_resnet_to_ldm(rest, path))
            if kind == "attentions" and j <= n and self.up_attention[i]:
                return _join("output_blocks", i * (n + 1) + j, "1", *rest)
            if kind == "upsamplers" and j == 0 and i < self.levels - 1 and rest[:1] in ([], ["conv"]):
                return _join("output_blocks", i * (n + 1) + n, 2 if self.up_attention[i] else 1, *rest)
        raise _no_counterpart(path, "LDM")

    def to_diffusers(self, path: str) -> str:
        """The diffusers name of an LDM module or parameter path (ModelLayoutError if none)."""
        parts = path.split(".")
        n = self.layers_per_block
        top = _strip_prefix(parts, _TOP_TO_DIFFUSERS)
        if top is not None:
            return ".".join(top)
        head = parts[0]
        if head == "input_blocks" and len(parts) >= 3:
            k, child, rest = _index(parts[1], path, "diffusers"), parts[2], parts[3:]
            level, j = divmod(k - 1, n + 1)
            if 1 <= k and level < self.levels:
                if j == n and child == "0" and level < self.levels - 1 and rest[:1] in ([], ["op"]):
                    conv = ["conv", *rest[1:]] if rest else []
                    return _join("down_blocks", level, "downsamplers", 0, *conv)
                elif j < n and child == "0":
                    return _join("down_blocks", level, "resnets", j, *_resnet_to_diffusers(rest, path))
                elif j < n and child == "1" and self.down_attention[level]:
                    return _join("down_blocks", level, "attentions", j, *rest)
        elif head == "middle_block" and len(parts) >= 2:
            k, rest = _index(parts[1], path, "diffusers"), parts[2:]
            last = 2 if self.mid_attention else 1
            if k in (0, last):
                return _join("mid_block", "resnets", 0 if k == 0 else 1, *_resnet_to_diffusers(rest, path))
            if k == 1 and self.mid_attention:
                return _join("mid_block", "attentions", 0, *rest)
        elif head == "output_blocks" and len(parts) >= 3:
            k, c = _index(parts[1], path, "diffusers"), _index(parts[2], path, "diffusers")
            rest = parts[3:]
            i, j = divmod(k, n + 1)
            if i < self.levels:
                sampler = 2 if self.up_attention[i] else 1
                if c == 0:
                    return _join("up_blocks", i, "resnets", j, *_resnet_to_diffusers(rest, path))
                if c == 1 and self.up_attention[i]:
                    return _join("up_blocks", i, "attentions", j, *rest)
                if c == sampler and j == n and i < self.levels - 1 and rest[:1] in ([], ["conv"]):
                    return _join("up_blocks", i, "upsamplers", 0, *rest)
        raise _no_counterpart(path, "diffusers")


def _join(*parts: object) -> str:
    return ".".join(str(p) for p in parts)


def _resnet_to_ldm(rest: Sequence[str], path: str) -> list[str]:
    if not rest:
        return []
    mapped = _RESNET_TO_LDM.get(rest[0])
    if mapped is None:
        raise _no_counterpart(path, "LDM", f"resnet part {rest[0]!r}")
    return [*mapped, *rest[1:]]


def _resnet_to_diffusers(rest: Sequence[str], path: str) -> list[str]:
    if not rest:
        return []
    for key, name in _RESNET_TO_DIFFUSERS.items():
        if tuple(rest[: len(key)]) == key:
            return [name, *rest[len(key):]]
    raise _no_counterpart(path, "diffusers", f"resnet part {'.'.join(rest)!r}")


# -- LDM structure ---------------------------------------------------------------------------
# Judged by attributes, not classes: the webui's SD1 model (ldm) and SDXL model (sgm) define
# their own, identically shaped, ResBlock / SpatialTransformer / Upsample / Downsample classes.
def _is_resblock(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("in_layers", "emb_layers", "out_layers"))


def _is_transformer(m: nn.Module) -> bool:
    return hasattr(m, "transformer_blocks") and hasattr(m, "proj_in")


def _is_plain_resblock(m: nn.Module) -> bool:
    # resblock_updown=True models resample inside a ResBlock; diffusers' SD blocks never do.
    return _is_resblock(m) and not getattr(m, "updown", False)


def _ldm_down_levels(blocks: nn.ModuleList) -> tuple[tuple[bool, ...], int]:
    """Per-level attention flags and the resnets per level, from ``input_blocks``."""
    levels: list[list[bool]] = [[]]
    for k, block in enumerate(list(blocks)[1:], start=1):
        children = list(block.children())
        if len(children) == 1 and hasattr(children[0], "op") and levels[-1]:
            levels.append([])  # a Downsample closes the level
            continue
        if (not children or not _is_plain_resblock(children[0]) or len(children) > 2
                or (len(children) == 2 and not _is_transformer(children[1]))):
            raise ModelLayoutError(f"LDM UNet input_blocks.{k} is neither resnet[+transformer] nor a "
                                   "downsampler where one is expected")
        levels[-1].append(len(children) == 2)
    if not levels[-1]:
        raise ModelLayoutError("LDM UNet input_blocks end with a downsampler")
    counts = sorted({len(flags) for flags in levels})
    if len(counts) != 1:
        raise ModelLayoutError(f"LDM UNet levels have different resnet counts {counts}; "
                               "only a uniform count has a diffusers counterpart")
    attention = []
    for i, flags in enumerate(levels):
        if len(set(flags)) != 1:
            # num_attention_blocks can do this in LDM; diffusers blocks are all-or-nothing.
            raise ModelLayoutError(f"LDM UNet down level {i} has transformers in only some blocks")
        attention.append(flags[0])
    return tuple(attention), counts[0]


def _ldm_up_levels(blocks: nn.ModuleList, levels: int, n: int) -> tuple[bool, ...]:
    """Per-up-level attention flags from ``output_blocks``, checking the upsamplers' places."""
    if len(blocks) != levels * (n + 1):
        raise ModelLayoutError(f"LDM UNet has {len(blocks)} output_blocks; {levels} levels of "
                               f"{n} resnets need {levels * (n + 1)}")
    attention: list[bool] = []
    for i in range(levels):
        flags = set()
        for j in range(n + 1):
            k = i * (n + 1) + j
            children = list(blocks[k].children())
            if not children or not _is_plain_resblock(children[0]):
                raise ModelLayoutError(f"LDM UNet output_blocks.{k}.0 is not a resnet")
            rest = children[1:]
            has_attention = bool(rest) and _is_transformer(rest[0])
            rest = rest[1:] if has_attention else rest
            wants_sampler = j == n and i < levels - 1
            is_sampler = len(rest) == 1 and isinstance(getattr(rest[0], "conv", None), nn.Conv2d)
            if is_sampler != wants_sampler or (rest and not is_sampler):
                raise ModelLayoutError(f"LDM UNet output_blocks.{k} has an unexpected structure "
                                       f"({', '.join(type(c).__name__ for c in children)})")
            flags.add(has_attention)
        if len(flags) != 1:
            raise ModelLayoutError(f"LDM UNet up level {i} has transformers in only some blocks")
        attention.append(flags.pop())
    return tuple(attention)


def _ldm_mid_attention(block: nn.Module) -> bool:
    kinds = ["resnet" if _is_plain_resblock(c) else "transformer" if _is_transformer(c) else "other"
             for c in block.children()]
    if kinds == ["resnet", "transformer", "resnet"]:
        return True
    if kinds == ["resnet", "resnet"]:
        return False
    raise ModelLayoutError(f"LDM UNet middle_block has an unexpected structure ({', '.join(kinds)})")


# -- state dicts -----------------------------------------------------------------------------
def _rename(state_dict: Mapping[str, torch.Tensor], rename: Callable[[str], str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        new = rename(key)
        if new in out:
            # Cannot happen for a bijective mapping; guards against a broken layout silently
            # dropping weights.
            raise ModelLayoutError(f"UNet keys {source[new]!r} and {key!r} both map to {new!r}")
        out[new] = value
        source[new] = key
    return out


def convert_diffusers_unet_to_ldm(state_dict: Mapping[str, torch.Tensor],
                                  layout: UNetLayout) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict (keys relative to the UNet) to LDM names.

    Tensors are shared, not copied: proj_in/proj_out have the same shape on both sides (1x1 conv
    for SD1, Linear for SDXL). ModelLayoutError for a key with no LDM counterpart.
    """
    return _rename(state_dict, layout.to_ldm)


def convert_ldm_unet_to_diffusers(state_dict: Mapping[str, torch.Tensor],
                                  layout: UNetLayout) -> dict[str, torch.Tensor]:
    """Rename an LDM UNet state dict (keys relative to the UNet, no ``model.diffusion_model.``)."""
    return _rename(state_dict, layout.to_diffusers)


# -- detection by structure ------------------------------------------------------------------
def is_ldm_unet(module: object) -> bool:
    """True for an LDM / sgm ``UNetModel`` (webui), judged by its attributes, not its class."""
    return (isinstance(module, nn.Module)
            and all(isinstance(getattr(module, a, None), nn.ModuleList)
                    for a in ("input_blocks", "output_blocks"))
            and isinstance(getattr(module, "middle_block", None), nn.Module)
            and isinstance(getattr(module, "time_embed", None), nn.Module))


def is_diffusers_unet(module: object) -> bool:
    """True for a diffusers ``UNet2DConditionModel``, judged by its attributes and config."""
    return (isinstance(module, nn.Module)
            and all(isinstance(getattr(module, a, None), nn.ModuleList) for a in ("down_blocks", "up_blocks"))
            and isinstance(getattr(module, "conv_in", None), nn.Module)
            and isinstance(getattr(module, "config", None), Mapping))
