"""SDXL on the A1111 host: the two hijacked text encoders, the pooled + size vector, VAE latents.

The webui's ``GeneralConditioner`` runs every embedder under ``torch.no_grad`` unless it is
trainable, so the conditioner is never called while training: its embedders are called directly,
in its order, and their outputs assembled as it would (3-D outputs concatenated on the channel
axis as ``crossattn``, 2-D ones on axis 1 as ``vector``/``y``). The hijacked encoders still do
the webui's tokenization, chunking, emphasis and embedding splicing (``clip_l`` / ``clip_g`` halves
of each live embedding).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Sequence

import torch
from torch import nn

from pivotal.errors import ModelLayoutError
from pivotal.host_api import SizeInfo

#: the conditioner's input keys of the size embedders, and what SizeInfo field feeds each
SIZE_KEYS = {"original_size_as_tuple": "original", "crop_coords_top_left": "crop_top_left",
             "target_size_as_tuple": "target"}
#: webui default when no sizes are given (its own get_learned_conditioning falls back to 1024)
DEFAULT_SIZE = (1024, 1024)


def text_embedders(sd_model: Any) -> dict[str, nn.Module]:
    """{"clip_l": HF-CLIP embedder, "clip_g": open_clip embedder} among the conditioner's embedders
    (the webui's hijacked wrappers). ModelLayoutError when one is missing (e.g. the refiner)."""
    found: dict[str, nn.Module] = {}
    for emb in sd_model.conditioner.embedders:
        wrapped = getattr(emb, "wrapped", None)
        if _is_open_clip_embedder(wrapped):
            found.setdefault("clip_g", emb)
        elif isinstance(getattr(wrapped, "transformer", None), nn.Module):
            found.setdefault("clip_l", emb)
    missing = [k for k in ("clip_l", "clip_g") if k not in found]
    if missing:
        raise ModelLayoutError(f"this SDXL-family checkpoint has no {' or '.join(missing)} text encoder "
                               "(refiner-style models are not supported)")
    return found


def _is_open_clip_embedder(wrapped: Any) -> bool:
    """sgm's ``FrozenOpenCLIPEmbedder2`` (clip_g): an open_clip model at ``.model`` (A1111), or
    reForge's, whose ``.model`` is a placeholder and whose HF CLIP text model sits at ``.transformer``."""
    if isinstance(getattr(getattr(wrapped, "model", None), "token_embedding", None), nn.Module):
        return True
    return "OpenCLIP" in type(wrapped).__name__ and isinstance(getattr(wrapped, "transformer", None), nn.Module)


def clip_g_text_model(embedder: nn.Module) -> nn.Module:
    """The clip_g text model behind the webui's wrapper: A1111's open_clip model
    (``wrapped.model``), else reForge's HF CLIP text model (``wrapped.transformer``)."""
    wrapped = getattr(embedder, "wrapped", None)
    model = getattr(wrapped, "model", None)
    if isinstance(getattr(model, "token_embedding", None), nn.Module):
        return model
    transformer = getattr(wrapped, "transformer", None)
    if isinstance(transformer, nn.Module):
        return transformer
    raise ModelLayoutError(f"{type(wrapped).__name__}: no clip_g text model (open_clip .model or HF .transformer)")


def openclip_tokenizer() -> Any:
    """The open_clip BPE tokenizer the webui's clip_g wrapper uses."""
    try:
        return importlib.import_module("modules.sd_hijack_open_clip").tokenizer
    except (ImportError, AttributeError):
        return importlib.import_module("open_clip.tokenizer")._tokenizer


def _size_rows(sizes: Optional[Sequence[SizeInfo]], count: int) -> list[SizeInfo]:
    if sizes is None:
        return [SizeInfo(DEFAULT_SIZE, (0, 0), DEFAULT_SIZE)] * count
    return list(sizes)


def encode_sdxl(sd_model: Any, prompts: list[str], sizes: Optional[Sequence[SizeInfo]], device: torch.device,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(context (B, 77·k, D_l + D_g), y (B, adm)) as the conditioner would make them, with grad."""
    rows = _size_rows(sizes, len(prompts))
    crossattn: list[torch.Tensor] = []
    vector: list[torch.Tensor] = []
    for emb in sd_model.conditioner.embedders:
        key = getattr(emb, "input_key", "")
        if key == "txt":
            out = emb(prompts)
            if isinstance(out, (tuple, list)):
                crossattn.append(out[0])
                vector.append(out[1])
            else:
                crossattn.append(out)
        elif key in SIZE_KEYS:
            values = torch.tensor([list(getattr(r, SIZE_KEYS[key])) for r in rows], device=device, dtype=dtype)
            vector.append(emb(values))
        else:
            raise ModelLayoutError(f"SDXL conditioner input {key!r} is not supported (refiner-style models)")
    if len(crossattn) != 2 or not vector:
        raise ModelLayoutError(f"expected two text encoders and a pooled vector, got {len(crossattn)} encoder outputs")
    length = max(c.shape[1] for c in crossattn)
    if any(c.shape[1] != length for c in crossattn):
        raise ModelLayoutError("the two text encoders returned different token counts for the same prompts")
    return torch.cat(crossattn, dim=2), torch.cat([v.to(crossattn[0].dtype) for v in vector], dim=1)


@torch.no_grad()
def sdxl_latents(sd_model: Any, images: torch.Tensor) -> torch.Tensor:
    """Scaled latents from the VAE posterior's mean: the webui's sgm ``encode_first_stage`` samples,
    and cached latents must be deterministic for an exact resume."""
    fsm = sd_model.first_stage_model
    moments = fsm.quant_conv(fsm.encoder(images))
    mean, _logvar = torch.chunk(moments, 2, dim=1)
    return float(sd_model.scale_factor) * mean
