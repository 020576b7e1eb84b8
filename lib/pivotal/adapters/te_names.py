"""Text-encoder layouts, kohya LoRA key names for them, and open_clip -> HF weight names.

Two text-encoder layouts occur:

* HF ``CLIPTextModel`` (SD1 in A1111 via ``FrozenCLIPEmbedder.transformer``, every encoder in
  diffusers). transformers 4.x nests the blocks under ``text_model``; transformers 5 puts
  ``embeddings``/``encoder`` on the ``CLIPTextModel`` itself. Both are found structurally.
* open_clip (SDXL's second encoder and SD2 in A1111): ``transformer.resblocks.N`` with a packed
  ``nn.MultiheadAttention`` at ``attn`` and ``mlp.c_fc``/``mlp.c_proj``.

LoRA keys always use the HF names (``lora_te2_text_model_encoder_layers_0_self_attn_q_proj``)
because that is what kohya-format files contain whichever layout produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from pivotal.adapters.lora_layers import is_linear_like
from pivotal.errors import LoraTargetError, ModelLayoutError

PARTS = ("te", "te1", "te2")
PRESETS = ("attn", "attn-mlp", "attn-mlp-conv")
# Sub-keys a LoRA on a packed nn.MultiheadAttention emits under its ``..._self_attn`` prefix.
MHA_SUBKEYS = ("q_proj", "k_proj", "v_proj", "out_proj")
# Attributes through which wrappers (A1111 hijacks, sgm embedders, CLIP models) reach the encoder.
_WRAPPER_ATTRS = ("wrapped", "transformer", "model", "text_model", "text")
_IGNORED_OPENCLIP_PREFIXES = ("visual.", "logit_scale", "logit_bias", "attn_mask")


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where the parts of a text encoder live.

    ``kind`` is "hf" or "open_clip"; ``layers`` are the transformer blocks in order;
    ``token_embedding`` is the vocabulary matrix, weight (vocab, width).
    """

    kind: str
    root: nn.Module
    layers: tuple[nn.Module, ...]
    token_embedding: nn.Embedding


def _as_hf_root(m: nn.Module) -> TextEncoderLayout | None:
    emb = getattr(getattr(m, "embeddings", None), "token_embedding", None)
    layers = getattr(getattr(m, "encoder", None), "layers", None)
    if isinstance(emb, nn.Embedding) and isinstance(layers, nn.ModuleList):
        return TextEncoderLayout("hf", m, tuple(layers), emb)
    return None


def _as_open_clip_root(m: nn.Module) -> TextEncoderLayout | None:
    emb = getattr(m, "token_embedding", None)
    blocks = getattr(getattr(m, "transformer", None), "resblocks", None)
    if isinstance(emb, nn.Embedding) and isinstance(blocks, nn.ModuleList):
        return TextEncoderLayout("open_clip", m, tuple(blocks), emb)
    return None


def text_encoder_layout(te: nn.Module) -> TextEncoderLayout:
    """Find the CLIP text transformer inside ``te`` (the model itself or a known wrapper).

    Raises ModelLayoutError when neither an HF nor an open_clip text transformer is found.
    """
    frontier: list[nn.Module] = [te]
    seen: set[int] = set()
    for _depth in range(5):
        nxt: list[nn.Module] = []
        for m in frontier:
            if id(m) in seen or not isinstance(m, nn.Module):
                continue
            seen.add(id(m))
            found = _as_hf_root(m) or _as_open_clip_root(m)
            if found is not None:
                return found
            nxt.extend(getattr(m, a) for a in _WRAPPER_ATTRS if isinstance(getattr(m, a, None), nn.Module))
        frontier = nxt
    raise ModelLayoutError(
        f"{type(te).__name__}: no CLIP text transformer found (looked for HF "
        "'embeddings.token_embedding' + 'encoder.layers' and open_clip 'token_embedding' + "
        f"'transformer.resblocks', also under {', '.join(_WRAPPER_ATTRS)})"
    )


def token_embedding_of(te: nn.Module) -> nn.Embedding:
    """The vocabulary ``nn.Embedding`` of a text encoder; weight shape (vocab, width)."""
    return text_encoder_layout(te).token_embedding


def _layer_targets(kind: str, index: int, layer: nn.Module, prefix: str, mlp: bool) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    if kind == "hf":
        attn = getattr(layer, "self_attn", None)
        names = {f"self_attn_{s}": getattr(attn, s, None) for s in MHA_SUBKEYS}
        if mlp:
            names["mlp_fc1"] = getattr(getattr(layer, "mlp", None), "fc1", None)
            names["mlp_fc2"] = getattr(getattr(layer, "mlp", None), "fc2", None)
        for suffix, mod in names.items():
            if mod is None or not is_linear_like(mod):
                raise LoraTargetError(f"{prefix}_{suffix}: text-encoder layer {index} has no nn.Linear there")
            out.append((f"{prefix}_{suffix}", mod))
        return out
    attn = getattr(layer, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention):
        raise LoraTargetError(
            f"{prefix}_self_attn: open_clip block {index} attention is {type(attn).__name__}, "
            "expected nn.MultiheadAttention (custom-attention open_clip models are not supported)"
        )
    out.append((f"{prefix}_self_attn", attn))
    if mlp:
        for suffix, attr in (("mlp_fc1", "c_fc"), ("mlp_fc2", "c_proj")):
            mod = getattr(getattr(layer, "mlp", None), attr, None)
            if mod is None or not is_linear_like(mod):
                raise LoraTargetError(f"{prefix}_{suffix}: open_clip block {index} has no mlp.{attr} nn.Linear")
            out.append((f"{prefix}_{suffix}", mod))
    return out


def text_encoder_lora_targets(te: nn.Module, part: str, preset: str,
                              layers_used: int | None = None) -> list[tuple[str, nn.Module]]:
    """kohya LoRA keys and the modules they attach to, in layer order.

    ``layers_used``: how many layers (from the first) feed what the host reads, e.g. SDXL's clip_l
    is read at its penultimate layer, and a clip skip of 2 does the same on SD1. Layers after
    those get no LoRA: it could never receive a gradient and would ship as dead zeros.

    ``part``: "te" (SD1/SD2), "te1" or "te2" (SDXL). ``preset``: "attn", "attn-mlp" or
    "attn-mlp-conv" (text encoders have no convolutions, so the last equals "attn-mlp").
    HF layers give ``nn.Linear`` targets ``..._self_attn_{q,k,v,out}_proj`` (+ ``_mlp_fc1/2``);
    open_clip layers give the ``nn.MultiheadAttention`` itself under ``..._self_attn`` (its LoRA
    emits the four sub-keys, see :func:`expand_lora_keys`) and ``c_fc``/``c_proj`` as fc1/fc2.
    """
    if part not in PARTS:
        raise LoraTargetError(f"text-encoder part {part!r} is not one of {', '.join(PARTS)}")
    if preset not in PRESETS:
        raise LoraTargetError(f"LoRA preset {preset!r} is not one of {', '.join(PRESETS)}")
    try:
        layout = text_encoder_layout(te)
    except ModelLayoutError as exc:
        raise LoraTargetError(f"lora_{part}: {exc}") from exc
    if not layout.layers:
        raise LoraTargetError(f"lora_{part}: {type(te).__name__} has no transformer layers to target")
    mlp = preset != "attn"
    count = len(layout.layers) if layers_used is None else int(layers_used)
    if not 1 <= count <= len(layout.layers):
        raise LoraTargetError(f"lora_{part}: {count} layers used of {len(layout.layers)}")
    targets: list[tuple[str, nn.Module]] = []
    for i, layer in enumerate(layout.layers[:count]):
        prefix = f"lora_{part}_text_model_encoder_layers_{i}"
        targets.extend(_layer_targets(layout.kind, i, layer, prefix, mlp))
    return targets


def expand_lora_keys(targets: list[tuple[str, nn.Module]]) -> list[str]:
    """The LoRA keys a target list produces: an nn.MultiheadAttention target expands to its
    ``_q_proj``, ``_k_proj``, ``_v_proj`` and ``_out_proj`` sub-keys, others stay as they are."""
    keys: list[str] = []
    for key, mod in targets:
        if isinstance(mod, nn.MultiheadAttention):
            keys.extend(f"{key}_{s}" for s in MHA_SUBKEYS)
        else:
            keys.append(key)
    return keys


_BLOCK_RENAMES = {
    "ln_1.": "layer_norm1.",
    "ln_2.": "layer_norm2.",
    "mlp.c_fc.": "mlp.fc1.",
    "mlp.c_proj.": "mlp.fc2.",
    "attn.out_proj.": "self_attn.out_proj.",
}


def hf_text_model_prefix(model: nn.Module) -> str:
    """State-dict prefix of the text transformer inside an HF model: "text_model." for
    transformers 4.x ``CLIPTextModel``, "" for transformers 5 (where the blocks sit on the model)."""
    layout = text_encoder_layout(model)
    if layout.kind != "hf":
        raise ModelLayoutError(f"{type(model).__name__}: not an HF CLIP text model")
    for name, mod in model.named_modules():
        if mod is layout.root:
            return f"{name}." if name else ""
    return ""


def openclip_to_hf_state_dict(
    oc_sd: Mapping[str, torch.Tensor], prefix: str = "text_model.", projection: bool = True
) -> dict[str, torch.Tensor]:
    """Rename an open_clip text tower's weights to HF ``CLIPTextModel`` names.

    ``oc_sd`` keys are relative to the tower (``token_embedding.weight``,
    ``transformer.resblocks.N...``); vision/logit keys are ignored. ``in_proj_weight`` (3*D, D)
    is split into q/k/v (D, D) each. ``prefix`` goes before every text-transformer key (see
    :func:`hf_text_model_prefix`); ``text_projection`` (D, P) becomes ``text_projection.weight``
    (P, D) for ``CLIPTextModelWithProjection`` when ``projection`` is true. Returns new tensors
    (no storage shared with ``oc_sd``). Unknown keys raise ModelLayoutError.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in oc_sd.items():
        if key.startswith(_IGNORED_OPENCLIP_PREFIXES):
            continue
        if key == "token_embedding.weight":
            out[f"{prefix}embeddings.token_embedding.weight"] = value.clone()
        elif key == "positional_embedding":
            out[f"{prefix}embeddings.position_embedding.weight"] = value.clone()
        elif key.startswith("ln_final."):
            out[f"{prefix}final_layer_norm.{key[len('ln_final.'):]}"] = value.clone()
        elif key == "text_projection":
            if projection:
                out["text_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            index, _, rest = key[len("transformer.resblocks.") :].partition(".")
            base = f"{prefix}encoder.layers.{index}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{base}self_attn.{name}.{kind}"] = chunk.clone()
                continue
            for old, new in _BLOCK_RENAMES.items():
                if rest.startswith(old):
                    out[base + new + rest[len(old) :]] = value.clone()
                    break
            else:
                raise ModelLayoutError(f"{key}: open_clip text weight has no HF CLIPTextModel equivalent")
        else:
            raise ModelLayoutError(f"{key}: open_clip text weight has no HF CLIPTextModel equivalent")
    return out
