"""diffusers / transformers configs for the parts of a single-file checkpoint, read off its shapes.

A single file holds weights only. Sizes (channels, levels, blocks per level, transformer depth,
context width, text width and depth, vocabulary) are read from the tensors' shapes; what shapes
cannot tell (attention heads, activation functions, the VAE's latent scale, the sample size) comes
from the family's published config, shipped in ``configs/*.json`` (``sd1_*`` = SD 1.5,
``sdxl_*`` = SDXL base 1.0), or from a same-named ``.yaml`` next to the checkpoint (the LDM config
a webui reads for non-standard models; :func:`read_yaml_hints`). The families' head rules:
SD 1.x UNets have 8 heads per transformer, SDXL UNets 64 channels per head, CLIP text encoders
64 channels per head.

All functions take ``shapes``: key -> shape, keys relative to the part (no
``model.diffusion_model.`` etc.). Nothing here imports diffusers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from pivotal.errors import ConfigError, ModelLayoutError

Shapes = Mapping[str, tuple[int, ...]]
#: Channels per attention head in CLIP text encoders (ViT-L: 768 / 12, bigG: 1280 / 20).
CLIP_HEAD_CHANNELS = 64
#: The UNet head rule per family: ("heads", 8) = 8 heads everywhere, ("channels", 64) = 64 per head.
UNET_HEAD_RULES = {"sd1": ("heads", 8), "sdxl": ("channels", 64)}


def shipped_config(name: str) -> dict[str, Any]:
    """A config shipped in ``configs/`` ("sd1_unet", "sdxl_clip_g", "scheduler", ...), as a new dict."""
    try:
        text = resources.files("pivotal.hosts.diffusers").joinpath("configs", f"{name}.json").read_text("utf-8")
    except (OSError, ValueError) as e:  # a broken install: the package data is missing
        raise ModelLayoutError(f"the shipped config {name}.json is missing from Pivotal's package ({e}); "
                               "reinstall Pivotal") from e
    return json.loads(text)


@dataclass
class YamlHints:
    """What a same-named LDM / sgm yaml says beyond the weights (None where it says nothing)."""

    unet_heads: int | None = None
    unet_head_channels: int | None = None
    scale_factor: float | None = None
    prediction_type: str | None = None
    sample_size: int | None = None
    text_config: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def read_yaml_hints(checkpoint: str | os.PathLike) -> YamlHints:
    """The hints of ``CHECKPOINT.yaml`` next to the checkpoint, or empty hints when there is none.

    Read: the UNet's ``num_heads`` / ``num_head_channels`` (``unet_config`` in LDM yamls,
    ``network_config`` in sgm ones), ``scale_factor``, ``parameterization: v``, the latent
    ``image_size``, and the text encoder's ``config.json`` when ``cond_stage_config.params.version``
    names a local folder (as ``pivotal export-checkpoint`` writes). ConfigError for a yaml that
    cannot be read.
    """
    path = Path(checkpoint).with_suffix(".yaml")
    if not path.is_file():
        return YamlHints()
    try:
        import yaml
    except ImportError as e:
        raise ConfigError(f"{path}: reading it needs PyYAML (pip install pyyaml), or remove the file") from e
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        params = doc["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a readable LDM model config ({e}); fix or remove it") from e
    unet = (params.get("unet_config") or params.get("network_config") or {}).get("params") or {}
    hints = YamlHints(source=str(path))
    heads, head_channels = unet.get("num_heads", -1), unet.get("num_head_channels", -1)
    if isinstance(head_channels, int) and head_channels > 0:
        hints.unet_head_channels = head_channels
    elif isinstance(heads, int) and heads > 0:
        hints.unet_heads = heads
    if "scale_factor" in params:
        hints.scale_factor = float(params["scale_factor"])
    if params.get("parameterization") == "v":
        hints.prediction_type = "v_prediction"
    if isinstance(params.get("image_size"), int):
        hints.sample_size = int(params["image_size"])
    version = ((params.get("cond_stage_config") or {}).get("params") or {}).get("version")
    if isinstance(version, str) and (Path(version) / "config.json").is_file():
        try:
            hints.text_config = json.loads((Path(version) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"{version}/config.json (named by {path}): cannot read: {e}") from e
    return hints


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes for m in [rx.match(k)] if m})


def _shape(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise ModelLayoutError(f"{what}: the weight {key} is missing")
    return shapes[key]


def _depth(shapes: Shapes, block: str) -> int:
    """Transformer blocks inside the SpatialTransformer at ``block`` (e.g. ``input_blocks.4.1``)."""
    return len(_indices(shapes, re.escape(block) + r"\.transformer_blocks\.(\d+)\."))


def unet_config(shapes: Shapes, base: str, hints: YamlHints | None = None) -> dict[str, Any]:
    """The ``UNet2DConditionModel`` config of an LDM UNet state dict (keys without the prefix).

    ModelLayoutError for a structure diffusers' SD blocks cannot hold (unequal resnets per level,
    mirrored depths that differ, resampling inside resnets).
    """
    hints = hints or YamlHints()
    what = "UNet (model.diffusion_model.*)"
    cfg = shipped_config(f"{base}_unet")
    down_ids = _indices(shapes, r"input_blocks\.(\d+)\.")
    levels: list[list[int]] = [[]]
    for k in down_ids[1:]:
        if f"input_blocks.{k}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{k}.0.in_layers.0.weight" in shapes:
            levels[-1].append(k)
        else:
            raise ModelLayoutError(f"{what}: input_blocks.{k} is neither a resnet nor a downsampler")
    counts = {len(ks) for ks in levels}
    if len(counts) != 1 or 0 in counts:
        raise ModelLayoutError(f"{what}: levels have {sorted(len(ks) for ks in levels)} resnets; diffusers "
                               "needs the same number, at least one, in every level")
    n = counts.pop()
    channels = [int(_shape(shapes, f"input_blocks.{ks[0]}.0.out_layers.3.weight", what)[0]) for ks in levels]
    down_attn = [f"input_blocks.{ks[0]}.1.proj_in.weight" in shapes for ks in levels]
    down_depth = [_depth(shapes, f"input_blocks.{ks[0]}.1") for ks in levels]
    up_count = len(_indices(shapes, r"output_blocks\.(\d+)\."))
    if up_count != len(levels) * (n + 1):
        raise ModelLayoutError(f"{what}: {up_count} output_blocks; {len(levels)} levels of {n} resnets need "
                               f"{len(levels) * (n + 1)}")
    up_attn = [f"output_blocks.{i * (n + 1)}.1.proj_in.weight" in shapes for i in range(len(levels))]
    up_depth = [_depth(shapes, f"output_blocks.{i * (n + 1)}.1") for i in range(len(levels))]
    if up_attn != down_attn[::-1] or up_depth != down_depth[::-1]:
        raise ModelLayoutError(f"{what}: the up levels' transformers ({up_depth}) do not mirror the down "
                               f"levels' ({down_depth[::-1]}), which diffusers' UNet requires")
    mid_attn = "middle_block.1.proj_in.weight" in shapes
    mid_depth = _depth(shapes, "middle_block.1")
    if not mid_attn:
        raise ModelLayoutError(f"{what}: the middle block has no transformer (not an SD UNet)")
    if down_attn[-1] and mid_depth != down_depth[-1]:
        raise ModelLayoutError(f"{what}: the middle block has {mid_depth} transformer blocks, the lowest level "
                               f"{down_depth[-1]}; diffusers gives both the same")
    depth = [d if a else (mid_depth if i == len(levels) - 1 else 1)
             for i, (a, d) in enumerate(zip(down_attn, down_depth))]
    proj = _shape(shapes, "middle_block.1.proj_in.weight", what)
    context = _shape(shapes, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", what)
    conv_in = _shape(shapes, "input_blocks.0.0.weight", what)
    time_embed = _shape(shapes, "time_embed.0.weight", what)
    if time_embed != (4 * channels[0], channels[0]):
        raise ModelLayoutError(f"{what}: time_embed.0.weight is {time_embed}; SD UNets have (4C, C) with C = "
                               f"{channels[0]}")
    cfg.update(
        in_channels=int(conv_in[1]), out_channels=int(_shape(shapes, "out.2.weight", what)[0]),
        block_out_channels=channels, layers_per_block=n,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        transformer_layers_per_block=depth[0] if len(set(depth)) == 1 else depth,
        use_linear_projection=len(proj) == 2, cross_attention_dim=int(context[1]),
        attention_head_dim=_unet_heads(channels, down_attn, base, hints, what),
    )
    if hints.sample_size:
        cfg["sample_size"] = hints.sample_size
    label = shapes.get("label_emb.0.0.weight")
    if base == "sdxl" and label is None:
        raise ModelLayoutError(f"{what}: an SDXL UNet needs label_emb.0.0.weight (the size / pooled-text embedding)")
    if label is not None:
        cfg["projection_class_embeddings_input_dim"] = int(label[1])
    return cfg


def _unet_heads(channels: list[int], attention: list[bool], base: str, hints: YamlHints, what: str) -> Any:
    """diffusers' ``attention_head_dim`` (which SD configs use as the number of heads): one int for
    a fixed count, a per-level list for a fixed head width."""
    if hints.unet_heads:
        rule = ("heads", hints.unet_heads)
    elif hints.unet_head_channels:
        rule = ("channels", hints.unet_head_channels)
    else:
        rule = UNET_HEAD_RULES[base]
    kind, value = rule
    for c, a in zip(channels, attention):
        if a and c % value:
            src = hints.source or f"the {base} rule"
            raise ModelLayoutError(f"{what}: {c} channels do not split into {'heads of ' if kind == 'channels' else ''}"
                                   f"{value} {'channels' if kind == 'channels' else 'heads'} ({src}); put the "
                                   "model's LDM config next to it as a same-named .yaml")
    if kind == "heads":
        return value
    return [max(1, c // value) for c in channels]


def vae_config(shapes: Shapes, base: str, hints: YamlHints | None = None) -> dict[str, Any]:
    """The ``AutoencoderKL`` config of an LDM VAE state dict (keys without ``first_stage_model.``)."""
    hints = hints or YamlHints()
    what = "VAE (first_stage_model.*)"
    cfg = shipped_config(f"{base}_vae")
    levels = _indices(shapes, r"decoder\.up\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ModelLayoutError(f"{what}: no decoder.up.N levels")
    dec = [len(_indices(shapes, rf"decoder\.up\.{i}\.block\.(\d+)\.")) for i in levels]
    enc = [len(_indices(shapes, rf"encoder\.down\.{i}\.block\.(\d+)\.")) for i in levels]
    layers = dec[0] - 1
    if layers < 0 or set(dec) != {layers + 1} or set(enc) != {layers}:
        raise ModelLayoutError(f"{what}: decoder levels have {dec} resnets and encoder levels {enc}; SD's VAE "
                               "has n + 1 and n in every level")
    channels = [int(_shape(shapes, f"decoder.up.{i}.block.0.conv2.weight", what)[0]) for i in levels]
    post = shapes.get("post_quant_conv.weight")
    latent = int(post[1]) if post is not None else int(_shape(shapes, "decoder.conv_in.weight", what)[1])
    cfg.update(
        in_channels=int(_shape(shapes, "encoder.conv_in.weight", what)[1]),
        out_channels=int(_shape(shapes, "decoder.conv_out.weight", what)[0]),
        block_out_channels=channels, layers_per_block=layers, latent_channels=latent,
        down_block_types=["DownEncoderBlock2D"] * len(levels), up_block_types=["UpDecoderBlock2D"] * len(levels),
        mid_block_add_attention="encoder.mid.attn_1.q.weight" in shapes,
        use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv=post is not None,
    )
    if hints.scale_factor is not None:
        cfg["scaling_factor"] = hints.scale_factor
    if hints.sample_size:
        cfg["sample_size"] = hints.sample_size * 2 ** (len(levels) - 1)
    return cfg


def hf_text_config(shapes: Shapes, template: str, hints: YamlHints | None = None) -> dict[str, Any]:
    """``CLIPTextConfig`` fields of an HF CLIP text state dict (keys start ``text_model.``)."""
    what = "text encoder (HF CLIP)"
    cfg = shipped_config(template)
    vocab, width = _shape(shapes, "text_model.embeddings.token_embedding.weight", what)
    cfg.update(vocab_size=int(vocab), hidden_size=int(width),
               num_hidden_layers=len(_indices(shapes, r"text_model\.encoder\.layers\.(\d+)\.")),
               intermediate_size=int(_shape(shapes, "text_model.encoder.layers.0.mlp.fc1.weight", what)[0]),
               max_position_embeddings=int(_shape(shapes, "text_model.embeddings.position_embedding.weight",
                                                  what)[0]),
               num_attention_heads=max(1, int(width) // CLIP_HEAD_CHANNELS))
    extra = (hints.text_config if hints else {}) or {}
    for key in ("num_attention_heads", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
                "pad_token_id", "projection_dim"):
        if key in extra:
            cfg[key] = extra[key]
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise ModelLayoutError(f"{what}: width {width} does not split into {cfg['num_attention_heads']} heads")
    return cfg


def open_clip_text_config(shapes: Shapes, template: str) -> dict[str, Any]:
    """``CLIPTextConfig`` fields (with projection) of an open_clip text tower's state dict."""
    what = "text encoder (open_clip)"
    cfg = shipped_config(template)
    vocab, width = _shape(shapes, "token_embedding.weight", what)
    cfg.update(vocab_size=int(vocab), hidden_size=int(width),
               num_hidden_layers=len(_indices(shapes, r"transformer\.resblocks\.(\d+)\.")),
               intermediate_size=int(_shape(shapes, "transformer.resblocks.0.mlp.c_fc.weight", what)[0]),
               max_position_embeddings=int(_shape(shapes, "positional_embedding", what)[0]),
               projection_dim=int(_shape(shapes, "text_projection", what)[1]),
               num_attention_heads=max(1, int(width) // CLIP_HEAD_CHANNELS))
    return cfg
