"""The second base model of the transfer measure: the tiny-world model continued on a shifted world.

Same architecture and VAE; its UNet and text encoder are trained further, by the same pre-training
code (``pivotal.demo.pretrain.diffusion.train_diffusion``), on the world drawn in
``synth_world.SHIFTED_STYLE`` (a warm tint and grain; same captions). A bundle trained on the
first model is then applied to this one, as users apply a LoRA or an embedding to another
checkpoint of the same family. Built once and cached (``$PIVOTAL_CACHE_DIR/bench/``), keyed by
the base weights' hash and the settings below.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from pivotal.demo import tiny_world
from pivotal.demo.basics import SCHEDULER_CONFIG, default_cache_dir, demo_tokenizer
from pivotal.demo.pretrain.data import prompt_ids, render_world_set
from pivotal.demo.pretrain.diffusion import DiffusionSettings, train_diffusion
from pivotal.demo.pretrain.run import alphas_cumprod
from pivotal.demo.pretrain.vae import encode_world
from pivotal.demo.world import BASE_WORLD, SHIFTED_STYLE
from pivotal.formats.safetensors_io import atomic_save
from pivotal.hosts.diffusers.parts import PipelineParts

SHIFT_WORLD_SEED = 4242
SHIFT_IMAGES = 2048
SHIFT_SETTINGS = DiffusionSettings(steps=200, batch_size=32, lr=3e-4, warmup=20, seed=5)


def _key(base_path: Path, settings: DiffusionSettings, images: int) -> str:
    h = hashlib.sha256(base_path.read_bytes())
    h.update(json.dumps([SHIFT_WORLD_SEED, images, repr(settings), SHIFTED_STYLE.name]).encode())
    return h.hexdigest()[:16]


def shifted_parts(base_path: str | os.PathLike = tiny_world.WEIGHTS_FILE, steps: int = SHIFT_SETTINGS.steps,
                  images: int = SHIFT_IMAGES, log: Callable[[str], None] = print) -> tuple[PipelineParts, dict]:
    """The shifted model's parts (built, or read from the cache) and a note of how it was made."""
    base_path = Path(base_path)
    settings = dataclasses.replace(SHIFT_SETTINGS, steps=steps)
    cache = default_cache_dir() / "bench" / f"tiny-world-shifted-{_key(base_path, settings, images)}.safetensors"
    note = {"world_seed": SHIFT_WORLD_SEED, "images": images, "steps": settings.steps,
            "lr": settings.lr, "style": SHIFTED_STYLE.name, "cached": cache.is_file()}
    if not cache.is_file():
        unet, vae, te, meta = tiny_world.load_modules(base_path)
        unet, te = copy.deepcopy(unet).requires_grad_(True), copy.deepcopy(te).requires_grad_(True)
        tokenizer = demo_tokenizer("clip_l")
        world = render_world_set(SHIFT_WORLD_SEED, images, BASE_WORLD, ((SHIFTED_STYLE, 1.0),))
        with torch.no_grad():
            mean, std = encode_world(vae, world)
        ids = prompt_ids(tokenizer, world.captions)
        empty = prompt_ids(tokenizer, [""])[0]
        scale = float(meta["scaling_factor"])
        log(f"[efficacy] continuing the base model on the shifted world ({settings.steps} steps)")
        losses = train_diffusion(unet, te, mean, std, ids, empty, alphas_cumprod(), scale, settings,
                                 log=lambda s: None)
        note["losses"] = losses
        # Every token row is kept (the file format stores only the rows given): ids = all.
        tensors = tiny_world.file_tensors(unet, vae, te, torch.arange(tiny_world.VOCAB_SIZE))
        meta = dict(meta, shifted=note)
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(cache, tensors, {tiny_world.METADATA_KEY: json.dumps(meta, sort_keys=True)})
    unet, vae, te, _ = tiny_world.load_modules(cache)
    parts = PipelineParts(base_model="sd1", unet=unet, vae=vae, text_encoders={"clip_l": te},
                          tokenizers={"clip_l": demo_tokenizer("clip_l")}, scheduler_config=dict(SCHEDULER_CONFIG),
                          source=f"tiny-world continued on {SHIFTED_STYLE.name}")
    return parts, note
