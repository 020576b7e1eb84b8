"""Full-size Stable Diffusion architectures with random weights, for the benchmarks: SD1.5 (CPU
and GPU) and SDXL (GPU). Nothing is downloaded; configs are the published ones."""

from __future__ import annotations

import torch
from torch import nn

from pivotal.demo.basics import SCHEDULER_CONFIG, demo_tokenizer
from pivotal.demo.model import vae_config
from pivotal.hosts.diffusers.parts import PipelineParts

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), sample_size=512, scaling_factor=0.18215)


def _randomize(model: nn.Module, gen: torch.Generator) -> nn.Module:
    """Weights N(0, 1/fan_in), biases 0.1·N(0,1), norm scales 1 + 0.1·N(0,1) (as the demo model),
    drawn on ``gen``'s device (the model's)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=gen.device)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(noise.mul_(0.1).add_(1.0))
            elif p.dim() == 1:
                p.copy_(noise.mul_(0.1))
            else:
                p.copy_(noise.div_(p[0].numel() ** 0.5))
    return model


def sd15_parts(seed: int = 0, full_vae: bool = False, device: str = "cpu") -> PipelineParts:
    """The SD1.5 architecture with random weights: diffusers' SD1.5 UNet config, CLIP ViT-L/14's text
    config, the real CLIP tokenizer. ``full_vae``: SD's VAE architecture; else the demo's tiny VAE
    (it only fills the latent cache once and is not part of a training step). ``device``: where the
    UNet is built and drawn (the text encoder and VAE are drawn on the CPU, small)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    gen = torch.Generator().manual_seed(seed)
    unet_gen = gen if device == "cpu" else torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("meta"):  # no default init: every weight is drawn once, below
            unet = UNet2DConditionModel(**SD15_UNET)
        unet = unet.to_empty(device=device)
        assert not list(unet.buffers()), "the UNet has buffers; to_empty would leave them unset"
        _randomize(unet, unet_gen)
        te = _randomize(CLIPTextModel(CLIPTextConfig(**SD15_TEXT)), gen)
        vae = _randomize(AutoencoderKL(**(SD15_VAE if full_vae else vae_config("sd1"))), gen)
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    return PipelineParts(base_model="sd1", unet=unet, vae=vae, text_encoders={"clip_l": te},
                         tokenizers={"clip_l": demo_tokenizer("clip_l")}, scheduler_config=dict(SCHEDULER_CONFIG),
                         source="SD1.5 architecture, random weights")




SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
SDXL_TEXT_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                   num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=0)


def sdxl_parts(seed: int = 0, device: str = "cuda") -> PipelineParts:
    """The SDXL architecture with random weights, built directly on ``device`` (fp32: about 10 GB
    for the UNet): diffusers' SDXL UNet config, CLIP ViT-L and OpenCLIP ViT-bigG text configs,
    the demo's tiny VAE (it only fills the latent cache)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
        clip_l = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        clip_g = CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_G))
    modules = []
    for m in (unet, clip_l, clip_g):
        m = m.to_empty(device=device)
        for name, buf in m.named_buffers():  # position ids: the only buffers these models have
            if name.endswith("position_ids"):
                buf.copy_(torch.arange(buf.shape[-1], device=device).expand_as(buf))
        modules.append(_randomize(m, gen))
    unet, clip_l, clip_g = modules
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**vae_config("sdxl")).to(device)
    for m in (unet, vae, clip_l, clip_g):
        m.eval().requires_grad_(False)
    return PipelineParts(base_model="sdxl", unet=unet, vae=vae, text_encoders={"clip_l": clip_l, "clip_g": clip_g},
                         tokenizers={"clip_l": demo_tokenizer("clip_l"), "clip_g": demo_tokenizer("clip_g")},
                         scheduler_config=dict(SCHEDULER_CONFIG), force_zeros_for_empty_prompt=True,
                         source="SDXL architecture, random weights")
