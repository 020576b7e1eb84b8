"""Write a full-size SDXL-architecture checkpoint with RANDOM weights, for webui tests (Forge).

Forge recognises SDXL only by its real shapes (model_channels 320, transformer depths 0,0,2,2,10,10,
context 2048, adm 2816), so a tiny model is refused. This writes one without downloading anything
and without ever holding a model in memory: the tensor names and shapes come from the published
configs (diffusers UNet and VAE, HF CLIP-L and bigG text models built on the meta device), each
tensor is drawn on its own (seeded) and converted to the single-file LDM/sgm layout
(``model.diffusion_model.*`` via Pivotal's own name map, ``conditioner.embedders.0.transformer.*``
HF CLIP-L, ``conditioner.embedders.1.model.*`` open_clip bigG, ``first_stage_model.*``).

``--unet-dtype float8`` (default) stores the UNet in float8_e4m3fn: Forge then keeps it in float8 and
casts each layer per call, so the process fits in ~6 GB on a CPU instead of ~14 GB (and the test
covers training over float8 storage). Text encoders fp16, VAE fp32.

    .venv/bin/python tools/make_random_sdxl.py OUT.safetensors [--seed 0] [--unet-dtype float8|fp16]

Weights: Linear/Conv U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's default), biases the same bound,
norm weights 1 and biases 0, embeddings N(0, 0.02): random images, but finite and deterministic.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

UNET = dict(sample_size=128, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
            freq_shift=0, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            block_out_channels=[320, 640, 1280], layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1,
            act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=2048,
            transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
           up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu")


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter and persistent-buffer shapes of a model built on the meta device."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if "position_ids" in name:
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).clone()
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(s in name for s in ("norm", "ln_", "layer_norm"))
    if len(shape) == 1 and is_norm:
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    if "embedding" in name and len(shape) == 2:
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    bound = 1.0 / math.sqrt(max(1, fan_in))
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def _hf_to_open_clip(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """HF CLIPTextModelWithProjection tensors in open_clip's layout (the inverse of the webuis' conversion)."""
    out = {"token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": hf["text_model.final_layer_norm.weight"],
           "ln_final.bias": hf["text_model.final_layer_norm.bias"],
           "text_projection": hf["text_projection.weight"].t().contiguous()}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in names.items():
            for leaf in ("weight", "bias"):
                out[f"{dst}{b}.{leaf}"] = hf[f"{src}{a}.{leaf}"]
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([hf[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unet-dtype", choices=("float8", "fp16"), default="float8")
    a = ap.parse_args()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pivotal.adapters.unet_names import UNetLayout
    from pivotal.formats.vae_names import vae_state_to_ldm

    gen = torch.Generator().manual_seed(a.seed)
    unet_dtype = torch.float8_e4m3fn if a.unet_dtype == "float8" else torch.float16
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(**VAE)
        clip_l = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    sd: dict[str, torch.Tensor] = {}
    layout = UNetLayout.from_diffusers(dict(unet.config))
    for name, shape in _shapes(unet).items():
        sd["model.diffusion_model." + layout.to_ldm(name)] = _draw(name, shape, gen).to(unet_dtype)
    vae_sd = {k: _draw(k, s, gen) for k, s in _shapes(vae).items()}
    vae_ldm = vae_state_to_ldm(vae_sd, len(VAE["block_out_channels"]))
    sd.update({"first_stage_model." + k: v for k, v in vae_ldm.items()})
    for name, shape in _shapes(clip_l).items():
        key = name if name.startswith("text_model.") else "text_model." + name
        value = _draw(name, shape, gen)
        sd["conditioner.embedders.0.transformer." + key] = value if "position_ids" in name else value.half()
    g = {k: _draw(k, s, gen) for k, s in _shapes(clip_g).items() if "position_ids" not in k}
    for k, v in _hf_to_open_clip(g, CLIP_G["num_hidden_layers"]).items():
        sd["conditioner.embedders.1.model." + k] = v.half()
    del unet, vae, clip_l, clip_g, g
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out)
    print("keys:", len(sd), "params:", sum(v.numel() for v in sd.values()), "->", out)


if __name__ == "__main__":
    main()
