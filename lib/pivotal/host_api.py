"""The seam between the trainer and a host (standalone diffusers, the A1111 webui, later Forge).

The trainer (``pivotal.training.trainer``) only ever talks to a :class:`TrainingHost`. A host owns the
model: it says which modules can carry LoRA, encodes images and prompts (splicing the trainable
embeddings in), runs the UNet, and restores itself afterwards. Nothing in the core imports a host.

Tensor conventions:
* images: (B, 3, H, W) float in [-1, 1];
* latents: (B, C, H/8, W/8) fp32 on the host's ``device``, already multiplied by the VAE scale
  factor (the trainer keeps them there: only a cached batch is copied in, once per step);
* timesteps: (B,) long in [0, num_train_timesteps);
* conditioning: an opaque :class:`Conditioning` made by the host and handed back to it.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Protocol, Sequence

import torch

from pivotal.adapters.network import Target
from pivotal.errors import ConfigError
from pivotal.text.embeddings import EmbeddingSet


@dataclass
class SizeInfo:
    """SDXL's micro-conditioning per image: original size, crop top-left and target size (h, w)."""

    original: tuple[int, int]
    crop_top_left: tuple[int, int]
    target: tuple[int, int]


@dataclass
class Conditioning:
    """What the UNet is conditioned on: made by a host's ``encode_prompts``, read only by its own
    ``predict``. ``context``: (B, 77·k, D). ``extra``: the host's other conditioning tensors, each
    with the batch as its first dimension (the trainer concatenates cached rows along it). Per host,
    for SDXL (SD1 has none): the diffusers host ``{"text_embeds": (B, P), "time_ids": (B, 6)}``
    (clip_g's pooled projection and the size ids, as diffusers' UNet takes them); the A1111 host
    ``{"y": (B, P + 6·256)}`` (the same two, already embedded and joined, as the webui's LDM UNet
    takes them: 2816 wide for SDXL base)."""

    context: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


class TrainingHost(Protocol):
    """What a host provides to the trainer (and to :func:`pivotal.inference.generate.generate_image`).

    To write a host: subclass :class:`HostDefaults` (it supplies the optional members below with
    their documented defaults; override what the host knows), implement the rest, and add the class
    to ``tests/host_protocol_check.py`` (CI's mypy then checks it against this Protocol). Nothing
    probes a host with ``getattr``: a member missing here is a type error, not a silent fallback.
    """

    #: "sd1" or "sdxl"
    base_model: str
    #: "epsilon" or "v_prediction"
    prediction_type: str
    device: torch.device
    #: the UNet's compute dtype (LoRA and embeddings stay fp32; autocast bridges the two)
    dtype: torch.dtype
    #: what UIs show for the model, the train-start message, and the bundle's ``ss_sd_model_name``
    label: str

    # -- optional (HostDefaults gives the default named in each docstring) -------------------
    #: the sampler :meth:`generate` uses, as infotext names it; default "" (not known)
    sampler: str

    def model_id(self) -> str | None:
        """A string that changes whenever :meth:`encode_images` would give other latents (other VAE
        weights, scale factor or dtype) and is the same across processes for the same model: the
        latent cache keys on it, on disk too. Default None: the host cannot say, so latents are
        cached for the current run only and never shared through the disk cache."""
        ...

    def default_resolution(self) -> int:
        """The image side (pixels) the model was trained at; generation uses it when no size is
        given. Default: 512 for sd1, 1024 for sdxl."""
        ...

    def text_encoding_is_deterministic(self) -> bool:
        """True when encoding the same prompt twice gives the same result in training mode (no active
        dropout on the text side); the trainer then reuses a caption's conditioning while nothing on
        the text side trains. Default False: never cached."""
        ...

    def text_encoding_key(self) -> Hashable:
        """The host's settings outside the run that change what :meth:`encode_prompts` returns (the
        webui's clip skip, emphasis mode...), as they are now; part of the conditioning cache key,
        so a setting changed mid-run is encoded afresh instead of served stale. Default None."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) fp32 in about [-1, 1] of latents (B, C, h, w) (scale factor applied,
        as :meth:`encode_images` gives them), **differentiable** with respect to the latents: the
        reward fine-tuning mode ("textcraftor") backpropagates a reward on the pictures through it.
        Default: ConfigError, this host cannot (the mode then refuses to start)."""
        ...

    def generation_guidance(self, guidance: float) -> float:
        """The CFG scale :meth:`generate` draws at when asked for ``guidance``: a webui host's own
        setting for its previews (``preview_cfg``) replaces it. Default: ``guidance``. What keys
        generated class images must name the scale they were really drawn at."""
        ...

    # -- required -----------------------------------------------------------------------------
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
        """Latents (B, C, h, w) on :attr:`device` of images (B, 3, H, W) in [-1, 1] (on any device),
        no grad, scale factor applied."""
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
        """An image (PIL) of ``prompt`` with the current LoRA (attached by the caller) and
        ``embeddings``: a training preview, and before training prior preservation's class images
        (no LoRA attached, an empty embedding set; :mod:`pivotal.training.prior`), so it must work
        outside :meth:`training_session` too, and leave the host as it found it. A picture of one
        colour means "could not draw" (a webui interrupted or still loading a checkpoint)."""
        ...


#: The image side each base model was trained at (:meth:`TrainingHost.default_resolution`).
DEFAULT_RESOLUTIONS = {"sd1": 512, "sdxl": 1024}


class HostDefaults:
    """The optional members of :class:`TrainingHost` with their defaults; a host subclasses this and
    overrides what it knows. The defaults are the safe answers: no stable model id (latents not
    shared across runs), text never cached."""

    base_model: str
    sampler: str = ""

    def model_id(self) -> str | None:
        return None

    def default_resolution(self) -> int:
        return DEFAULT_RESOLUTIONS.get(self.base_model, 512)

    def text_encoding_is_deterministic(self) -> bool:
        return False

    def text_encoding_key(self) -> Hashable:
        return None

    def generation_guidance(self, guidance: float) -> float:
        return float(guidance)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        raise ConfigError(f"{getattr(self, 'label', type(self).__name__)}: this host cannot decode latents "
                        "differentiably, which the textcraftor mode needs (setting: mode); use mode pivotal, "
                        "or the standalone host (pivotal train --model ...)")


def weights_fingerprint(modules: Sequence[torch.nn.Module], *extra: object) -> str:
    """Hex SHA-256 of the modules' parameters and buffers (names, dtypes, shapes, bytes) and of
    ``extra`` (e.g. the latent scale factor): a :meth:`TrainingHost.model_id` that changes with the
    weights themselves, whatever file or setting they came from. Reads every tensor once (a VAE
    encoder: ~70 MB in fp16, well under a second)."""
    h = hashlib.sha256(repr(extra).encode("utf-8"))
    for i, module in enumerate(modules):
        for name, t in (*module.named_parameters(), *module.named_buffers()):
            h.update(f"{i}.{name}:{t.dtype}:{tuple(t.shape)}".encode("utf-8"))
            # the raw bytes (numpy has no bfloat16, so never through a float view)
            h.update(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
