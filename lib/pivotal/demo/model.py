"""The tiny demo models, for trying the whole pipeline on a laptop CPU. Nothing is downloaded.

* ``sd1`` is the *pre-trained* tiny-world model (:mod:`pivotal.demo.tiny_world`): its weights
  ship with Pivotal, and it draws the procedural world of :mod:`pivotal.demo.world` as its
  prompts ask ("a red circle on a blue background, top left").
* ``sdxl`` (and ``sd1`` with ``pretrained=False``) has *random* weights: the UNet, VAE and text
  encoders are built from the configs below and their weights drawn from one seeded generator, so
  ``build_demo_parts("sdxl", 0)`` gives the same model every time (for the same
  diffusers/transformers versions), and a bundle trained on it applies to a later build. Its
  images come out as noise; the point is exercising training, saving and loading.

Sizes of the random models (SD's structure, scaled down):

* text encoders: real CLIP tokenizer (open_clip's BPE file), vocab 49408, 77 positions, 2 layers;
  clip_l 32 wide, SDXL's clip_g 64 wide with a 64-dim projection;
* UNet: 3 levels (32, 64, 64|96 channels), latent 8x8 by default (64 px); SDXL has the
  "text_time" embedding on the 64 pooled dims + 6 size ids;
* VAE: 4 levels (8, 16, 32, 32 channels), so the latent is 1/8 of the image as in SD, with 4
  latent channels; encoding a 128 px image costs a few milliseconds.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from pivotal.demo.basics import SCHEDULER_CONFIG, demo_tokenizer
from pivotal.errors import ConfigError
from pivotal.hosts.diffusers.parts import ENCODER_KEYS, PipelineParts

BASES = ("sd1", "sdxl")
LATENT_SIZE = 8
TIME_ID_DIM = 8  # sinusoidal width per SDXL size id; 6 ids
# (hidden, heads, activation) per encoder key: SD1's clip_l uses quick_gelu, SDXL's clip_g gelu.
TEXT_DIMS: dict[str, tuple[int, int, str]] = {"clip_l": (32, 4, "quick_gelu"), "clip_g": (64, 4, "gelu")}
TEXT_LAYERS = 2

# SD1 and SDXL VAEs' latent scale factors.
VAE_SCALING = {"sd1": 0.18215, "sdxl": 0.13025}


def text_config(key: str) -> Any:
    """``CLIPTextConfig`` of the demo encoder ``key``."""
    from transformers import CLIPTextConfig

    hidden, heads, act = TEXT_DIMS[key]
    return CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=4 * hidden,
                          projection_dim=hidden, num_hidden_layers=TEXT_LAYERS, num_attention_heads=heads,
                          max_position_embeddings=77, hidden_act=act,
                          bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def unet_config(base: str) -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments for ``base``."""
    common: dict[str, Any] = dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2)
    if base == "sd1":
        return dict(common, block_out_channels=(32, 64, 64),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    cross_attention_dim=TEXT_DIMS["clip_l"][0], attention_head_dim=2,
                    use_linear_projection=False)
    context = TEXT_DIMS["clip_l"][0] + TEXT_DIMS["clip_g"][0]
    pooled = TEXT_DIMS["clip_g"][0]
    return dict(common, block_out_channels=(32, 64, 96),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=context, attention_head_dim=(1, 2, 3), transformer_layers_per_block=2,
                use_linear_projection=True, addition_embed_type="text_time",
                addition_time_embed_dim=TIME_ID_DIM, projection_class_embeddings_input_dim=pooled + 6 * TIME_ID_DIM)


def vae_config(base: str) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments: 4 levels, so images are 8x the latent size."""
    return dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                sample_size=LATENT_SIZE * 8, scaling_factor=VAE_SCALING[base], force_upcast=False)


def randomize_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every parameter in place from ``generator``: weights ``N(0, 1/fan_in)``, biases
    ``0.1·N(0, 1)``, norm scales ``1 + 0.1·N(0, 1)``. The fan-in scaling keeps activations near
    unit size through the random network, so sampling stays finite."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(noise / p[0].numel() ** 0.5)
    return model


def is_pretrained(base: str, pretrained: bool | None = None) -> bool:
    """Whether the demo model for ``base`` is the pre-trained one: by default sd1 is, sdxl is not."""
    return base == "sd1" if pretrained is None else bool(pretrained)


def build_demo_parts(base: str, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                     pretrained: bool | None = None) -> PipelineParts:
    """The demo pipeline for ``base`` ("sd1" or "sdxl"), on CPU in fp32, in eval mode, frozen.

    ``pretrained`` (default: True for sd1, False for sdxl): the shipped tiny-world weights, where
    ``seed`` plays no part; else random weights drawn from ``seed``. Only sd1 has pre-trained
    weights (ConfigError for sdxl).
    """
    if base not in BASES:
        raise ConfigError(f"demo model {base!r} is not one of {', '.join(BASES)} (setting: --demo)")
    if is_pretrained(base, pretrained):
        if base != "sd1":
            raise ConfigError(f"only the sd1 demo model has pre-trained weights, not {base!r} (setting: --demo)")
        from pivotal.demo.tiny_world import load_parts

        return load_parts(cache_dir=cache_dir)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizers = {key: demo_tokenizer(key, cache_dir) for key in ENCODER_KEYS[base]}
    gen = torch.Generator().manual_seed(int(seed))
    # The constructors draw their initial weights from torch's global generator; fork it so
    # building a demo model leaves the caller's random state untouched. Every weight is then
    # re-drawn from our own generator, in a fixed order, which is what makes the build repeatable.
    with torch.random.fork_rng(devices=[]):
        unet = randomize_(UNet2DConditionModel(**unet_config(base)), gen)
        vae = randomize_(AutoencoderKL(**vae_config(base)), gen)
        encoders: dict[str, nn.Module] = {"clip_l": randomize_(CLIPTextModel(text_config("clip_l")), gen)}
        if base == "sdxl":
            encoders["clip_g"] = randomize_(CLIPTextModelWithProjection(text_config("clip_g")), gen)
    for m in (unet, vae, *encoders.values()):
        m.eval().requires_grad_(False)
    return PipelineParts(base_model=base, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                         scheduler_config=dict(SCHEDULER_CONFIG), force_zeros_for_empty_prompt=base == "sdxl",
                         source=f"demo {base} seed {seed}")
