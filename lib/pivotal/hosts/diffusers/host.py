"""The standalone host: :class:`~pivotal.host_api.TrainingHost` over diffusers components.

A :class:`DiffusersHost` wraps a diffusers ``UNet2DConditionModel`` + ``AutoencoderKL``, the
transformers CLIP text encoder(s) and tokenizer(s), and the model's noise schedule. Prompts are
encoded as the webui (SD1, clip skip 1) and diffusers' SDXL pipeline encode them, with the
trainable embeddings spliced in by :mod:`pivotal.text.inject`.

Entry point: :func:`load_diffusers_folder` (the CLI and the app reach it, or a demo model, through
:func:`pivotal.demo.host.load_host`). diffusers is imported only when a model is built, so this
module imports anywhere (the webui environment has no diffusers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from pivotal.adapters.network import Target
from pivotal.adapters.te_names import text_encoder_lora_targets, token_embedding_of
from pivotal.adapters.unet_targets import unet_lora_targets
from pivotal.errors import ConfigError, ModelLayoutError
from pivotal.host_api import Conditioning, HostDefaults, SizeInfo, has_active_dropout, weights_fingerprint
from pivotal.hosts.diffusers.parts import DEFAULT_PAD_IDS, ENCODER_KEYS, PipelineParts
from pivotal.hosts.diffusers.sampling import SAMPLERS, denoise, make_scheduler, to_pil
from pivotal.hosts.module_state import capture, enable_checkpointing, uses_checkpoint_func
from pivotal.text.embeddings import EmbeddingSet
from pivotal.text.inject import PromptTokenizer, injected_embeddings
from pivotal.training.distributed import local_device

PREDICTION_TYPES = ("epsilon", "v_prediction")
INSTALL_HINT = "pip install 'diffusers>=0.27' 'transformers>=4.30.2' (or: pip install -e '.[standalone]')"


class DiffusersHost(HostDefaults):
    """A Stable Diffusion 1.x or SDXL model held as diffusers / transformers modules.

    ``sampler`` ("euler" or "ddim") is what :meth:`generate` uses. Attributes beyond the protocol:
    ``vae_scale_factor`` (image / latent size), ``scheduler_config``, ``unet``, ``vae``.
    """

    def __init__(self, parts: PipelineParts, label: str = "", sampler: str = "euler") -> None:
        base = parts.base_model
        if base not in ENCODER_KEYS:
            raise ConfigError(f"base model {base!r} is not one of {', '.join(ENCODER_KEYS)}")
        keys = ENCODER_KEYS[base]
        for what, have in (("text encoders", parts.text_encoders), ("tokenizers", parts.tokenizers)):
            if tuple(sorted(have)) != tuple(sorted(keys)):
                raise ModelLayoutError(f"{parts.source or 'model'}: {base} needs {what} for {', '.join(keys)}, "
                                       f"got {', '.join(have) or 'none'}")
        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)} (setting: sampler)")
        self.base_model: str = base
        self.unet: nn.Module = parts.unet
        self.vae: nn.Module = parts.vae
        self._encoders: dict[str, nn.Module] = {k: parts.text_encoders[k] for k in keys}
        self._tokenizers: dict[str, Any] = {k: parts.tokenizers[k] for k in keys}
        self._token_embeddings = {k: token_embedding_of(te) for k, te in self._encoders.items()}
        self.scheduler_config: dict[str, Any] = dict(parts.scheduler_config)
        self.prediction_type: str = str(self.scheduler_config.get("prediction_type", "epsilon"))
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"{parts.source or 'model'}: scheduler prediction_type {self.prediction_type!r} "
                              f"is not supported (supported: {', '.join(PREDICTION_TYPES)})")
        first = next(self.unet.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self._vae_dtype: torch.dtype = next(self.vae.parameters()).dtype
        vae_cfg = self.vae.config
        self.vae_scale_factor: int = 2 ** (len(vae_cfg.block_out_channels) - 1)
        self.latent_channels: int = int(vae_cfg.latent_channels)
        self.scaling_factor: float = float(vae_cfg.scaling_factor)
        sample = self.unet.config.sample_size
        self._default_resolution = int(sample if isinstance(sample, int) else sample[0]) * self.vae_scale_factor
        self.force_zeros_for_empty_prompt: bool = parts.force_zeros_for_empty_prompt
        self.label: str = label or parts.source or base
        self.sampler: str = sampler
        self._prompt_tokenizers: dict[tuple[str, tuple[tuple[str, int], ...]], PromptTokenizer] = {}
        self._alphas_cumprod: torch.Tensor | None = None
        self._check_layout(parts.source or "model")

    def _check_layout(self, source: str) -> None:
        cfg = self.unet.config
        if int(cfg.in_channels) != self.latent_channels:
            raise ModelLayoutError(f"{source}: the UNet takes {cfg.in_channels} input channels but the VAE makes "
                                   f"{self.latent_channels}-channel latents "
                                   "(inpainting/depth models are not supported)")
        width = sum(int(te.config.hidden_size) for te in self._encoders.values())
        if int(cfg.cross_attention_dim) != width:
            raise ModelLayoutError(f"{source}: the UNet attends to {cfg.cross_attention_dim}-wide context but the "
                                   f"text encoder(s) give {width}")
        if self.base_model == "sdxl":
            te2 = self._encoders["clip_g"]
            if cfg.addition_embed_type != "text_time" or not hasattr(te2, "text_projection"):
                raise ModelLayoutError(f"{source}: an SDXL model needs a UNet with addition_embed_type 'text_time' "
                                       "and a CLIPTextModelWithProjection as text_encoder_2")
            need = int(te2.config.projection_dim) + 6 * int(cfg.addition_time_embed_dim)
            if int(cfg.projection_class_embeddings_input_dim) != need:
                raise ModelLayoutError(f"{source}: the UNet's added conditioning takes "
                                       f"{cfg.projection_class_embeddings_input_dim} dims, text_encoder_2's "
                                       f"projection + 6 size ids give {need}")

    # -- the model's vocabulary ----------------------------------------------------------------
    def encoder_keys(self) -> tuple[str, ...]:
        return ENCODER_KEYS[self.base_model]

    def vocabulary(self, key: str) -> torch.Tensor:
        """(V, dim) token-embedding weight of encoder ``key``, detached (shares storage: do not write)."""
        return self._token_embedding(key).weight.detach()

    def tokenizer(self, key: str) -> Any:
        self._token_embedding(key)
        return self._tokenizers[key]

    def _token_embedding(self, key: str) -> nn.Embedding:
        if key not in self._token_embeddings:
            raise ModelLayoutError(f"encoder key {key!r}: this {self.base_model} model has "
                                   f"{', '.join(self.encoder_keys())}")
        return self._token_embeddings[key]

    def default_resolution(self) -> int:
        """The UNet config's sample size in pixels (512 for SD 1.5, 1024 for SDXL, 64 for the demo)."""
        return self._default_resolution

    def model_id(self) -> str:
        """A fingerprint of what makes the latents: the VAE encoder's weights (+ quant_conv) and
        dtype, and the scale factor; a folder whose VAE file was replaced gets a new id."""
        parts = [self.vae.encoder] + ([self.vae.quant_conv] if getattr(self.vae, "quant_conv", None) is not None
                                      else [])
        shift = getattr(self.vae.config, "shift_factor", None)
        return "diffusers-vae:" + weights_fingerprint(parts, self.scaling_factor, shift, str(self._vae_dtype))

    def text_encoding_is_deterministic(self) -> bool:
        """True when encoding a prompt twice gives the same result in training mode too (no
        dropout in the text encoders: SD's CLIP configs have none), so a trainer may reuse a
        caption's conditioning while nothing on the text side trains."""
        return not has_active_dropout(list(self._encoders.values()))

    def alphas_cumprod(self) -> torch.Tensor:
        """(T,) fp32 on the host's device, from the model's scheduler config (T = 1000 for SD)."""
        if self._alphas_cumprod is None:
            from diffusers import DDPMScheduler

            cfg = {k: v for k, v in self.scheduler_config.items() if not str(k).startswith("_")}
            self._alphas_cumprod = DDPMScheduler.from_config(cfg).alphas_cumprod.to(torch.float32)
        return self._alphas_cumprod.clone().to(self.device)

    # -- LoRA targets --------------------------------------------------------------------------
    def lora_targets(self, part: str, preset: str) -> list[Target]:
        """``part`` "unet", or "te" for every text encoder (SDXL: te1 then te2 keys)."""
        if part == "unet":
            return unet_lora_targets(self.unet, self.base_model, preset)
        if part == "te":
            if self.base_model == "sd1":
                return text_encoder_lora_targets(self._encoders["clip_l"], "te", preset)
            # SDXL reads clip_l's penultimate hidden state (see encode_prompts): its last layer
            # is never used. clip_g's last layer feeds the pooled embedding, so all of it is.
            clip_l = self._encoders["clip_l"]
            return (text_encoder_lora_targets(clip_l, "te1", preset, clip_l.config.num_hidden_layers - 1)
                    + text_encoder_lora_targets(self._encoders["clip_g"], "te2", preset))
        raise ConfigError(f"LoRA part {part!r} is not one of unet, te")

    # -- encoding ------------------------------------------------------------------------------
    def prompt_tokenizer(self, key: str, embeddings: EmbeddingSet) -> PromptTokenizer:
        """The :class:`PromptTokenizer` of encoder ``key`` for the names and vector counts of
        ``embeddings`` (cached; its ``warnings`` list name clashes with ordinary words)."""
        names = tuple((n, embeddings.num_vectors(n)) for n in embeddings.names())
        cache_key = (key, names)
        if cache_key not in self._prompt_tokenizers:
            tok = self.tokenizer(key)
            pad = getattr(tok, "pad_token_id", None)
            max_length = int(self._encoders[key].config.max_position_embeddings)
            self._prompt_tokenizers[cache_key] = PromptTokenizer(
                tok, dict(names), pad_id=DEFAULT_PAD_IDS[key] if pad is None else int(pad), max_length=max_length)
        return self._prompt_tokenizers[cache_key]

    def encode_prompts(self, prompts: Sequence[str], embeddings: EmbeddingSet,
                       sizes: Sequence[SizeInfo] | None = None) -> Conditioning:
        """Conditioning for ``prompts`` (prompts longer than 75 tokens are cut, as diffusers does).

        SD1: ``context`` = clip_l's last hidden state (B, 77, D_l), as the webui at clip skip 1.
        SDXL: ``context`` = penultimate hidden states of clip_l and clip_g concatenated
        (B, 77, D_l + D_g); ``extra["text_embeds"]`` = clip_g's projected pooled output (B, P);
        ``extra["time_ids"]`` (B, 6) fp32 from ``sizes`` (h, w order). Without ``sizes`` the time
        ids are left out and :meth:`predict` uses the latent size x ``vae_scale_factor``, no crop.
        Outputs are in the text encoders' dtype and differentiable w.r.t. the embedding vectors
        and any LoRA attached to the encoders.
        """
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("encode_prompts: no prompts given")
        if sizes is not None and len(sizes) != len(prompts):
            raise ConfigError(f"encode_prompts: {len(sizes)} sizes for {len(prompts)} prompts")
        have = embeddings.encoder_keys()
        if have and set(have) != set(self.encoder_keys()):
            raise ModelLayoutError(f"the embeddings cover encoders {', '.join(have)}; this {self.base_model} "
                                   f"model needs {', '.join(self.encoder_keys())}")
        states: list[torch.Tensor] = []
        extra: dict[str, torch.Tensor] = {}
        for key in self.encoder_keys():
            batch = self.prompt_tokenizer(key, embeddings).build_batch(prompts)
            ids = batch.ids.to(self.device)
            with injected_embeddings(self._token_embeddings[key], embeddings.vectors_for(key), batch.fixes):
                if self.base_model == "sd1":
                    states.append(self._encoders[key](input_ids=ids).last_hidden_state)
                    continue
                out = self._encoders[key](input_ids=ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            if key == "clip_g":
                extra["text_embeds"] = out.text_embeds
        if sizes is not None and self.base_model == "sdxl":
            rows = [[*s.original, *s.crop_top_left, *s.target] for s in sizes]
            extra["time_ids"] = torch.tensor(rows, dtype=torch.float32, device=self.device)
        return Conditioning(torch.cat(states, dim=-1), extra)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, H/f, W/f) fp32, scale factor applied, of images (B, 3, H, W) in [-1, 1]."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelLayoutError(f"encode_images: expected (B, 3, H, W) images, got {tuple(images.shape)}")
        f = self.vae_scale_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ConfigError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of {f}")
        dist = self.vae.encode(images.to(self.device, self._vae_dtype)).latent_dist
        # The mode, not a sample: cached latents must be deterministic, so that a resumed run sees
        # exactly the data the interrupted one saw.
        return (dist.mode() * self.scaling_factor).to(torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) fp32 of latents (scale factor applied), differentiable (the VAE's own
        weights stay frozen: a training session turned their requires_grad off)."""
        out = self.vae.decode((latents / self.scaling_factor).to(self.device, self._vae_dtype)).sample
        return out.float()

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output (B, C, h, w) as fp32; inputs are cast to the UNet's dtype."""
        x = noisy_latents.to(self.device, self.dtype)
        kwargs: dict[str, Any] = {}
        if self.base_model == "sdxl":
            if "text_embeds" not in cond.extra:
                raise ModelLayoutError("SDXL conditioning without 'text_embeds' (not made by encode_prompts?)")
            time_ids = cond.extra.get("time_ids")
            if time_ids is None:
                h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
                time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32, device=self.device)
                time_ids = time_ids.expand(cond.context.shape[0], 6)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.extra["text_embeds"].to(self.device, self.dtype),
                                           "time_ids": time_ids.to(self.device, self.dtype)}
        out = self.unet(x, timesteps.to(self.device), encoder_hidden_states=cond.context.to(self.device, self.dtype),
                        **kwargs).sample
        return out.float()

    # -- training ------------------------------------------------------------------------------
    def _modules(self) -> list[nn.Module]:
        return [self.unet, self.vae, *self._encoders.values()]

    @contextlib.contextmanager
    def training_session(self, gradient_checkpointing: bool) -> Iterator[None]:
        """Freeze every host weight, UNet and text encoders in train mode (VAE eval), optional
        gradient checkpointing; every flag is put back exactly on exit, however the block ends.

        Train mode because transformers checkpoints only in training mode; SD's configs have no
        active dropout, so outputs do not change. Text encoders are checkpointed only where
        transformers routes it through ``_gradient_checkpointing_func`` (>= 4.35), see
        :func:`~pivotal.hosts.module_state.uses_checkpoint_func`.
        """
        snapshot = capture(self._modules())
        try:
            for m in self._modules():
                m.requires_grad_(False)
            self.vae.eval()
            self.unet.train()
            for te in self._encoders.values():
                te.train()
            if gradient_checkpointing:
                enable_checkpointing(self.unet)
                for te in self._encoders.values():
                    if uses_checkpoint_func(te):
                        enable_checkpointing(te)
            yield
        finally:
            snapshot.restore()

    # -- previews ------------------------------------------------------------------------------
    def generate(self, prompt: str, negative: str, embeddings: EmbeddingSet, steps: int, seed: int,
                 width: int, height: int, guidance: float) -> Any:
        """A PIL image from ``steps`` steps of :attr:`sampler` with classifier-free guidance
        (none when ``guidance`` is 1). Same arguments, same image: the noise comes from a CPU
        generator seeded with ``seed``. Modules run in eval mode; their flags are restored after."""
        f = self.vae_scale_factor
        if steps < 1:
            raise ConfigError(f"steps must be >= 1, got {steps} (setting: steps)")
        for name, v in (("width", width), ("height", height)):
            if v < f or v % f:
                raise ConfigError(f"{name} {v} must be a positive multiple of {f} (setting: {name})")
        use_cfg = float(guidance) != 1.0
        prompts = [negative, prompt] if use_cfg else [prompt]
        snapshot = capture(self._modules())
        try:
            for m in self._modules():
                m.eval()
            with torch.no_grad():
                sizes = [SizeInfo((height, width), (0, 0), (height, width))] * len(prompts)
                cond = self.encode_prompts(prompts, embeddings, sizes if self.base_model == "sdxl" else None)
                if use_cfg and negative == "" and self.force_zeros_for_empty_prompt:
                    # As diffusers' SDXL pipeline: an empty negative prompt means zero conditioning.
                    cond.context[0].zero_()
                    cond.extra["text_embeds"][0].zero_()
                gen = torch.Generator().manual_seed(int(seed))
                noise = torch.randn((1, self.latent_channels, height // f, width // f), generator=gen)

                def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                    xin = torch.cat([x] * len(prompts))
                    out = self.predict(xin, t.reshape(1).expand(len(prompts)), cond)
                    if not use_cfg:
                        return out
                    uncond, text = out.chunk(2)
                    return uncond + float(guidance) * (text - uncond)

                latents = denoise(model_fn, make_scheduler(self.scheduler_config, self.sampler),
                                  noise.to(self.device), steps, gen)
                image = self.vae.decode((latents / self.scaling_factor).to(self._vae_dtype)).sample
            return to_pil(image[0])
        finally:
            snapshot.restore()


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def require_standalone_libraries() -> None:
    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"the standalone host needs {' and '.join(missing)}, not installed here; {INSTALL_HINT}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a torch.device; None means CUDA when available (in a process that torchrun /
    accelerate launch started, its local rank's GPU), else CPU."""
    if device is None:
        return torch.device(local_device() or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"device {device!r} is not a torch device (setting: --device)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available in this environment (setting: --device)")
    return dev


def load_diffusers_folder(path: str | os.PathLike, device: str | torch.device | None = None,
                          dtype: torch.dtype | None = None) -> DiffusersHost:
    """A host over a local diffusers pipeline folder (SDXL when it has ``text_encoder_2/``).

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere. ConfigError for a missing path or a
    single-file checkpoint; ModelLayoutError naming what the folder lacks.
    """
    from pivotal.hosts.diffusers.folder import check_pipeline_folder, load_pipeline_parts

    check_pipeline_folder(path)  # layout errors first, before the libraries are even needed
    require_standalone_libraries()
    dev = resolve_device(device)
    dt = dtype or (torch.float16 if dev.type == "cuda" else torch.float32)
    parts = load_pipeline_parts(path, dev, dt)
    return DiffusersHost(parts, label=f"{Path(path).name} ({parts.base_model}, diffusers folder)")
