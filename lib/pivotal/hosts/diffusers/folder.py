"""Check and load a local folder laid out like a diffusers Stable Diffusion pipeline.

Expected layout (what ``StableDiffusionPipeline.save_pretrained`` writes)::

    unet/  vae/  text_encoder/  tokenizer/  scheduler/   [text_encoder_2/  tokenizer_2/  for SDXL]

Only ``.safetensors`` weights are loaded (a pickle ``.bin`` can run code when read); an
``.fp16`` variant is used when it is the only one there. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pivotal.errors import ConfigError, ModelLayoutError
from pivotal.hosts.diffusers.parts import PipelineParts

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
#: subfolder -> the weight file's stem (diffusers models vs transformers models)
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}
CONFIG_FILES = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
                "text_encoder_2": "config.json", "scheduler": "scheduler_config.json"}
CONVERT_HINT = "give the .safetensors file itself as --model (SD 1.x and SDXL single files load directly)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLayoutError(f"{path}: cannot read: {e}") from e
    if not isinstance(data, dict):
        raise ModelLayoutError(f"{path}: expected a JSON object")
    return data


def weight_variant(folder: Path, stem: str) -> str | None:
    """None for ``stem.safetensors`` (or a sharded index), "fp16" when only the fp16 variant exists.

    ModelLayoutError naming the folder when there are no safetensors weights, with the reason
    when only pickle ``.bin`` weights are there.
    """
    plain = (f"{stem}.safetensors", f"{stem}.safetensors.index.json")
    fp16 = (f"{stem}.fp16.safetensors", f"{stem}.safetensors.index.fp16.json", f"{stem}.fp16.safetensors.index.json")
    if any((folder / n).is_file() for n in plain):
        return None
    if any((folder / n).is_file() for n in fp16):
        return "fp16"
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise ModelLayoutError(f"{folder}: has only pickle weights ({', '.join(pickles)}); Pivotal loads "
                               ".safetensors only, because reading a pickle can run code. Re-save the "
                               "model with save_pretrained(..., safe_serialization=True)")
    raise ModelLayoutError(f"{folder}: no {stem}.safetensors weights found")


def check_pipeline_folder(path: str | os.PathLike) -> tuple[str, dict[str, str | None]]:
    """``(base_model, {subfolder: weight variant})`` of a diffusers pipeline folder.

    ConfigError when ``path`` does not exist or is a single checkpoint file; ModelLayoutError
    naming the folder and every missing part otherwise.
    """
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"{root}: no such folder (setting: --model)")
    if not root.is_dir():
        if root.suffix.lower() in SINGLE_FILE_SUFFIXES:
            raise ConfigError(f"{root}: a single-file checkpoint, not a diffusers folder; load it with "
                              "pivotal.hosts.diffusers.single_file.load_single_file (the CLI's --model does)")
        raise ConfigError(f"{root}: is a file; --model needs a diffusers pipeline folder")
    sdxl = (root / "text_encoder_2").is_dir()
    subfolders = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if sdxl:
        subfolders += ["text_encoder_2", "tokenizer_2"]
    missing = []
    for sub in subfolders:
        folder = root / sub
        if not folder.is_dir():
            missing.append(f"{sub}/")
        elif sub.startswith("tokenizer"):
            if not ((folder / "tokenizer.json").is_file()
                    or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())):
                missing.append(f"{sub}/vocab.json + merges.txt")
        elif not (folder / CONFIG_FILES[sub]).is_file():
            missing.append(f"{sub}/{CONFIG_FILES[sub]}")
    if missing:
        raise ModelLayoutError(f"{root}: not a complete diffusers Stable Diffusion folder; missing "
                               f"{', '.join(missing)}. If you have a single .safetensors checkpoint, {CONVERT_HINT}")
    variants = {sub: weight_variant(root / sub, stem) for sub, stem in WEIGHT_STEMS.items() if sub in subfolders}
    if not sdxl:
        width = _read_json(root / "text_encoder" / "config.json").get("hidden_size")
        if width == 1024:
            raise ModelLayoutError(f"{root}: looks like Stable Diffusion 2.x (1024-wide text encoder, no "
                                   "text_encoder_2); only SD1 and SDXL are supported")
    return ("sdxl" if sdxl else "sd1"), variants


def _load(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLayoutError(f"{what}: cannot load: {e}") from e


def load_pipeline_parts(path: str | os.PathLike, device: torch.device, dtype: torch.dtype) -> PipelineParts:
    """Load every part of the folder onto ``device``: UNet and text encoders in ``dtype``, the VAE
    in fp32 when its config asks for upcasting (SDXL's VAE overflows in fp16), all frozen, eval."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base, variants = check_pipeline_folder(path)
    root = Path(path)
    common = dict(local_files_only=True, use_safetensors=True)
    unet = _load(f"{root}/unet", UNet2DConditionModel.from_pretrained, str(root), subfolder="unet",
                 torch_dtype=dtype, variant=variants["unet"], **common)
    vae_cfg = _read_json(root / "vae" / "config.json")
    vae_dtype = torch.float32 if vae_cfg.get("force_upcast", False) else dtype
    vae = _load(f"{root}/vae", AutoencoderKL.from_pretrained, str(root), subfolder="vae",
                torch_dtype=vae_dtype, variant=variants["vae"], **common)
    encoders = {"clip_l": _load(f"{root}/text_encoder", CLIPTextModel.from_pretrained, str(root),
                                subfolder="text_encoder", variant=variants["text_encoder"], **common)}
    tokenizers = {"clip_l": _load(f"{root}/tokenizer", CLIPTokenizer.from_pretrained, str(root),
                                  subfolder="tokenizer", local_files_only=True)}
    if base == "sdxl":
        encoders["clip_g"] = _load(f"{root}/text_encoder_2", CLIPTextModelWithProjection.from_pretrained,
                                   str(root), subfolder="text_encoder_2", variant=variants["text_encoder_2"],
                                   **common)
        tokenizers["clip_g"] = _load(f"{root}/tokenizer_2", CLIPTokenizer.from_pretrained, str(root),
                                     subfolder="tokenizer_2", local_files_only=True)
    # transformers renamed torch_dtype to dtype (v4.56); casting after loading works with both.
    for te in encoders.values():
        te.to(device=device, dtype=dtype)
    unet.to(device)
    vae.to(device)
    for m in (unet, vae, *encoders.values()):
        m.eval().requires_grad_(False)
    index = root / "model_index.json"
    model_index = _read_json(index) if index.is_file() else {}
    return PipelineParts(
        base_model=base, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
        scheduler_config=_read_json(root / "scheduler" / "scheduler_config.json"),
        force_zeros_for_empty_prompt=bool(model_index.get("force_zeros_for_empty_prompt", base == "sdxl")),
        source=str(root),
    )
