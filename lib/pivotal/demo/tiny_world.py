"""The tiny *pre-trained* SD1 demo model, "tiny-world-sd1": its architecture and its weight file.

It has SD1's structure, scaled down, and was trained by Pivotal's own code
(:mod:`pivotal.demo.pretrain.run`, ``tools/train_base_model.py``) on the procedural world of
:mod:`pivotal.demo.world`, so it draws what a prompt such as "a red circle on a blue background,
top left" asks for. Sizes:

* text encoder: transformers ``CLIPTextModel``, real CLIP tokenizer (vocab 49408, 77 positions),
  64 wide, 3 layers, 4 heads, quick_gelu (SD1's clip_l activation);
* UNet: diffusers ``UNet2DConditionModel``, SD1 block types, 3 levels of 64 channels, 2 heads,
  cross-attention on the 64-wide text states; latents 8x8x4 for 64 px;
* VAE: diffusers ``AutoencoderKL``, 4 levels of 64 channels (8x downsampling, as SD), no resnets
  in the encoder's levels and one per decoder level (``layers_per_block=0``): the encoder is a
  learned patch embedding followed by the mid block, which trains in minutes.

Why 64 channels at every level: the LDM code a webui runs hard-wires GroupNorm with 32 groups, and
with 32 channels every group is one channel, which normalises away each channel's mean over the
picture, so a flat background's colour could not pass the VAE's or the UNet's last norm. Two
channels per group can carry it.

Weight file (safetensors, fp16): ``unet.*`` / ``vae.*`` in diffusers names, ``text_model.*`` in
transformers 4.x names (the webui's layout; mapped to transformers 5's on load). The 49408 x 64
token embedding would dominate the file, yet only the rows of words the world's captions use were
ever trained: the file holds those rows (``tokens.ids`` + ``tokens.rows``) and the rest is
re-drawn on load from a fixed seed with numpy's legacy ``RandomState``, whose stream never
changes across versions, exactly as training initialised them. Metadata ``pivotal.tiny_world``
(JSON) holds the VAE's latent scaling factor, the token seed and a training summary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from pivotal.errors import BundleError, ModelLayoutError

WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "tiny-world-sd1.safetensors"
METADATA_KEY = "pivotal.tiny_world"
FORMAT_VERSION = 1
VOCAB_SIZE = 49408
TEXT_WIDTH, TEXT_LAYERS, TEXT_HEADS = 64, 3, 4
TOKEN_STD = 0.02  # CLIP's own init std for the token embedding
LATENT_SIZE = 8
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "unet.", "vae.", "text_model."
TOKEN_IDS_KEY, TOKEN_ROWS_KEY = "tokens.ids", "tokens.rows"
TOKEN_EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"


#: ``config.json`` of the text encoder, written out as it is for the webui (see
#: :mod:`pivotal.demo.checkpoint`); plain values only, so every transformers version reads it.
TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": VOCAB_SIZE,
    "hidden_size": TEXT_WIDTH, "intermediate_size": 4 * TEXT_WIDTH, "projection_dim": TEXT_WIDTH,
    "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": TEXT_HEADS, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "initializer_range": 0.02,
    "initializer_factor": 1.0, "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
    "torch_dtype": "float32",
}


def text_config() -> Any:
    """The ``CLIPTextConfig`` of :data:`TEXT_CONFIG` (SD1's clip_l settings apart from the sizes)."""
    from transformers import CLIPTextConfig

    skip = ("architectures", "model_type", "torch_dtype")
    return CLIPTextConfig(**{k: v for k, v in TEXT_CONFIG.items() if k not in skip})


def unet_config() -> dict[str, Any]:
    """``UNet2DConditionModel`` keyword arguments (SD1 block types; LDM-compatible sizes)."""
    return dict(sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(64, 64, 64),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=TEXT_WIDTH, attention_head_dim=2, use_linear_projection=False)


def vae_config(scaling_factor: float = 1.0) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments: 4 levels (8x downsampling), 4 latent channels."""
    return dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(64, 64, 64, 64), layers_per_block=0, norm_num_groups=32,
                sample_size=LATENT_SIZE * 8, scaling_factor=float(scaling_factor), force_upcast=False)


def initial_token_rows(seed: int) -> torch.Tensor:
    """(49408, 64) fp32: the token embedding before training, ``TOKEN_STD`` x N(0, 1) from
    numpy's ``RandomState(seed)`` (a stream numpy guarantees never to change)."""
    draws = np.random.RandomState(int(seed) % 2**32).standard_normal((VOCAB_SIZE, TEXT_WIDTH))
    return torch.from_numpy((draws * TOKEN_STD).astype(np.float32))


def build_modules(init_seed: int, token_seed: int,
                  scaling_factor: float = 1.0) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(unet, vae, text encoder) with fresh weights: the libraries' own initialisation drawn from
    ``init_seed`` (the caller's random state is left untouched), the token embedding from
    :func:`initial_token_rows`. fp32, CPU, train mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_seed))
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config(scaling_factor))
        te = CLIPTextModel(text_config())
    with torch.no_grad():
        te.get_input_embeddings().weight.copy_(initial_token_rows(token_seed))
    return unet, vae, te


def _text_prefix(te: nn.Module) -> str:
    from pivotal.adapters.te_names import hf_text_model_prefix

    return hf_text_model_prefix(te)


def file_tensors(unet: nn.Module, vae: nn.Module, te: nn.Module, trained_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The weight file's tensors (fp16; ``tokens.ids`` int64): the modules' weights in the
    canonical names, the token embedding cut down to the rows ``trained_ids`` (K,)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae)):
        out.update({prefix + k: v.detach().to(torch.float16) for k, v in module.state_dict().items()})
    have = _text_prefix(te)
    for k, v in te.state_dict().items():
        name = TEXT_PREFIX + k[len(have):]
        if name.endswith("position_ids") or name == TOKEN_EMBEDDING_KEY:
            continue  # a buffer some transformers versions save; the embedding is stored sparsely
        out[name] = v.detach().to(torch.float16)
    ids = torch.unique(trained_ids.to(torch.int64))
    out[TOKEN_IDS_KEY] = ids
    out[TOKEN_ROWS_KEY] = te.get_input_embeddings().weight.detach()[ids].to(torch.float16)
    return out


def read_weight_file(path: str | os.PathLike = WEIGHTS_FILE) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata JSON) of a tiny-world weight file. BundleError names a file that is
    missing, unreadable or not one of ours."""
    from pivotal.formats.safetensors_io import load_tensors, read_header

    p = Path(path)
    if not p.is_file():
        raise BundleError(p, "the tiny-world model's weights are missing; rebuild them with "
                             "python tools/train_base_model.py")
    header = read_header(p)
    try:
        meta = json.loads(header.metadata.get(METADATA_KEY, ""))
    except json.JSONDecodeError:
        raise BundleError(p, f"no {METADATA_KEY} metadata: not a tiny-world weight file") from None
    if meta.get("format") != FORMAT_VERSION:
        raise BundleError(p, f"tiny-world format {meta.get('format')!r}; this Pivotal reads {FORMAT_VERSION}")
    return load_tensors(header), meta


def full_text_state(tensors: Mapping[str, torch.Tensor], token_seed: int) -> dict[str, torch.Tensor]:
    """The text encoder's state in canonical names (fp32) with the whole token embedding:
    the re-drawn initial rows with the trained ones put back."""
    rows = initial_token_rows(token_seed)
    ids = tensors[TOKEN_IDS_KEY].to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= VOCAB_SIZE):
        raise ModelLayoutError(f"{TOKEN_IDS_KEY}: token ids outside 0..{VOCAB_SIZE - 1}")
    rows[ids] = tensors[TOKEN_ROWS_KEY].float()
    state = {k: v.float() for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    state[TOKEN_EMBEDDING_KEY] = rows
    return state


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that tolerates only a missing ``position_ids`` buffer (transformers
    4.30 saves it, later versions do not) and otherwise names what does not match."""
    result = module.load_state_dict(dict(state), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise ModelLayoutError(f"{what}: weights do not fit the model (missing {missing[:3]}, "
                               f"unexpected {list(result.unexpected_keys)[:3]})")


def load_modules(path: str | os.PathLike = WEIGHTS_FILE) -> tuple[nn.Module, nn.Module, nn.Module, dict[str, Any]]:
    """(unet, vae, text encoder, metadata) of a weight file, fp32 on CPU, eval mode, frozen."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    tensors, meta = read_weight_file(path)
    with torch.device("meta"):  # no init work: every weight comes from the file
        unet = UNet2DConditionModel(**unet_config())
        vae = AutoencoderKL(**vae_config(float(meta["scaling_factor"])))
    unet, vae = unet.to_empty(device="cpu"), vae.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]):
        te = CLIPTextModel(text_config())  # small apart from the embedding, overwritten below
    for prefix, module in ((UNET_PREFIX, unet), (VAE_PREFIX, vae)):
        part = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        _load_strict(module, part, f"{path} [{prefix}*]")
    have = _text_prefix(te)
    text = {have + k[len(TEXT_PREFIX):]: v for k, v in full_text_state(tensors, int(meta["token_seed"])).items()}
    _load_strict(te, text, f"{path} [{TEXT_PREFIX}*]")
    for m in (unet, vae, te):
        m.eval().requires_grad_(False)
    return unet, vae, te, meta


def load_parts(path: str | os.PathLike = WEIGHTS_FILE, cache_dir: str | os.PathLike | None = None) -> Any:
    """A :class:`~pivotal.hosts.diffusers.parts.PipelineParts` of the model in ``path`` with the
    demo's CLIP tokenizer (``cache_dir``: where its files are written once) and SD's scheduler."""
    from pivotal.demo.basics import SCHEDULER_CONFIG, demo_tokenizer
    from pivotal.hosts.diffusers.parts import PipelineParts

    tokenizer = demo_tokenizer("clip_l", cache_dir)
    unet, vae, te, _meta = load_modules(path)
    return PipelineParts(base_model="sd1", unet=unet, vae=vae, text_encoders={"clip_l": te},
                         tokenizers={"clip_l": tokenizer}, scheduler_config=dict(SCHEDULER_CONFIG),
                         source=f"tiny-world sd1 ({Path(path).name})")
