"""What a single-file Stable Diffusion checkpoint is, from its key names and shapes alone.

A single-file checkpoint (what A1111, Forge, ComfyUI and civitai call a "model") holds every part
under the original LDM / sgm prefixes:

* UNet (LDM ``UNetModel``): ``model.diffusion_model.*`` (both);
* VAE (LDM ``AutoencoderKL``): ``first_stage_model.*`` (both);
* CLIP ViT-L text encoder, HF names: ``cond_stage_model.transformer.text_model.*`` (SD 1.x),
  ``conditioner.embedders.0.transformer.text_model.*`` (SDXL);
* OpenCLIP ViT-bigG text tower, open_clip names: ``conditioner.embedders.1.model.*`` (SDXL).

Other families are told apart by keys only they have (SD 2.x keeps an open_clip encoder at
``cond_stage_model.model``; the SDXL refiner keeps its only encoder, open_clip, at
``conditioner.embedders.0.model``; SD3 has ``joint_blocks``, Flux ``double_blocks`` ...) and are
refused by name. Nothing here reads a tensor or imports diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from pivotal.errors import ModelLayoutError

UNET_KEY = "model.diffusion_model."
VAE_KEY = "first_stage_model."
SD1_TEXT_KEY = "cond_stage_model.transformer."
SDXL_CLIP_L_KEY = "conditioner.embedders.0.transformer."
SDXL_CLIP_G_KEY = "conditioner.embedders.1.model."
SD2_TEXT_KEY = "cond_stage_model.model."
REFINER_TEXT_KEY = "conditioner.embedders.0.model."

#: Keys a checkpoint may carry that are not part of the model a host runs: the training-time
#: noise schedule buffers, EMA copies, sgm's denoiser sigmas, CLIP's logit scale.
IGNORED_PREFIXES = ("model_ema.", "denoiser.", "betas", "alphas_cumprod", "alphas_cumprod_prev",
                    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
                    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                    "logvar", "lvlb_weights", "model.logvar")

#: (family, substring any of whose keys contains) for model families that are not SD 1.x / SDXL.
#: Checked before anything else, so that e.g. a Flux file that also holds a VAE is named as Flux.
OTHER_FAMILIES: tuple[tuple[str, str], ...] = (
    ("Stable Diffusion 3 / 3.5", "joint_blocks."),
    ("Flux", "double_blocks."),
    ("AuraFlow", "double_layers."),
    ("Stable Cascade", "clip_txt_mapper."),
    ("Stable Cascade", ".channelwise."),
    ("HunyuanVideo / Hunyuan", "individual_token_refiner."),
    ("PixArt / Sana", "cross_attn.q_linear."),
    ("HiDream", "double_stream_blocks."),
    ("Lumina", "cap_embedder."),
    ("LTX-Video", "patchify_proj."),
    ("ControlNet", "control_model."),
    ("ControlNet", "controlnet_cond_embedding."),
    ("Playground v2.5 (EDM schedule)", "edm_mean"),
    ("AnimateDiff motion module", "motion_modules."),
)


@dataclass(frozen=True)
class CheckpointKind:
    """An SD 1.x or SDXL single-file checkpoint, as far as its keys tell.

    ``text_prefixes``: encoder key ("clip_l", "clip_g") -> the prefix its weights sit under;
    ``has_vae``: whether ``first_stage_model.*`` is there (a "no baked VAE" file lacks it);
    ``dtype``: the safetensors dtype most of the UNet's weights have ("F16", "F32", "BF16").
    """

    base: str
    text_prefixes: dict[str, str]
    has_vae: bool
    dtype: str


def _refuse(path: str, what: str, why: str) -> ModelLayoutError:
    return ModelLayoutError(f"{path}: this is {what} ({why}); Pivotal trains on Stable Diffusion 1.x and SDXL "
                            "(base) checkpoints only")


def _has(keys: Sequence[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_checkpoint(path: str, shapes: Mapping[str, tuple[int, ...]],
                      dtypes: Mapping[str, str] | None = None) -> CheckpointKind:
    """The kind of checkpoint whose tensors have ``shapes`` (key -> shape) and ``dtypes``.

    ModelLayoutError naming the family for anything but an SD 1.x / SDXL base text-to-image
    checkpoint: SD 2.x, the SDXL refiner, SD3, Flux, inpainting UNets, LoRA / bundle files, a
    lone diffusers UNet file, or keys nobody recognises.
    """
    keys = list(shapes)
    if not keys:
        raise ModelLayoutError(f"{path}: the file holds no tensors")
    if _has(keys, "lora_unet_") or _has(keys, "lora_te") or _has(keys, "bundle_emb."):
        raise ModelLayoutError(f"{path}: this is a LoRA / bundle file, not a model checkpoint; give the model "
                               "with --model and the bundle with --lora-dir and a <lora:NAME:1> tag")
    for family, needle in OTHER_FAMILIES:
        if any(needle in k for k in keys):
            raise _refuse(path, f"a {family} model", f"it has '{needle}' keys")
    if not _has(keys, UNET_KEY + "input_blocks."):
        if "conv_in.weight" in shapes and _has(keys, "down_blocks."):
            raise ModelLayoutError(f"{path}: this is a lone diffusers UNet (down_blocks.* keys), not a whole "
                                   "checkpoint; give a diffusers pipeline folder or a single-file checkpoint")
        sample = ", ".join(sorted(keys)[:3])
        raise ModelLayoutError(f"{path}: not a Stable Diffusion checkpoint: no {UNET_KEY}input_blocks.* keys "
                               f"(first keys: {sample})")
    if _has(keys, SD2_TEXT_KEY):
        raise _refuse(path, "a Stable Diffusion 2.x model", f"its text encoder is open_clip at {SD2_TEXT_KEY}*")
    if _has(keys, REFINER_TEXT_KEY):
        raise _refuse(path, "the SDXL refiner", f"its only text encoder is open_clip at {REFINER_TEXT_KEY}*")
    if _has(keys, SDXL_CLIP_L_KEY) and _has(keys, SDXL_CLIP_G_KEY):
        base, text = "sdxl", {"clip_l": SDXL_CLIP_L_KEY, "clip_g": SDXL_CLIP_G_KEY}
    elif _has(keys, SD1_TEXT_KEY):
        base, text = "sd1", {"clip_l": SD1_TEXT_KEY}
    elif _has(keys, "conditioner.embedders."):
        raise ModelLayoutError(f"{path}: an sgm checkpoint without SDXL's two text encoders at {SDXL_CLIP_L_KEY}* "
                               f"and {SDXL_CLIP_G_KEY}*; only SDXL base is supported")
    else:
        raise ModelLayoutError(f"{path}: the checkpoint has no text encoder ({SD1_TEXT_KEY}* for SD 1.x, "
                               f"{SDXL_CLIP_L_KEY}* + {SDXL_CLIP_G_KEY}* for SDXL); Pivotal needs it to train "
                               "embeddings")
    conv_in = shapes.get(UNET_KEY + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        raise ModelLayoutError(f"{path}: {UNET_KEY}input_blocks.0.0.weight (the UNet's first conv) is missing")
    if conv_in[1] != 4:
        raise _refuse(path, "an inpainting, instruct-pix2pix or depth model",
                      f"its UNet takes {conv_in[1]} input channels, text-to-image models take 4")
    if base == "sd1":
        context = _context_width(shapes)
        width = shapes.get(SD1_TEXT_KEY + "text_model.embeddings.token_embedding.weight",
                           shapes.get(SD1_TEXT_KEY + "embeddings.token_embedding.weight"))
        if context == 1024 or (width is not None and context is not None and width[1] != context):
            raise _refuse(path, "not an SD 1.x model", f"its UNet attends to {context}-wide text, its CLIP "
                                                       f"gives {width[1] if width else '?'}")
    unet_dtypes = [d for k, d in (dtypes or {}).items() if k.startswith(UNET_KEY)]
    dtype = max(set(unet_dtypes), key=unet_dtypes.count) if unet_dtypes else "F32"
    return CheckpointKind(base=base, text_prefixes=text, has_vae=_has(keys, VAE_KEY), dtype=dtype)


def _context_width(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    """Width of the text states the UNet's cross-attention reads (attn2.to_k's input), if any."""
    for k, shape in shapes.items():
        if k.startswith(UNET_KEY) and k.endswith(".attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def is_ignored(key: str) -> bool:
    """Whether ``key`` is one of the non-model tensors checkpoints carry (see ``IGNORED_PREFIXES``)."""
    return key.startswith(IGNORED_PREFIXES) or key.endswith((".position_ids", ".logit_scale", ".attn_mask"))
