"""Pre-train the tiny-world SD1 model (:mod:`pivotal.demo.tiny_world`) from scratch, on a CPU.

Two stages, deterministic from the settings' seeds (on one thread, the same libraries give the
same file, byte for byte):

1. the VAE on pictures of the *whole* world, held-out shapes, fills and the shifted style
   included, because a VAE is a general-purpose image codec (SD's reconstructs things its UNet was
   never taught), so concepts learnt later as embeddings can be encoded and decoded;
2. UNet + text encoder on the latents of pictures of the *base* world only (no held-out shape or
   fill word ever appears in a caption), see :mod:`pivotal.demo.pretrain.diffusion`.

``tools/train_base_model.py`` is the command line; it writes the shipped weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from pivotal.demo import tiny_world
from pivotal.demo.pretrain.data import prompt_ids, render_world_set
from pivotal.demo.pretrain.diffusion import DiffusionSettings, train_diffusion
from pivotal.demo.pretrain.vae import VaeSettings, encode_world, scaling_factor, train_vae
from pivotal.demo.world import BASE_STYLE, BASE_WORLD, FULL_WORLD, SHIFTED_STYLE
from pivotal.errors import TrainingError
from pivotal.formats.safetensors_io import atomic_save

Log = Callable[[str], None]


#: Settings fields added after the first shipped file, with the value that reproduces how files
#: without them were trained: group -> {field: value}.
ADDED_FIELDS: dict[str, dict[str, Any]] = {"diffusion": {"cross_attention_lr_scale": 1.0, "timestep_power": 1.0}}


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides the weights. World seeds differ per stage so the VAE and the
    diffusion model see different pictures; :mod:`pivotal.demo.pretrain.check` uses yet others."""

    vae_world_seed: int = 1
    vae_images: int = 8192
    world_seed: int = 0
    images: int = 16384
    init_seed: int = 0
    token_seed: int = 7
    shifted_share: float = 0.2  # of the VAE's pictures drawn in the shifted style
    vae: VaeSettings = field(default_factory=VaeSettings)
    diffusion: DiffusionSettings = field(default_factory=DiffusionSettings)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (tuples as lists), as the weight file's metadata records them. A field
        of :data:`ADDED_FIELDS` at its old behaviour's value is left out, so a file trained the old
        way records (and is, byte for byte) what it was before the field existed."""
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        for group, fields in ADDED_FIELDS.items():
            for name, value in fields.items():
                if out[group].get(name) == value:
                    del out[group][name]
        return out


#: A few steps on a few pictures: for tests of the pipeline itself (the model learns nothing).
QUICK = PretrainSettings(vae_images=16, images=32, vae=VaeSettings(crop_steps=2, steps=2, batch_size=4, warmup=1),
                         diffusion=DiffusionSettings(steps=3, batch_size=4, warmup=1))


def alphas_cumprod() -> torch.Tensor:
    """(1000,) fp32 cumulative alphas of the demo scheduler config (SD's scaled_linear)."""
    from diffusers import DDPMScheduler

    from pivotal.demo.basics import SCHEDULER_CONFIG

    cfg = {k: v for k, v in SCHEDULER_CONFIG.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(cfg).alphas_cumprod.to(torch.float32)


def _library_versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def pretrain(settings: PretrainSettings, out: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
             log: Log = print) -> dict[str, Any]:
    """Train the model and write its weight file to ``out`` (atomically). Returns a report:
    losses, the scaling factor, the trained token count and the wall time of each stage."""
    from pivotal.demo.basics import demo_tokenizer

    times: dict[str, float] = {}
    start = time.perf_counter()
    tokenizer = demo_tokenizer("clip_l", cache_dir)
    unet, vae, te = tiny_world.build_modules(settings.init_seed, settings.token_seed)

    t0 = time.perf_counter()
    styles = ((BASE_STYLE, 1.0 - settings.shifted_share), (SHIFTED_STYLE, settings.shifted_share))
    vae_set = render_world_set(settings.vae_world_seed, settings.vae_images, FULL_WORLD, styles)
    log(f"rendered {len(vae_set)} pictures for the VAE in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    vae_losses = train_vae(vae, vae_set, settings.vae, log)
    times["vae_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    world = render_world_set(settings.world_seed, settings.images, BASE_WORLD)
    t1 = time.perf_counter()
    mean, std = encode_world(vae, world)
    scale = scaling_factor(mean)
    vae.register_to_config(scaling_factor=scale)
    t2 = time.perf_counter()
    ids = prompt_ids(tokenizer, world.captions)
    empty = prompt_ids(tokenizer, [""])[0]
    times["latents_s"] = time.perf_counter() - t0
    log(f"{len(world)} pictures: rendered in {t1 - t0:.1f}s, encoded in {t2 - t1:.1f}s (latent scaling factor "
        f"{scale}), captions tokenized in {time.perf_counter() - t2:.1f}s")

    t0 = time.perf_counter()
    diffusion_losses = train_diffusion(unet, te, mean, std, ids, empty, alphas_cumprod(), scale,
                                       settings.diffusion, log)
    times["diffusion_s"] = time.perf_counter() - t0

    trained = torch.unique(torch.cat([ids.flatten(), empty]))
    untouched = torch.ones(tiny_world.VOCAB_SIZE, dtype=torch.bool)
    untouched[trained] = False
    initial = tiny_world.initial_token_rows(settings.token_seed)
    if not torch.equal(te.get_input_embeddings().weight.detach()[untouched], initial[untouched]):
        raise TrainingError("pre-training changed token-embedding rows of words no caption uses; the weight "
                            "file could not re-create them (was weight decay applied to the embedding?)")
    meta = {"format": tiny_world.FORMAT_VERSION, "scaling_factor": scale, "token_seed": settings.token_seed,
            "trained_tokens": int(trained.numel()), "settings": settings.to_dict(),
            "vae_losses": vae_losses, "diffusion_losses": diffusion_losses,
            "data_sha256": {"vae": vae_set.digest(), "diffusion": world.digest()},
            "libraries": _library_versions()}
    atomic_save(out, tiny_world.file_tensors(unet, vae, te, trained),
                {tiny_world.METADATA_KEY: json.dumps(meta, sort_keys=True)})
    times["total_s"] = time.perf_counter() - start
    log(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB) in {times['total_s']:.0f}s")
    return {**meta, "times": times, "file": str(out), "bytes": Path(out).stat().st_size}
