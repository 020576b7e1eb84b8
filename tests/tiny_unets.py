"""Tiny, real UNets for tests: diffusers ``UNet2DConditionModel`` and LDM ``UNetModel``.

Built from configs with seeded random weights, never from the hub. The diffusers and LDM builders
for one base have the same architecture, so a diffusers state dict renamed to LDM loads into the
LDM model and gives the same outputs.

* ``sd1``: 3 levels (32, 64, 64 channels), transformers at the two high-resolution levels and in
  the middle, 1x1-conv proj_in/proj_out, 2 heads, context dim 32.
* ``sdxl``: 3 levels (32, 64, 96), no transformer at level 0, Linear proj_in/proj_out, 2
  transformer blocks per transformer, 32-channel heads, context dim 64, and the "text_time"
  embedding (diffusers ``add_embedding``, sgm ``label_emb``) on 32 pooled dims + 6 time ids.

Every parameter is re-drawn at random (norm weights near 1), so that no zero-initialised layer
(LDM zeroes proj_out and the resnets' last conv) can hide a wrong name mapping.

The LDM class comes from the ``ldm`` package (stable-diffusion-sdkit), which both test
environments have; diffusers is imported only by :func:`diffusers_unet`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

BASES = ("sd1", "sdxl")

BATCH = 2
LATENT = 8  # latent side; 3 levels take it to 2x2 at the bottom
SDXL_POOLED_DIM = 32
SDXL_TIME_DIM = 8  # per time id; 6 ids
SDXL_DEPTH = 2

_COMMON = dict(sample_size=LATENT, in_channels=4, out_channels=4, layers_per_block=2)
_DIFFUSERS = {
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,  # SD1 configs: this is the number of heads
        use_linear_projection=False,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(1, 2, 3),  # heads per level: 32 channels each, as num_head_channels=32
        transformer_layers_per_block=SDXL_DEPTH,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_DIM,
    ),
}
_LDM = {
    "sd1": dict(
        model_channels=32, channel_mult=(1, 2, 2), attention_resolutions=(1, 2),
        num_heads=2, context_dim=32, use_linear_in_transformer=False,
    ),
    "sdxl": dict(
        model_channels=32, channel_mult=(1, 2, 3), attention_resolutions=(2, 4),
        num_head_channels=32, transformer_depth=SDXL_DEPTH,
        # sdkit's SpatialTransformer indexes context_dim (and the context) per transformer block;
        # a list is how it accepts depth > 1.
        context_dim=[64] * SDXL_DEPTH, use_linear_in_transformer=True,
    ),
}


def _check(base: str) -> None:
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Re-draw every parameter: weights ~ N(0, 1/fan_in), biases small, norm weights ~ 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):  # GroupNorm / LayerNorm scale
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def diffusers_unet(base: str, seed: int = 0) -> nn.Module:
    """A tiny diffusers ``UNet2DConditionModel`` for ``base`` ("sd1" or "sdxl"), in eval mode."""
    _check(base)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**_COMMON, **_DIFFUSERS[base])
    return randomize(unet, seed).eval()


def ldm_unet(base: str, seed: int = 0) -> nn.Module:
    """A tiny LDM ``UNetModel`` with the architecture of :func:`diffusers_unet` (same base)."""
    _check(base)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    cfg: dict[str, Any] = dict(_LDM[base])
    unet = UNetModel(
        image_size=LATENT, in_channels=4, out_channels=4, num_res_blocks=2,
        use_spatial_transformer=True, legacy=False, **cfg,
    )
    if base == "sdxl":
        # sdkit's ldm has no num_classes="sequential"; build sgm's ADM embedding by hand, with
        # sgm's module names (label_emb.0.0 / label_emb.0.2). forward() adds label_emb(y) to the
        # time embedding whenever num_classes is not None.
        emb_dim = 4 * cfg["model_channels"]
        unet.label_emb = nn.Sequential(nn.Sequential(
            nn.Linear(SDXL_POOLED_DIM + 6 * SDXL_TIME_DIM, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim),
        ))
        unet.num_classes = "sequential"
    return randomize(unet, seed).eval()


def sample_inputs(base: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """Latents ``x``, timesteps ``t``, ``context``; for sdxl also ``text_embeds`` and ``time_ids``."""
    _check(base)
    gen = torch.Generator().manual_seed(seed)
    ctx_dim = _DIFFUSERS[base]["cross_attention_dim"]
    out = {
        "x": torch.randn(BATCH, 4, LATENT, LATENT, generator=gen),
        "t": torch.tensor([10.0, 700.0]),
        "context": torch.randn(BATCH, 5, ctx_dim, generator=gen),
    }
    if base == "sdxl":
        out["text_embeds"] = torch.randn(BATCH, SDXL_POOLED_DIM, generator=gen)
        out["time_ids"] = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0],
                                        [768.0, 1344.0, 16.0, 32.0, 768.0, 1344.0]])
    return out


def sdxl_y(text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """sgm's vector conditioning: pooled text embedding, then a sinusoidal embedding per time id.

    Computed with ldm's own ``timestep_embedding`` (cos half first, as sgm), so the LDM side of
    the comparison does not borrow diffusers' code.
    """
    from ldm.modules.diffusionmodules.util import timestep_embedding

    b = time_ids.shape[0]
    emb = timestep_embedding(time_ids.flatten(), SDXL_TIME_DIM).reshape(b, -1)
    return torch.cat([text_embeds, emb.to(text_embeds.dtype)], dim=-1)


def run_diffusers(unet: nn.Module, base: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward a diffusers UNet on :func:`sample_inputs`."""
    kwargs: dict[str, Any] = {}
    if base == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
    return unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], **kwargs).sample


def run_ldm(unet: nn.Module, base: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward an LDM UNet on :func:`sample_inputs`."""
    if base == "sdxl":
        context: Any = [inputs["context"]] * SDXL_DEPTH  # one per transformer block, see _LDM
        y = sdxl_y(inputs["text_embeds"], inputs["time_ids"])
        return unet(inputs["x"], inputs["t"], context=context, y=y)
    return unet(inputs["x"], inputs["t"], context=inputs["context"])
