"""The webui host: :class:`~pivotal.host_api.TrainingHost` over the model A1111 has loaded.

Nothing is copied or reloaded: the trainer works on ``shared.sd_model`` itself.

* UNet: ``sd_model.model.diffusion_model`` (ldm), called with discrete timesteps;
* text: the webui's own hijacked encoder (``sd_model.cond_stage_model``, a
  ``FrozenCLIPEmbedderWithCustomWords``), so captions are tokenized, chunked and weighted exactly as
  prompts are at generation time. Our embeddings take part as live webui ``Embedding`` objects whose
  ``vec`` *is* our trainable Parameter, registered in the webui's embedding database for the length
  of one encoder call and unregistered right after (the database is restored exactly), so the
  webui's own ``EmbeddingsWithFixes`` splices them in, differentiably;
* VAE: ``encode_first_stage`` + ``get_first_stage_encoding`` on the distribution's mode (cached
  latents must be deterministic for exact resume);
* schedule: ``alphas_cumprod_original`` (the webui rewrites ``alphas_cumprod`` per generation);
  prediction type from ``parameterization``.

SDXL: both hijacked encoders are called directly (the conditioner would run them under no_grad),
each live embedding carries ``{"clip_l", "clip_g"}`` halves, and the UNet gets ``y`` = pooled clip_g
+ size embeddings (:mod:`pivotal.hosts.a1111.sdxl`). Previews go through the webui's own txt2img
processing (:mod:`pivotal.hosts.a1111.preview`). SD2/SD3/SSD and inpainting models are refused.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from pivotal.adapters.network import Target
from pivotal.adapters.te_names import text_encoder_lora_targets
from pivotal.adapters.unet_targets import unet_lora_targets
from pivotal.errors import ConfigError, ModelLayoutError
from pivotal.host_api import Conditioning, HostDefaults, SizeInfo, has_active_dropout, weights_fingerprint
from pivotal.hosts.a1111 import session as a1111_session
from pivotal.hosts.a1111.sdxl import clip_g_text_model, encode_sdxl, openclip_tokenizer, sdxl_latents, text_embedders
from pivotal.hosts.a1111.webui import Webui, load_webui, optional_module
from pivotal.text.embeddings import EmbeddingSet

PARAMETERIZATIONS = {"eps": "epsilon", "v": "v_prediction"}
#: what our live embeddings are called in the webui's lists while they exist
LIVE_FILENAME = "pivotal (training, not saved yet)"
#: The webui options its prompt encoding reads at every call (clip skip, emphasis, chunk padding).
TEXT_OPTIONS = ("CLIP_stop_at_last_layers", "emphasis", "use_old_emphasis_implementation",
                "comma_padding_backtrack", "sdxl_clip_l_skip")
DEFAULT_PREVIEW_SAMPLER = "Euler a"
#: the webui (>= 1.9) picks the scheduler per sampler when told "Automatic"
DEFAULT_PREVIEW_SCHEDULER = "Automatic"


def detect_base(sd_model: Any) -> str:
    """"sd1" or "sdxl" from the webui's type flags; ModelLayoutError for the kinds not supported."""
    for flag, kind in (("is_sd2", "SD2"), ("is_sd3", "SD3"), ("is_ssd", "SSD-1B"),
                       ("is_sdxl_inpaint", "SDXL inpainting")):
        if getattr(sd_model, flag, False):
            raise ModelLayoutError(f"the loaded checkpoint is {kind}; Pivotal's webui host supports SD1 and SDXL "
                                   "checkpoints (load one in the webui)")
    if getattr(sd_model, "lowvram", False):
        # lowvram/medvram hooks move whole modules between devices per forward, which backward does not expect
        raise ModelLayoutError("the webui runs with --lowvram/--medvram; training needs the model on the device "
                               "(restart the webui without those flags)")
    if not hasattr(getattr(sd_model, "model", None), "diffusion_model"):
        raise ModelLayoutError(f"{type(sd_model).__name__}: no model.diffusion_model UNet (not an A1111/ldm model; "
                               "Forge-style backends are not supported by this host)")
    wrapper = sd_model.model
    if (getattr(wrapper, "conditioning_key", "crossattn") != "crossattn"
            or int(getattr(wrapper.diffusion_model, "in_channels", 4)) != 4):
        raise ModelLayoutError("the loaded checkpoint is an inpainting/depth/edit model; train on a plain checkpoint")
    return "sdxl" if getattr(sd_model, "is_sdxl", False) else "sd1"


def plain_token_embedding(module: nn.Module) -> nn.Embedding:
    """The vocabulary ``nn.Embedding`` behind the webui's ``EmbeddingsWithFixes`` wrapper (or the
    module itself when it is not wrapped)."""
    inner = getattr(module, "wrapped", module)
    if not isinstance(inner, nn.Embedding):
        raise ModelLayoutError(f"{type(module).__name__}: expected the token nn.Embedding "
                               "(or the webui's wrapper of one)")
    return inner


@contextlib.contextmanager
def unwrapped_token_embedding(text_model: nn.Module) -> Iterator[None]:
    """Within the block, the text model's ``token_embedding`` (HF: under ``embeddings``; open_clip:
    on the model) is the plain ``nn.Embedding`` again instead of the webui's wrapper:
    :mod:`pivotal.adapters.te_names` recognises a CLIP text transformer by that ``nn.Embedding``. Only
    structure is read meanwhile; the wrapper is put back on exit."""
    if hasattr(text_model, "text_model"):
        embeddings = text_model.text_model.embeddings
    else:
        embeddings = getattr(text_model, "embeddings", text_model)
    wrapper = embeddings.token_embedding
    embeddings.token_embedding = plain_token_embedding(wrapper)
    try:
        yield
    finally:
        embeddings.token_embedding = wrapper


class A1111Host(HostDefaults):
    """The model the webui has loaded, as a training host (see the module docstring).

    ``webui``: the webui's modules (default: imported from the running webui).
    ``preview_sampler`` / ``preview_scheduler`` / ``preview_cfg``: what previews use (cfg None: the
    trainer's guidance); ``sampler`` is ``preview_sampler``. Attributes beyond the protocol:
    ``sd_model``, ``unet``, ``last_session`` (what the last session did).
    """

    def __init__(self, webui: Optional[Webui] = None, preview_sampler: str = DEFAULT_PREVIEW_SAMPLER,
                 preview_cfg: Optional[float] = None, preview_scheduler: str = DEFAULT_PREVIEW_SCHEDULER) -> None:
        self.webui = webui if webui is not None else load_webui()
        self.sd_model: Any = self.webui.sd_model
        self.base_model: str = detect_base(self.sd_model)
        self.unet: nn.Module = self.sd_model.model.diffusion_model
        param = str(getattr(self.sd_model, "parameterization", "eps"))
        if param not in PARAMETERIZATIONS:
            raise ModelLayoutError(f"the loaded checkpoint's parameterization {param!r} is not supported "
                                   f"(supported: {', '.join(PARAMETERIZATIONS)})")
        self.prediction_type: str = PARAMETERIZATIONS[param]
        first = next(self.unet.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        forge_unet = getattr(getattr(self.sd_model, "forge_objects", None), "unet", None)
        if forge_unet is not None:
            # reForge: the UNet may sit offloaded between generations (its session loads it onto
            # the load device) and may be stored in a dtype it only computes in after a cast
            self.device = torch.device(getattr(forge_unet, "load_device", self.device))
            self.dtype = getattr(forge_unet.model, "manual_cast_dtype", None) or self.dtype
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        self.label: str = str(getattr(info, "name_for_extra", "") or getattr(info, "title", "") or "webui model")
        self.preview_sampler = preview_sampler
        self.sampler: str = preview_sampler
        self.preview_cfg = preview_cfg
        self.preview_scheduler = preview_scheduler
        self.last_session: dict[str, Any] = {}

    # -- text encoder -----------------------------------------------------------------------------
    @property
    def cond_model(self) -> nn.Module:
        """The webui's hijacked text encoder (SD1: FrozenCLIPEmbedderWithCustomWords; SDXL: the
        conditioner, whose embedders are the hijacked encoders)."""
        return self.sd_model.cond_stage_model

    def _embedder(self, key: str) -> nn.Module:
        """The hijacked wrapper of encoder ``key``."""
        self._check_key(key)
        return text_embedders(self.sd_model)[key] if self.base_model == "sdxl" else self.cond_model

    def _hf_text_model(self) -> nn.Module:
        emb = self._embedder("clip_l")
        transformer = getattr(getattr(emb, "wrapped", None), "transformer", None)
        if not isinstance(transformer, nn.Module):
            raise ModelLayoutError(f"{type(emb).__name__}: no wrapped.transformer (HF CLIP) found")
        return transformer

    def encoder_keys(self) -> tuple[str, ...]:
        return ("clip_l", "clip_g") if self.base_model == "sdxl" else ("clip_l",)

    def _check_key(self, key: str) -> None:
        if key not in self.encoder_keys():
            raise ModelLayoutError(f"encoder key {key!r}: this {self.base_model} model has "
                                   f"{', '.join(self.encoder_keys())}")

    def vocabulary(self, key: str) -> torch.Tensor:
        """(V, dim) token-embedding weight, detached (shares storage: never written)."""
        self._check_key(key)
        text_model = clip_g_text_model(self._embedder("clip_g")) if key == "clip_g" else self._hf_text_model()
        if hasattr(text_model, "text_model"):
            emb = text_model.text_model.embeddings
        else:
            emb = getattr(text_model, "embeddings", text_model)  # open_clip: token_embedding on the model
        return plain_token_embedding(emb.token_embedding).weight.detach()

    def tokenizer(self, key: str) -> Any:
        """clip_l: the HF CLIPTokenizer; clip_g: open_clip's tokenizer (same ids, no specials)."""
        if key == "clip_g":
            self._check_key(key)
            return openclip_tokenizer()
        return self._embedder(key).wrapped.tokenizer

    def alphas_cumprod(self) -> torch.Tensor:
        """(1000,) fp32: ``alphas_cumprod_original`` (what the checkpoint was trained with)."""
        ac = getattr(self.sd_model, "alphas_cumprod_original", None)
        if ac is None:
            ac = self.sd_model.alphas_cumprod
        return ac.detach().to(self.device, torch.float32).clone()

    # -- LoRA targets ---------------------------------------------------------------------------------
    def lora_targets(self, part: str, preset: str) -> list[Target]:
        if part == "unet":
            return unet_lora_targets(self.unet, self.base_model, preset)
        if part == "te":
            text_model = self._hf_text_model()
            with unwrapped_token_embedding(text_model):
                first = text_encoder_lora_targets(text_model, "te" if self.base_model == "sd1" else "te1", preset,
                                                  self.clip_l_layers_used())
            if self.base_model == "sd1":
                return first
            clip_g = clip_g_text_model(self._embedder("clip_g"))  # open_clip (A1111) or HF (reForge)
            with unwrapped_token_embedding(clip_g):
                return first + text_encoder_lora_targets(clip_g, "te2", preset)
        raise ConfigError(f"LoRA part {part!r} is not one of unet, te")

    def clip_l_layers_used(self) -> int:
        """How many of clip_l's layers feed the conditioning, as the webui encodes now: all of them;
        fewer with a clip skip (``CLIP_stop_at_last_layers`` s reads ``hidden_states[-s]``, i.e.
        after n + 1 - s layers); SDXL reads the layer its config names (``layer_idx``, 11 of 12)
        unless the "clip skip for SDXL clip_l" option applies the clip skip instead."""
        text_model = self._hf_text_model()
        n = int(text_model.config.num_hidden_layers)
        opts = getattr(self.webui.shared, "opts", None)
        skip = int(getattr(opts, "CLIP_stop_at_last_layers", 1) or 1)
        by_skip = min(n, max(1, n + 1 - skip))
        if self.base_model == "sd1" or getattr(opts, "sdxl_clip_l_skip", False) is True:
            return by_skip
        wrapped = self._embedder("clip_l").wrapped
        if getattr(wrapped, "layer", "last") != "hidden":
            return n
        index = int(getattr(wrapped, "layer_idx", n))
        return min(n, max(1, index if index >= 0 else n + 1 + index))

    # -- encoding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, H/8, W/8) fp32 with the scale factor, from the distribution's mode."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelLayoutError(f"encode_images: expected (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.shape[-2] % 8 or images.shape[-1] % 8:
            raise ConfigError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of 8")
        vae_dtype = getattr(self.webui.devices, "dtype_vae", torch.float32)
        if getattr(self.sd_model, "forge_objects", None) is not None:
            # reForge: encode_first_stage returns finished latents (the VAE's mode, scale applied;
            # get_first_stage_encoding is the identity), made under inference_mode: cloned into a
            # normal tensor
            out = self.sd_model.encode_first_stage(images.to(self.device, vae_dtype))
            return out.clone().to(torch.float32)
        if self.base_model == "sdxl":
            return sdxl_latents(self.sd_model, images.to(self.device, vae_dtype)).to(torch.float32)
        dist = self.sd_model.encode_first_stage(images.to(self.device, vae_dtype))
        z = dist.mode() if hasattr(dist, "mode") else dist
        return self.sd_model.get_first_stage_encoding(z).to(torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) fp32 in about [-1, 1] of latents (B, 4, h, w) (scale factor applied),
        differentiable: the VAE's own ``decode``, not the model's ``decode_first_stage``, which ldm
        and sgm both run under ``no_grad``. The webui's low/medium-VRAM mode wraps that same
        ``decode`` to move the VAE in, so it works there too. reForge's ``decode_first_stage`` runs
        its VAE patcher under inference mode: there the patcher's VAE module decodes, after the
        model's latent format undoes the scale (what that patcher does, with the gradient on)."""
        forge_objects = getattr(self.sd_model, "forge_objects", None)
        if forge_objects is not None:
            return self._decode_reforge(forge_objects, latents)
        fsm = getattr(self.sd_model, "first_stage_model", None)
        scale = float(getattr(self.sd_model, "scale_factor", 0.0))
        if not callable(getattr(fsm, "decode", None)) or scale <= 0:
            return super().decode_latents(latents)
        vae_dtype = getattr(self.webui.devices, "dtype_vae", torch.float32)
        return fsm.decode((latents / scale).to(self.device, vae_dtype)).float()

    def _decode_reforge(self, forge_objects: Any, latents: torch.Tensor) -> torch.Tensor:
        vae = getattr(forge_objects, "vae", None)
        fsm = getattr(vae, "first_stage_model", None)
        latent_format = getattr(getattr(getattr(forge_objects.unet, "model", None), "model_config", None),
                                "latent_format", None)
        if not callable(getattr(fsm, "decode", None)) or latent_format is None:
            return super().decode_latents(latents)
        management = optional_module("ldm_patched.modules.model_management")
        if management is not None:  # the VAE on its device (low VRAM moves it out between uses)
            management.load_models_gpu([vae.patcher])
        z = latent_format.process_out(latents).to(vae.device, vae.vae_dtype)
        return fsm.decode(z).float()

    def model_id(self) -> str | None:
        """A fingerprint of the VAE the webui has loaded now (encoder + quant_conv weights, their
        dtype, the VAE dtype setting and the scale factor): it changes with the checkpoint and with
        Settings › VAE, which swaps the weights in place. None when the model has no LDM-style VAE."""
        fsm = getattr(self.sd_model, "first_stage_model", None)
        encoder, quant = getattr(fsm, "encoder", None), getattr(fsm, "quant_conv", None)
        if not isinstance(encoder, nn.Module) or not isinstance(quant, nn.Module):
            return None
        vae_dtype = getattr(self.webui.devices, "dtype_vae", torch.float32)
        scale = float(getattr(self.sd_model, "scale_factor", 0.0))
        return "a1111-vae:" + weights_fingerprint([encoder, quant], scale, str(vae_dtype))

    def live_embeddings(self, embeddings: EmbeddingSet) -> contextlib.AbstractContextManager[None]:
        """Within the block, ``embeddings`` are registered in the webui's database as live
        ``Embedding`` objects (vec = our Parameter); the database is exactly as before afterwards."""
        return _registered(self, embeddings)

    def encode_prompts(self, prompts: Sequence[str], embeddings: EmbeddingSet,
                       sizes: Sequence[SizeInfo] | None = None) -> Conditioning:
        """(B, 77·k, D) through the webui's encoder: emphasis, chunking and clip skip as at
        generation time; differentiable w.r.t. the embedding vectors and any TE LoRA."""
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("encode_prompts: no prompts given")
        with self.live_embeddings(embeddings):
            if self.base_model == "sd1":
                return Conditioning(self.cond_model(prompts))
            context, y = encode_sdxl(self.sd_model, prompts, sizes, self.device, self.dtype)
        return Conditioning(context, {"y": y})

    def text_encoding_key(self) -> tuple:
        """The webui options that change what :meth:`encode_prompts` returns, as they are now (a user
        may change them mid-run: the trainer's conditioning cache keys on this)."""
        opts = getattr(self.webui.shared, "opts", None)
        return tuple(getattr(opts, name, None) for name in TEXT_OPTIONS)

    def text_encoding_is_deterministic(self) -> bool:
        """No dropout anywhere in the webui's text side (SD's CLIP and OpenCLIP have none), so the
        trainer may reuse a caption's conditioning while nothing on the text side trains."""
        return not has_active_dropout([self.cond_model])

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output as fp32 (inputs cast to the UNet's dtype); SDXL also gets ``y``."""
        kwargs: dict[str, Any] = {"context": cond.context.to(self.device, self.dtype)}
        if self.base_model == "sdxl":
            if "y" not in cond.extra:
                raise ModelLayoutError("SDXL conditioning without 'y' (not made by this host's encode_prompts?)")
            kwargs["y"] = cond.extra["y"].to(self.device, self.dtype)
        return self.unet(noisy_latents.to(self.device, self.dtype), timesteps.to(self.device), **kwargs).float()

    # -- session and previews -------------------------------------------------------------------------
    @contextlib.contextmanager
    def training_session(self, gradient_checkpointing: bool) -> Iterator[None]:
        """See :func:`pivotal.hosts.a1111.session.training_session`; restores everything on exit."""
        parts = {"unet": self.unet, "cond": self.cond_model,
                 "vae": getattr(self.sd_model, "first_stage_model", self.unet)}
        with a1111_session.training_session(self.webui, self.sd_model, self.unet, gradient_checkpointing,
                                            parts) as info:
            self.last_session = dict(info)
            yield

    def generate(self, prompt: str, negative: str, embeddings: EmbeddingSet, steps: int, seed: int,
                 width: int, height: int, guidance: float) -> Any:
        """A preview through the webui's txt2img with the attached LoRA and live embeddings."""
        from pivotal.hosts.a1111.preview import generate_preview

        return generate_preview(self, prompt, negative, embeddings, steps, seed, width, height,
                                self.generation_guidance(guidance))

    def generation_guidance(self, guidance: float) -> float:
        """``preview_cfg`` when it is set (previews and class images are drawn at it), else ``guidance``."""
        return float(self.preview_cfg if self.preview_cfg is not None else guidance)


@contextlib.contextmanager
def _registered(host: A1111Host, embeddings: EmbeddingSet) -> Iterator[None]:
    webui = host.webui
    with a1111_session.restored_embedding_db(webui):
        if len(embeddings):
            make = webui.textual_inversion.Embedding
            db = webui.embedding_db
            for name in embeddings.names():
                vectors = {k: embeddings.vectors_for(k)[name] for k in host.encoder_keys()}
                vec: Any = vectors["clip_l"] if host.base_model == "sd1" else vectors
                live = make(vec, name, step=None)
                live.vectors = embeddings.num_vectors(name)
                live.shape = sum(int(v.shape[-1]) for v in vectors.values())
                live.filename = LIVE_FILENAME
                db.register_embedding_by_name(live, host.sd_model, name)
        yield
