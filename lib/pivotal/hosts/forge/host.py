"""The Forge host: :class:`~pivotal.host_api.TrainingHost` over the model Forge has loaded.

Nothing is copied or reloaded: the trainer works on ``shared.sd_model.forge_objects`` itself
(Forge's ``ForgeDiffusionEngine``; facts in ``docs`` and the labs' probes):

* UNet: ``forge_objects.unet.model.diffusion_model`` (LDM names), called with discrete timesteps
  like the A1111 host's; schedule and prediction type from ``unet.model.predictor``;
* text: each text-processing engine (SD1 ``text_processing_engine``; SDXL ``_l`` / ``_g``) tokenizes,
  chunks and weights captions exactly as prompts are at generation time; our embeddings take part
  as live Forge ``Embedding`` objects whose ``vec`` *is* our Parameter, registered in the engines'
  databases for the length of one call (the databases are restored exactly);
* VAE: the posterior's mean (Forge's own encode samples, drawing from the global RNG); decoding
  with the gradient on (the textcraftor mode) through the VAE module, not its patcher;
* every weight is an inference tensor (Forge makes them under ``torch.inference_mode``): the
  training forwards run inside :class:`~pivotal.hosts.forge.frozen_weights.InferenceWeightsMode`,
  which passes gradients through them without copying.

Weights stored as bnb nf4/fp4 or GGUF are refused (their layers do not compute through
``F.linear`` and have no Linear shape to attach to); float8 storage trains (each layer's
weight is cast per call, as Forge does when generating). SD2/SD3/Flux, refiners and
inpainting models are refused. The session (:mod:`pivotal.hosts.forge.session`) puts everything
back afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from pivotal.adapters.network import Target
from pivotal.adapters.te_names import text_encoder_lora_targets
from pivotal.adapters.unet_targets import unet_lora_targets
from pivotal.errors import ConfigError, ModelLayoutError
from pivotal.host_api import Conditioning, HostDefaults, SizeInfo, has_active_dropout, weights_fingerprint
from pivotal.hosts.a1111.host import (
    DEFAULT_PREVIEW_SAMPLER,
    DEFAULT_PREVIEW_SCHEDULER,
    LIVE_FILENAME,
    plain_token_embedding,
    unwrapped_token_embedding,
)
from pivotal.hosts.forge import session as forge_session
from pivotal.hosts.forge.frozen_weights import InferenceWeightsMode
from pivotal.hosts.forge.webui import ForgeWebui, load_forge_webui, load_model_now
from pivotal.text.embeddings import EmbeddingSet

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
#: UNet storage that cannot be trained over (Forge's "Diffusion in Low Bits" / the checkpoint's format)
UNTRAINABLE_STORAGE = ("nf4", "fp4", "gguf")
#: Forge's option of the text-encoding settings it reads at every call
TEXT_OPTIONS = ("CLIP_stop_at_last_layers", "emphasis")
#: the SDXL size values, in the order Forge's get_learned_conditioning embeds them
SDXL_SIZE_ORDER = ("original", "crop_top_left", "target")


def detect_forge_base(sd_model: Any) -> str:
    """"sd1" or "sdxl"; ModelLayoutError naming what the loaded model is otherwise."""
    kind = type(sd_model).__name__
    if getattr(sd_model, "is_sdxl", False):
        if getattr(sd_model, "text_processing_engine_l", None) is None:
            raise ModelLayoutError(f"the loaded checkpoint is an SDXL refiner ({kind}); Pivotal trains on SD1 and "
                                   "SDXL base checkpoints (load one in Forge)")
        base = "sdxl"
    elif getattr(sd_model, "is_sd1", False):
        base = "sd1"
    else:
        raise ModelLayoutError(f"the loaded checkpoint is a {kind} model; Pivotal's Forge host trains on SD1 and "
                               "SDXL checkpoints (load one in Forge)")
    unet = sd_model.forge_objects.unet.model.diffusion_model
    if getattr(sd_model, "is_inpaint", False) or int(getattr(unet, "in_channels", 4)) != 4:
        raise ModelLayoutError("the loaded checkpoint is an inpainting model; train on a plain checkpoint")
    return base


def check_storage(kmodel: Any) -> None:
    """Refuse UNet weights stored in a format training cannot pass a gradient through."""
    storage = getattr(kmodel, "storage_dtype", None)
    if isinstance(storage, str) and storage in UNTRAINABLE_STORAGE:
        raise ModelLayoutError(f"the UNet's weights are stored as {storage} (Forge's 'Diffusion in Low Bits' setting, "
                               "forge_unet_storage_dtype, or a quantized checkpoint): Pivotal cannot train over them; "
                               "choose 'Automatic' or a float8 setting there, or load an fp16/fp32 checkpoint")


class ForgeHost(HostDefaults):
    """The model Forge has loaded, as a training host (see the module docstring). Attributes
    beyond the protocol as on the A1111 host: ``label``, ``sd_model``, ``unet``, ``last_session``;
    ``model_id()`` fingerprints the VAE, ``default_resolution()`` comes from the base model."""

    def __init__(self, webui: Optional[ForgeWebui] = None, preview_sampler: str = DEFAULT_PREVIEW_SAMPLER,
                 preview_cfg: Optional[float] = None, preview_scheduler: str = DEFAULT_PREVIEW_SCHEDULER) -> None:
        self.webui = webui if webui is not None else load_forge_webui()
        self.sd_model: Any = load_model_now(self.webui)
        self.base_model: str = detect_forge_base(self.sd_model)
        unet_patcher = self.sd_model.forge_objects_original.unet
        self.kmodel: nn.Module = unet_patcher.model
        check_storage(self.kmodel)
        self.unet: nn.Module = self.kmodel.diffusion_model
        predictor = self.kmodel.predictor
        prediction = str(getattr(predictor, "prediction_type", "epsilon"))
        if prediction not in PREDICTION_TYPES:
            raise ModelLayoutError(f"the loaded checkpoint predicts {prediction!r}; Pivotal trains "
                                   f"{' and '.join(PREDICTION_TYPES)} models")
        self.prediction_type: str = prediction
        self.device: torch.device = torch.device(unet_patcher.load_device)
        self.dtype: torch.dtype = self.kmodel.computation_dtype
        engines = self.webui.engines(self.sd_model)
        if self.base_model == "sd1":
            self.engines: dict[str, Any] = {"clip_l": engines["text_processing_engine"]}
        else:
            self.engines = {"clip_l": engines["text_processing_engine_l"],
                            "clip_g": engines["text_processing_engine_g"]}
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        self.label: str = str(getattr(info, "name_for_extra", "") or getattr(info, "title", "") or "webui model")
        self.preview_sampler = preview_sampler
        self.sampler: str = preview_sampler
        self.preview_cfg = preview_cfg
        self.preview_scheduler = preview_scheduler
        self.last_session: dict[str, Any] = {}
        self._warned_preview = False

    # -- text encoders ----------------------------------------------------------------------------------
    def encoder_keys(self) -> tuple[str, ...]:
        return tuple(self.engines)

    def _engine(self, key: str) -> Any:
        if key not in self.engines:
            raise ModelLayoutError(f"encoder key {key!r}: this {self.base_model} model has {', '.join(self.engines)}")
        return self.engines[key]

    def text_model(self, key: str) -> nn.Module:
        """The HF CLIP text model engine ``key`` encodes with."""
        return self._engine(key).text_encoder.transformer

    def vocabulary(self, key: str) -> torch.Tensor:
        """(V, dim) token-embedding weight, detached (never written)."""
        embeddings = self.text_model(key).text_model.embeddings
        return plain_token_embedding(embeddings.token_embedding).weight.detach()

    def tokenizer(self, key: str) -> Any:
        """The engine's HF CLIPTokenizer."""
        return self._engine(key).tokenizer

    def alphas_cumprod(self) -> torch.Tensor:
        """(1000,) fp32 of the checkpoint's training schedule (the predictor's)."""
        return self.kmodel.predictor.alphas_cumprod.detach().to(self.device, torch.float32).clone()

    def layers_used(self, key: str) -> int:
        """How many of encoder ``key``'s layers feed what Forge reads: it takes
        ``hidden_states[-max(clip skip, minimum)]`` (SD1 minimum 1, SDXL 2); clip_g's pooled output
        also reads the last layer."""
        engine = self._engine(key)
        n = int(self.text_model(key).config.num_hidden_layers)
        if getattr(engine, "return_pooled", False):
            return n
        skip = max(int(getattr(self.webui.shared.opts, "CLIP_stop_at_last_layers", 1) or 1),
                   int(getattr(engine, "minimal_clip_skip", 1)))
        return min(n, max(1, n + 1 - skip))

    # -- LoRA targets --------------------------------------------------------------------------------
    def lora_targets(self, part: str, preset: str) -> list[Target]:
        if part == "unet":
            return unet_lora_targets(self.unet, self.base_model, preset)
        if part == "te":
            parts = {"clip_l": "te"} if self.base_model == "sd1" else {"clip_l": "te1", "clip_g": "te2"}
            found: list[Target] = []
            for key, kohya_part in parts.items():
                model = self.text_model(key)
                with unwrapped_token_embedding(model):
                    found += text_encoder_lora_targets(model, kohya_part, preset, self.layers_used(key))
            return found
        raise ConfigError(f"LoRA part {part!r} is not one of unet, te")

    # -- encoding -----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (B, 4, H/8, W/8) fp32, scaled: the VAE posterior's mean."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelLayoutError(f"encode_images: expected (B, 3, H, W) images, got {tuple(images.shape)}")
        if images.shape[-2] % 8 or images.shape[-1] % 8:
            raise ConfigError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of 8")
        vae = self.sd_model.forge_objects_original.vae
        self.webui.memory_management.load_models_gpu([vae.patcher])
        fsm = vae.first_stage_model
        moments = fsm.encoder(images.to(vae.device, vae.vae_dtype))
        if getattr(fsm, "quant_conv", None) is not None:
            moments = fsm.quant_conv(moments)
        mean, _logvar = torch.chunk(moments, 2, dim=1)
        return fsm.process_in(mean).to(torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) fp32 in about [-1, 1] of latents (B, 4, h, w) (scaled, as
        :meth:`encode_images` gives them), differentiable w.r.t. the latents (the textcraftor mode).
        Forge's VAE patcher decodes under ``torch.inference_mode`` (no gradient can pass), so its
        module is called directly: ``process_out`` (scale and shift undone), ``post_quant_conv``
        and the decoder, inside :class:`InferenceWeightsMode` (the weights are inference tensors)."""
        if latents.dim() != 4 or latents.shape[1] != 4:
            raise ModelLayoutError(f"decode_latents: expected (B, 4, h, w) latents, got {tuple(latents.shape)}")
        vae = self.sd_model.forge_objects_original.vae
        self.webui.memory_management.load_models_gpu([vae.patcher])
        fsm = vae.first_stage_model
        with InferenceWeightsMode():
            return fsm.decode(fsm.process_out(latents.to(vae.device, vae.vae_dtype))).float()

    def live_embeddings(self, embeddings: EmbeddingSet) -> contextlib.AbstractContextManager[None]:
        """Within the block, ``embeddings`` are registered in every engine's database as live
        Forge ``Embedding`` objects (vec = our Parameter); the databases are exactly as before after."""
        return _registered(self, embeddings)

    def encode_prompts(self, prompts: Sequence[str], embeddings: EmbeddingSet,
                       sizes: Sequence[SizeInfo] | None = None) -> Conditioning:
        """SD1 (B, 77·k, 768); SDXL (B, 77·k, 2048) + ``y`` (B, 2816): through Forge's engines with
        its clip skip and emphasis, differentiable w.r.t. the embeddings and any TE LoRA."""
        prompts = list(prompts)
        if not prompts:
            raise ConfigError("encode_prompts: no prompts given")
        self._ensure_loaded()
        with self.live_embeddings(embeddings), forge_session.engine_settings(self), InferenceWeightsMode():
            if self.base_model == "sd1":
                return Conditioning(forge_session.encode_with_engine(self.engines["clip_l"], prompts))
            cond_l = forge_session.encode_with_engine(self.engines["clip_l"], prompts)
            cond_g, pooled = forge_session.encode_with_engine(self.engines["clip_g"], prompts)
            y = torch.cat([pooled, self._size_embeddings(sizes, len(prompts)).to(pooled)], dim=1)
        return Conditioning(torch.cat([cond_l, cond_g], dim=2), {"y": y})

    def _size_embeddings(self, sizes: Sequence[SizeInfo] | None, count: int) -> torch.Tensor:
        """(B, 1536): Forge's Timestep(256) embedding of h, w, crop top, crop left, target h, target w."""
        rows = list(sizes) if sizes is not None else [SizeInfo((1024, 1024), (0, 0), (1024, 1024))] * count
        embedder = self.sd_model.embedder
        out = []
        for row in rows:
            values = [v for name in SDXL_SIZE_ORDER for v in getattr(row, name)]
            out.append(torch.cat([embedder(torch.tensor([float(v)])) for v in values]).flatten())
        return torch.stack(out).to(self.device)

    def model_id(self) -> str | None:
        """A fingerprint of the VAE Forge has loaded now (its encoder (+ quant_conv) weights, dtype and
        latent scale): it changes with the checkpoint and with a VAE chosen in the UI, so the latent
        cache never hands one VAE's latents to another. None when the VAE has no encoder module."""
        vae = getattr(getattr(self.sd_model, "forge_objects", None), "vae", None)
        fsm = getattr(vae, "first_stage_model", None)
        encoder, quant = getattr(fsm, "encoder", None), getattr(fsm, "quant_conv", None)
        if not isinstance(encoder, nn.Module):
            return None
        parts = [encoder] + ([quant] if isinstance(quant, nn.Module) else [])
        scale = getattr(fsm, "scaling_factor", getattr(fsm, "scale_factor", None))
        return "forge-vae:" + weights_fingerprint(parts, str(scale), str(getattr(vae, "vae_dtype", "")))

    def text_encoding_key(self) -> tuple:
        """Forge's options that change what :meth:`encode_prompts` returns, as they are now."""
        opts = self.webui.shared.opts
        return tuple(getattr(opts, name, None) for name in TEXT_OPTIONS)

    def text_encoding_is_deterministic(self) -> bool:
        return not has_active_dropout([self.text_model(k) for k in self.engines])

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The UNet's output as fp32; SDXL also gets ``y``. No Forge patches (transformer_options empty)."""
        self._ensure_loaded()
        kwargs: dict[str, Any] = {"context": cond.context.to(self.device, self.dtype), "transformer_options": {}}
        if self.base_model == "sdxl":
            if "y" not in cond.extra:
                raise ModelLayoutError("SDXL conditioning without 'y' (not made by this host's encode_prompts?)")
            kwargs["y"] = cond.extra["y"].to(self.device, self.dtype)
        with InferenceWeightsMode():
            out = self.unet(noisy_latents.to(self.device, self.dtype), timesteps.to(self.device), **kwargs)
        return out.float()

    def _ensure_loaded(self) -> None:
        """The original (LoRA-free) UNet and text-encoder patchers loaded: a preview may have moved
        them (low VRAM) or merged a LoRA its prompt named; loading them again undoes either."""
        originals = self.sd_model.forge_objects_original
        management = self.webui.memory_management
        wanted = [originals.unet, originals.clip.patcher]
        loaded = {id(entry.model) for entry in management.current_loaded_models}
        if not all(id(patcher) in loaded for patcher in wanted):  # loading one unloads its LoRA clones
            management.load_models_gpu(wanted)

    # -- session and previews ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def training_session(self, gradient_checkpointing: bool) -> Iterator[None]:
        """See :func:`pivotal.hosts.forge.session.training_session`; restores everything on exit."""
        with forge_session.training_session(self, gradient_checkpointing) as info:
            self.last_session = dict(info)
            yield

    def generate(self, prompt: str, negative: str, embeddings: EmbeddingSet, steps: int, seed: int,
                 width: int, height: int, guidance: float) -> Any:
        """A preview through Forge's txt2img with the attached LoRA and live embeddings; a blank
        image while another checkpoint is waiting to load (it loads after the run, never mid-run)."""
        from PIL import Image

        from pivotal.hosts.a1111.preview import generate_preview

        if self.webui.model_pending() or self.webui.sd_model is not self.sd_model:
            if not self._warned_preview:
                self._warned_preview = True
                log.warning("Pivotal: previews are skipped: another checkpoint is selected and loads after the run")
            return Image.new("RGB", (int(width), int(height)))
        return generate_preview(self, prompt, negative, embeddings, steps, seed, width, height,
                                self.generation_guidance(guidance))

    def generation_guidance(self, guidance: float) -> float:
        """``preview_cfg`` when it is set (previews and class images are drawn at it), else ``guidance``."""
        return float(self.preview_cfg if self.preview_cfg is not None else guidance)

    def published(self, path: str) -> None:
        """The run wrote ``path`` into the Lora folder: if it replaced a file whose LoRA Forge has
        merged (the last generation named it), Forge's memo of the merged set must not be trusted."""
        forge_session.forget_lora_file(self.sd_model, path)


@contextlib.contextmanager
def _registered(host: ForgeHost, embeddings: EmbeddingSet) -> Iterator[None]:
    make = host.webui.textual_inversion.Embedding
    databases = [engine.embeddings for engine in host.engines.values()]
    with forge_session.restored_databases(databases):
        for name in embeddings.names():
            vectors = {k: embeddings.vectors_for(k)[name] for k in host.encoder_keys()}
            vec: Any = vectors["clip_l"] if host.base_model == "sd1" else vectors
            live = make(vec, name)
            live.vectors = embeddings.num_vectors(name)
            live.shape = sum(int(v.shape[-1]) for v in vectors.values())
            live.filename = LIVE_FILENAME
            for db in databases:
                db.register_embedding_by_name(live, name)
        yield
