"""Tiny single-file SD 1.x / SDXL checkpoints built from the *original* model code, for tests.

Each part is a real module of the tool whose layout the file has, so its ``state_dict()`` is in
that layout by construction and its forward pass is the oracle:

* UNet: the LDM ``UNetModel`` (``ldm`` package, stable-diffusion-sdkit), as in tests/tiny_unets.py,
  with the head counts of the family (SD1: 8 heads; SDXL: 64 channels per head) so a loader that
  knows only the family can rebuild it;
* VAE: ``LdmAutoencoder``, the parameter-holding part of LDM's ``AutoencoderKL``, from the real
  ``Encoder`` / ``Decoder``;
* text: HF ``CLIPTextModel`` (clip_l; 64 wide: one 64-channel head), and for SDXL open_clip's
  ``TextTransformer`` (clip_g).

The file is written by the documented key rules of SD checkpoints (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.transformer.text_model.`` for SD1;
``conditioner.embedders.0.transformer.text_model.`` and ``conditioner.embedders.1.model.`` for
SDXL), with safetensors' own ``save_file``, never Pivotal's writer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from tiny_unets import SDXL_TIME_DIM, randomize

LATENT = 8
SCALE = {"sd1": 0.18215, "sdxl": 0.13025}
TEXT_WIDTH = 64
CLIP_G_PROJECTION = 32
SDXL_DEPTH = 2
VAE_DDCONFIG: dict[str, Any] = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


class LdmAutoencoder(nn.Module):
    """The parameter-holding part of ``ldm.models.autoencoder.AutoencoderKL`` (whose module
    imports pytorch_lightning, which the test environments lack): the same attribute names,
    built from the real ``Encoder`` / ``Decoder``."""

    def __init__(self, ddconfig: Any, embed_dim: int) -> None:
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode_mean(self, x: torch.Tensor) -> torch.Tensor:
        moments = self.quant_conv(self.encoder(x))
        return moments.chunk(2, dim=1)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def _ldm_unet(base: str) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    if base == "sd1":
        return UNetModel(image_size=LATENT, in_channels=4, out_channels=4, num_res_blocks=2, model_channels=32,
                         channel_mult=(1, 2, 2), attention_resolutions=(1, 2), num_heads=8, context_dim=TEXT_WIDTH,
                         use_spatial_transformer=True, legacy=False)
    context = TEXT_WIDTH * 2
    unet = UNetModel(image_size=LATENT, in_channels=4, out_channels=4, num_res_blocks=2, model_channels=32,
                     channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_head_channels=64,
                     transformer_depth=SDXL_DEPTH, context_dim=[context] * SDXL_DEPTH,
                     use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False)
    # sgm's "text_time" embedding, with sgm's names (see tests/tiny_unets.py).
    unet.label_emb = nn.Sequential(nn.Sequential(nn.Linear(CLIP_G_PROJECTION + 6 * SDXL_TIME_DIM, 128), nn.SiLU(),
                                                 nn.Linear(128, 128)))
    unet.num_classes = "sequential"
    return unet


def _clip_l() -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                                        num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=TEXT_WIDTH))


def _clip_g() -> nn.Module:
    from tiny_text import open_clip_transformer_module

    return open_clip_transformer_module().TextTransformer(
        context_length=77, vocab_size=49408, width=TEXT_WIDTH, heads=1, layers=2, output_dim=CLIP_G_PROJECTION,
        act_layer=nn.GELU, output_tokens=True)


def ldm_parts(base: str, seed: int = 0) -> dict[str, nn.Module]:
    """{"unet", "vae", "clip_l"[, "clip_g"]}: seeded, every weight re-drawn (see ``randomize``), eval."""
    torch.manual_seed(seed)
    parts = {"unet": _ldm_unet(base), "vae": LdmAutoencoder(VAE_DDCONFIG, 4), "clip_l": _clip_l()}
    if base == "sdxl":
        parts["clip_g"] = _clip_g()
    for i, (name, m) in enumerate(parts.items()):
        randomize(m, seed * 10 + i)
        if name.startswith("clip"):
            # CLIP's token embedding is ~N(0, 0.02); randomize's 1/sqrt(64) would swamp the rest
            emb = m.token_embedding if name == "clip_g" else m.get_input_embeddings()
            with torch.no_grad():
                emb.weight.mul_(0.2)
    return {k: m.eval() for k, m in parts.items()}


def _hf_text_state(te: nn.Module) -> dict[str, torch.Tensor]:
    """HF CLIP text weights under transformers 4.x names (``text_model.*``), as checkpoints hold them."""
    state = te.state_dict()
    if not any(k.startswith("text_model.") for k in state):  # transformers 5 drops the level
        state = {"text_model." + k: v for k, v in state.items()}
    return state


def checkpoint_state(base: str, parts: dict[str, nn.Module], dtype: torch.dtype = torch.float32,
                     vae: bool = True) -> dict[str, torch.Tensor]:
    """The single-file state dict of ``parts`` by the SD / SDXL key rules; ``vae=False`` leaves
    ``first_stage_model.*`` out. Also the extras real files carry (schedule buffers, position ids)."""
    out = {"model.diffusion_model." + k: v for k, v in parts["unet"].state_dict().items()}
    if vae:
        out.update({"first_stage_model." + k: v for k, v in parts["vae"].state_dict().items()})
    if base == "sd1":
        out.update({"cond_stage_model.transformer." + k: v for k, v in _hf_text_state(parts["clip_l"]).items()})
        out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    else:
        out.update({"conditioner.embedders.0.transformer." + k: v
                    for k, v in _hf_text_state(parts["clip_l"]).items()})
        out.update({"conditioner.embedders.1.model." + k: v for k, v in parts["clip_g"].state_dict().items()})
        out["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6)
    out["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
            for k, v in out.items() if not k.endswith("attn_mask")}


def write_checkpoint(path: Path, base: str, parts: dict[str, nn.Module], dtype: torch.dtype = torch.float32,
                     vae: bool = True) -> Path:
    """Write :func:`checkpoint_state` with safetensors' ``save_file``; returns ``path``."""
    from safetensors.torch import save_file

    save_file(checkpoint_state(base, parts, dtype, vae), str(path), metadata={"format": "pt"})
    return path
