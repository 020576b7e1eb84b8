"""Export the tiny-world model as a single-file checkpoint in the original LDM layout, for a webui.

``export_checkpoint(OUT.safetensors)`` writes three things side by side:

* ``OUT.safetensors``: ``model.diffusion_model.*`` (LDM ``UNetModel`` names, via
  :mod:`pivotal.adapters.unet_names`), ``first_stage_model.*`` (LDM ``AutoencoderKL``, via
  :mod:`pivotal.formats.vae_names`), ``cond_stage_model.transformer.text_model.*`` (HF CLIP, as SD1.5
  checkpoints hold it, with the whole token embedding and ``position_ids``);
* ``OUT.yaml``: the ``LatentDiffusion`` config with the matching ``UNetModel`` params and VAE
  ``ddconfig``; a webui uses a same-named yaml instead of guessing the architecture;
* ``OUT-clip/``: ``config.json`` (the tiny ``CLIPTextConfig``) and the CLIP tokenizer files. The
  yaml's ``FrozenCLIPEmbedder`` gets ``version: <absolute path of that folder>``, because it calls
  ``from_pretrained(version)`` for the tokenizer and the text model's config (the webui then
  loads the weights from the checkpoint). Move the three together and re-export if the folder moves.

Nothing here imports diffusers: the export runs in a webui's environment too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from pivotal.adapters.unet_names import UNetLayout
from pivotal.demo import tiny_world
from pivotal.errors import ConfigError, SaveError
from pivotal.formats.checkpoint_kind import SD1_TEXT_KEY as TEXT_KEY
from pivotal.formats.checkpoint_kind import UNET_KEY, VAE_KEY
from pivotal.formats.safetensors_io import atomic_save
from pivotal.formats.vae_names import vae_state_to_ldm
from pivotal.formats.yaml_text import to_yaml

CLIP_FOLDER_SUFFIX = "-clip"
SPECIAL_TOKENS = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>"}


def ldm_unet_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """``UNetModel`` params equivalent to a diffusers SD1 UNet config (uniform heads, 1 layer)."""
    channels = list(cfg["block_out_channels"])
    base = channels[0]
    if any(c % base for c in channels) or cfg.get("use_linear_projection"):
        raise ConfigError("the UNet has no LDM SD1 equivalent (channels not multiples of the first, or linear "
                          "projections)")
    attention = [2 ** i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("CrossAttn")]
    return {"image_size": int(cfg["sample_size"]), "in_channels": int(cfg["in_channels"]),
            "out_channels": int(cfg["out_channels"]), "model_channels": base, "attention_resolutions": attention,
            "num_res_blocks": int(cfg["layers_per_block"]), "channel_mult": [c // base for c in channels],
            "num_heads": int(cfg["attention_head_dim"]), "use_spatial_transformer": True, "transformer_depth": 1,
            "context_dim": int(cfg["cross_attention_dim"]), "use_checkpoint": False, "legacy": False}


def ldm_vae_ddconfig(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The LDM ``ddconfig`` of a diffusers ``AutoencoderKL`` config."""
    channels = list(cfg["block_out_channels"])
    return {"double_z": True, "z_channels": int(cfg["latent_channels"]), "resolution": int(cfg["sample_size"]),
            "in_channels": int(cfg["in_channels"]), "out_ch": int(cfg["out_channels"]), "ch": channels[0],
            "ch_mult": [c // channels[0] for c in channels], "num_res_blocks": int(cfg["layers_per_block"]),
            "attn_resolutions": [], "dropout": 0.0}


def ldm_config(scaling_factor: float, clip_folder: str) -> dict[str, Any]:
    """The whole ``LatentDiffusion`` config (SD1's v1-inference.yaml with the tiny sizes)."""
    from pivotal.demo.basics import SCHEDULER_CONFIG

    unet = ldm_unet_params(tiny_world.unet_config())
    vae_cfg = tiny_world.vae_config()
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": SCHEDULER_CONFIG["beta_start"], "linear_end": SCHEDULER_CONFIG["beta_end"],
            "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": SCHEDULER_CONFIG["num_train_timesteps"],
            "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": unet["image_size"],
            "channels": unet["in_channels"], "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": float(scaling_factor), "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": int(vae_cfg["latent_channels"]), "monitor": "val/rec_loss",
                "ddconfig": ldm_vae_ddconfig(vae_cfg), "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": clip_folder}},
        }}}


def checkpoint_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                     dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The LDM state dict of a tiny-world weight file's ``tensors`` / ``meta``."""
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    layout = UNetLayout.from_diffusers(tiny_world.unet_config())
    out = {UNET_KEY + layout.to_ldm(k): v for k, v in part(tiny_world.UNET_PREFIX).items()}
    levels = len(tiny_world.vae_config()["block_out_channels"])
    out.update({VAE_KEY + k: v for k, v in vae_state_to_ldm(part(tiny_world.VAE_PREFIX), levels).items()})
    text = tiny_world.full_text_state(tensors, int(meta["token_seed"]))
    out.update({TEXT_KEY + k: v for k, v in text.items()})
    out = {k: v.to(dtype).contiguous() for k, v in out.items()}
    positions = int(tiny_world.TEXT_CONFIG["max_position_embeddings"])
    out[TEXT_KEY + "text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def write_clip_folder(folder: Path) -> None:
    """``config.json`` + the tokenizer files (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json) that ``CLIPTokenizer`` / ``CLIPTextConfig.from_pretrained`` read,
    in a form transformers 4.30 to 5 all accept."""
    from pivotal.demo.basics import ensure_tokenizer_files

    source = ensure_tokenizer_files()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(source / name, folder / name)
    (folder / "config.json").write_text(json.dumps(tiny_world.TEXT_CONFIG, indent=2) + "\n", encoding="utf-8")
    tok = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True, **SPECIAL_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS, indent=2) + "\n", encoding="utf-8")


def export_checkpoint(out: str | os.PathLike, weights: str | os.PathLike = tiny_world.WEIGHTS_FILE,
                      half: bool = False, force: bool = False) -> list[Path]:
    """Write ``out`` (.safetensors), its ``.yaml`` and its ``-clip/`` folder; returns the three
    paths. fp32 unless ``half``. SaveError if any exists and not ``force``."""
    target = Path(out)
    if target.suffix != ".safetensors":
        raise ConfigError(f"{target}: the checkpoint must be a .safetensors file")
    yaml_path = target.with_suffix(".yaml")
    clip = target.with_name(target.stem + CLIP_FOLDER_SUFFIX)
    existing = [p for p in (target, yaml_path, clip) if p.exists()]
    if existing and not force:
        raise SaveError(f"{', '.join(map(str, existing))} already exist(s); pass --force to overwrite")
    tensors, meta = tiny_world.read_weight_file(weights)
    state = checkpoint_state(tensors, meta, torch.float16 if half else torch.float32)
    write_clip_folder(clip)
    config = ldm_config(float(meta["scaling_factor"]), str(clip.resolve()))
    atomic_save(target, state, {"pivotal.source": Path(weights).name})
    tmp = yaml_path.with_name(yaml_path.name + ".tmp")
    tmp.write_text(to_yaml(config), encoding="utf-8")
    os.replace(tmp, yaml_path)
    return [target, yaml_path, clip]
