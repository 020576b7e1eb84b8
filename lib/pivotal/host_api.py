"""The seam between the trainer and a host (standalone diffusers, the A1111 webui, later Forge).

The trainer (``pivotal.training.trainer``) only ever talks to a :class:`TrainingHost`. A host owns the
model: it says which modules can carry LoRA, encodes images and prompts (splicing the trainable
embeddings in), runs the UNet, and restores itself afterwards. Nothing in the core imports a host.

Tensor conventions:
* images: (B, 3, H, W) float in [-1, 1];
* latents: (B, C, H/8, W/8), already multiplied by the VAE scale factor;
* timesteps: (B,) long in [0, num_train_timesteps);
* conditioning: an opaque :class:`Conditioning` made by the host and handed back to it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from pivotal.adapters.network import Target
from pivotal.text.embeddings import EmbeddingSet


@dataclass
class SizeInfo:
    """SDXL's micro-conditioning per image: original size, crop top-left and target size (h, w)."""

    original: tuple[int, int]
    crop_top_left: tuple[int, int]
    target: tuple[int, int]


@dataclass
class Conditioning:
    """What the UNet is conditioned on. ``context``: (B, 77·k, D). SDXL adds ``extra``:
    ``{"text_embeds": (B, P), "time_ids": (B, 6)}`` (pooled clip_g output and size info)."""

    context: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingHost(Protocol):
    """What a host provides to the trainer."""

    #: "sd1" or "sdxl"
    base_model: str
    #: "epsilon" or "v_prediction"
    prediction_type: str
    device: torch.device
    #: the UNet's compute dtype (LoRA and embeddings stay fp32; autocast bridges the two)
    dtype: torch.dtype

    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) fp32 cumulative alphas of the training noise schedule (T = 1000 for SD)."""
        ...

    def encoder_keys(self) -> tuple[str, ...]:
        """("clip_l",) for SD1, ("clip_l", "clip_g") for SDXL."""
        ...

    def vocabulary(self, key: str) -> torch.Tensor:
        """(V, dim) token-embedding matrix of encoder ``key`` (read only; never modified)."""
        ...

    def tokenizer(self, key: str) -> Any:
        """The tokenizer of encoder ``key`` (HF-CLIPTokenizer-like)."""
        ...

    def lora_targets(self, part: str, preset: str) -> list[Target]:
        """(kohya key, module) for ``part`` in ("unet", "te") — "te" means every text encoder."""
        ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) of images (B, 3, H, W) in [-1, 1], no grad, scale factor applied."""
        ...

    def encode_prompts(self, prompts: Sequence[str], embeddings: EmbeddingSet,
                       sizes: Sequence[SizeInfo] | None = None) -> Conditioning:
        """Conditioning for ``prompts`` with ``embeddings`` spliced in by name (differentiable
        with respect to the embedding vectors and any attached text-encoder LoRA)."""
        ...

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output (noise or v, per ``prediction_type``), same shape as the latents."""
        ...

    def training_session(self, gradient_checkpointing: bool) -> contextlib.AbstractContextManager[None]:
        """Put the model in training shape (requires_grad off on the host's own weights,
        checkpointing, attention that supports backward...) and restore *everything* on exit,
        however the block ends."""
        ...

    def generate(self, prompt: str, negative: str, embeddings: EmbeddingSet, steps: int, seed: int,
                 width: int, height: int, guidance: float) -> Any:
        """A preview image (PIL) with the current LoRA (attached by the caller) and embeddings."""
        ...

    # Optional: ``text_encoding_is_deterministic() -> bool``. True when encoding the same prompt
    # twice gives the same result in training mode (no active dropout on the text side); the
    # trainer then reuses a caption's conditioning while nothing on the text side trains. A host
    # without it is never cached.
    #
    # Optional: ``text_encoding_key() -> Hashable``. The host's settings outside the run that change
    # what ``encode_prompts`` returns (the webui's clip skip, emphasis mode...); it is part of the
    # cache key, so a setting changed mid-run is encoded afresh instead of served stale.


def has_active_dropout(modules: Sequence[torch.nn.Module]) -> bool:
    """True when anything in ``modules`` drops out in training mode, so two encodings of the same
    prompt could differ: a dropout module with p > 0, an ``nn.MultiheadAttention`` with dropout
    (open_clip), or a transformers model whose config asks for dropout (HF CLIP applies its
    attention dropout functionally, with no module to find)."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
                return True
            if isinstance(m, torch.nn.MultiheadAttention) and m.dropout > 0:
                return True
            cfg = getattr(m, "config", None)
            for name in ("attention_dropout", "dropout", "hidden_dropout"):
                value = getattr(cfg, name, 0.0) if cfg is not None and not isinstance(cfg, dict) else 0.0
                if isinstance(value, (int, float)) and value > 0:
                    return True
    return False


@contextlib.contextmanager
def no_session(gradient_checkpointing: bool = False) -> Iterator[None]:
    """A training session that changes nothing (for hosts with nothing to set up)."""
    yield
