"""Load a single-file SD 1.x / SDXL checkpoint (``model.safetensors``) offline as diffusers modules.

Steps: (1) read and validate the safetensors header; (2) tell the family from the keys
(:mod:`pivotal.formats.checkpoint_kind`: SD2, SD3, Flux ... are refused by name); (3) read the
configs off the shapes (:mod:`pivotal.hosts.diffusers.ldm_configs`, the shipped family configs
filling in what shapes cannot tell); (4) build each model on the meta device and pull every one
of its weights out of the file by Pivotal's own name maps (UNet: ``UNetLayout.to_ldm``, VAE:
``vae_name_to_ldm``, SDXL's open_clip encoder: ``openclip_to_hf_state_dict``); a weight the model
needs that the file lacks, or a file weight no model takes, is an error naming it; (5) the CLIP
tokenizers come from open_clip's BPE file, the noise schedule from the shipped SD one.

A checkpoint without a VAE (``first_stage_model.*``) takes ``NAME.vae.safetensors`` from next to
it (the webui's convention), in LDM or diffusers names. Weights are converted to the host dtype
one at a time, so the file's tensors and the models are never held twice over.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from pivotal.adapters.te_names import hf_text_model_prefix, openclip_to_hf_state_dict
from pivotal.adapters.unet_names import UNetLayout
from pivotal.errors import ConfigError, ModelLayoutError
from pivotal.formats.checkpoint_kind import UNET_KEY, VAE_KEY, CheckpointKind, detect_checkpoint, is_ignored
from pivotal.formats.safetensors_io import Header, load_tensors, read_header
from pivotal.formats.vae_names import vae_name_to_ldm
from pivotal.hosts.diffusers.ldm_configs import (
    YamlHints,
    hf_text_config,
    open_clip_text_config,
    read_yaml_hints,
    shipped_config,
    unet_config,
    vae_config,
)
from pivotal.hosts.diffusers.parts import PipelineParts

VAE_SIBLING_SUFFIX = ".vae.safetensors"


def _split(header: Header, prefix: str) -> dict[str, tuple[int, ...]]:
    return {k[len(prefix):]: v.shape for k, v in header.tensors.items() if k.startswith(prefix)}


def _vae_source(path: Path, header: Header, kind: CheckpointKind) -> tuple[Header, str, bool]:
    """(header, key prefix, diffusers names?) of the VAE: the checkpoint's own or the sibling file."""
    if kind.has_vae:
        return header, VAE_KEY, False
    sibling = path.with_name(path.stem + VAE_SIBLING_SUFFIX)
    if not sibling.is_file():
        raise ModelLayoutError(f"{path}: the checkpoint has no VAE ({VAE_KEY}* keys); put the VAE next to it as "
                               f"{sibling.name} (LDM or diffusers names)")
    vae = read_header(sibling)
    keys = list(vae.tensors)
    if any(k.startswith(VAE_KEY) for k in keys):
        return vae, VAE_KEY, False
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return vae, "", True
    if any(k.startswith("encoder.down.") for k in keys):
        return vae, "", False
    raise ModelLayoutError(f"{sibling}: not a VAE (no encoder.down.* / encoder.down_blocks.* keys)")


def _vae_shapes(vae: Header, prefix: str, diffusers_names: bool) -> dict[str, tuple[int, ...]]:
    """The VAE's shapes under LDM names (a diffusers-named file is renamed for reading its config)."""
    shapes = _split(vae, prefix)
    if not diffusers_names:
        return shapes
    levels = len({k.split(".")[2] for k in shapes if k.startswith("decoder.up_blocks.")})
    return {vae_name_to_ldm(k, levels): v for k, v in shapes.items()}


def _pull(model: nn.Module, tensors: dict[str, torch.Tensor], source_name: Callable[[str], str],
          dtype: torch.dtype, what: str) -> None:
    """Load every entry of ``model.state_dict()`` from ``tensors[source_name(name)]``, popping each
    (so memory is handed over one tensor at a time), converted to ``dtype`` and reshaped where the
    layouts differ only by singleton dims (LDM's 1x1-conv attention vs diffusers' Linear).

    ``position_ids`` buffers are made, not read (old checkpoints hold them as floats).
    ModelLayoutError for a weight the file lacks or one whose size does not fit.
    """
    state: dict[str, torch.Tensor] = {}
    for name, like in model.state_dict().items():
        if name.endswith("position_ids"):
            state[name] = torch.arange(like.shape[-1], dtype=torch.int64).expand(like.shape).clone()
            continue
        key = source_name(name)
        if key not in tensors:
            raise ModelLayoutError(f"{what}: the weight {key} is missing (needed for {name})")
        value = tensors.pop(key)
        if tuple(value.shape) != tuple(like.shape):
            if value.numel() != like.numel():
                raise ModelLayoutError(f"{what}: {key} has shape {tuple(value.shape)}, the model needs "
                                       f"{tuple(like.shape)}")
            value = value.reshape(like.shape)
        state[name] = value.to(dtype) if value.is_floating_point() else value
    model.load_state_dict(state, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # non-persistent buffers are not in state_dict(); only position ids exist here
            if not name.endswith("position_ids"):
                raise ModelLayoutError(f"{what}: the model's buffer {name} has no value")
            owner, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(owner), leaf, torch.arange(buf.shape[-1]).expand(buf.shape).clone())


def _leftovers(tensors: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    rest = sorted(k for k in tensors if not is_ignored(k))
    if rest:
        raise ModelLayoutError(f"{what}: {len(rest)} weights no model part takes, e.g. "
                               f"{', '.join(prefix + k for k in rest[:3])}")


def _build(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):  # no initialisation work: every weight comes from the file
        return factory()


def _text_encoders(header: Header, kind: CheckpointKind, hints: YamlHints, dtype: torch.dtype,
                   path: Path) -> dict[str, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def make(cls: Any, cfg: dict[str, Any]) -> nn.Module:
        return _build(lambda: cls(CLIPTextConfig(**{k: v for k, v in cfg.items()
                                                    if k not in ("architectures", "model_type")})))

    encoders: dict[str, nn.Module] = {}
    for key, prefix in kind.text_prefixes.items():
        what = f"{path} [{prefix}*]"
        raw = load_tensors(header, [k for k in header.tensors if k.startswith(prefix)])
        tensors = {k[len(prefix):]: v for k, v in raw.items()}
        del raw
        if key == "clip_l":
            if not any(k.startswith("text_model.") for k in tensors):  # very old files: no text_model level
                tensors = {"text_model." + k: v for k, v in tensors.items()}
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            # the yaml's text config describes SD1's cond_stage_model only
            te = make(CLIPTextModel, hf_text_config(shapes, f"{kind.base}_clip_l",
                                                    hints if kind.base == "sd1" else None))
            have = hf_text_model_prefix(te)
            _pull(te, tensors, lambda n, have=have: "text_model." + n[len(have):], dtype, what)
        else:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            te = make(CLIPTextModelWithProjection, open_clip_text_config(shapes, f"{kind.base}_clip_g"))
            tensors = openclip_to_hf_state_dict(tensors, prefix=hf_text_model_prefix(te), projection=True)
            _pull(te, tensors, lambda n: n, dtype, what)
        _leftovers(tensors, prefix, what)
        encoders[key] = te
    return encoders


def load_single_file_parts(path: str | os.PathLike, device: torch.device, dtype: torch.dtype,
                           cache_dir: str | os.PathLike | None = None) -> PipelineParts:
    """Every part of the checkpoint at ``path`` on ``device``: UNet and text encoders in ``dtype``,
    the VAE in fp32 when its config asks for upcasting, all frozen, eval. ``cache_dir``: where
    the CLIP tokenizer files are written once (default: the user cache)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from pivotal.hosts.diffusers.clip_tokenizer import clip_tokenizer

    p = Path(path)
    # 1-2. header and family
    header = read_header(p)
    kind = detect_checkpoint(str(p), {k: v.shape for k, v in header.tensors.items()},
                             {k: v.dtype for k, v in header.tensors.items()})
    hints = read_yaml_hints(p)
    vae_header, vae_prefix, vae_diffusers = _vae_source(p, header, kind)
    claimed = (UNET_KEY, *kind.text_prefixes.values()) + ((VAE_KEY,) if kind.has_vae else ())
    stray = sorted(k for k in header.tensors if not k.startswith(claimed) and not is_ignored(k))
    if stray:
        raise ModelLayoutError(f"{p}: {len(stray)} weights belong to no SD part Pivotal knows, e.g. "
                               f"{', '.join(stray[:3])}; only plain SD 1.x / SDXL checkpoints are supported")
    # 3-4. text encoders first: the SDXL UNet's added-conditioning width depends on clip_g's projection
    encoders = _text_encoders(header, kind, hints, dtype, p)
    ucfg = unet_config(_split(header, UNET_KEY), kind.base, hints)
    if kind.base == "sdxl":
        pooled = int(encoders["clip_g"].config.projection_dim)
        extra = ucfg["projection_class_embeddings_input_dim"] - pooled
        if extra <= 0 or extra % 6:
            raise ModelLayoutError(f"{p}: the UNet's added conditioning takes {extra + pooled} dims, which is not "
                                   f"clip_g's {pooled} pooled dims + 6 size embeddings")
        ucfg["addition_time_embed_dim"] = extra // 6
    unet = _build(lambda: UNet2DConditionModel(**{k: v for k, v in ucfg.items() if not k.startswith("_")}))
    tensors = {k[len(UNET_KEY):]: v for k, v in
               load_tensors(header, [k for k in header.tensors if k.startswith(UNET_KEY)]).items()}
    _pull(unet, tensors, UNetLayout.from_diffusers(ucfg).to_ldm, dtype, f"{p} [{UNET_KEY}*]")
    _leftovers(tensors, UNET_KEY, f"{p} [{UNET_KEY}*]")
    del tensors
    vcfg = vae_config(_vae_shapes(vae_header, vae_prefix, vae_diffusers), kind.base, hints)
    vae = _build(lambda: AutoencoderKL(**{k: v for k, v in vcfg.items() if not k.startswith("_")}))
    vae_dtype = torch.float32 if vcfg.get("force_upcast", False) else dtype
    levels = len(vcfg["block_out_channels"])
    vwhat = f"{vae_header.path} [{vae_prefix}*]"
    tensors = {k[len(vae_prefix):]: v for k, v in
               load_tensors(vae_header, [k for k in vae_header.tensors if k.startswith(vae_prefix)]).items()}
    _pull(vae, tensors, (lambda n: n) if vae_diffusers else (lambda n: vae_name_to_ldm(n, levels)), vae_dtype, vwhat)
    _leftovers(tensors, vae_prefix, vwhat)
    del tensors
    for m in (unet, vae, *encoders.values()):
        m.to(device).eval().requires_grad_(False)
    # 5. tokenizers and schedule
    tokenizers = {key: clip_tokenizer(key, cache_dir) for key in encoders}
    scheduler = shipped_config("scheduler")
    if hints.prediction_type:
        scheduler["prediction_type"] = hints.prediction_type
    return PipelineParts(base_model=kind.base, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                         scheduler_config=scheduler, force_zeros_for_empty_prompt=kind.base == "sdxl", source=str(p))


def load_single_file(path: str | os.PathLike, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, cache_dir: str | os.PathLike | None = None) -> Any:
    """A :class:`~pivotal.hosts.diffusers.host.DiffusersHost` over a single-file checkpoint.

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere, whatever the file holds (fp16 and
    fp32 files load alike). ConfigError for a missing file or a pickle one; ModelLayoutError
    naming the family of a checkpoint that is not SD 1.x / SDXL base, or the weight that does not fit.
    """
    from pivotal.hosts.diffusers.host import DiffusersHost, require_standalone_libraries, resolve_device

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file (setting: --model)")
    if p.suffix.lower() != ".safetensors":
        raise ConfigError(f"{p}: only .safetensors checkpoints load (a pickle .ckpt/.pt can run code when "
                          "read); convert it once with a tool you trust, or give a diffusers folder (setting: --model)")
    require_standalone_libraries()
    dev = resolve_device(device)
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    parts = load_single_file_parts(p, dev, dt, cache_dir)
    return DiffusersHost(parts, label=f"{p.name} ({parts.base_model}, single file)")
