"""The standalone host the CLI and the app start: a diffusers folder, a single-file checkpoint, or one
of the demo models."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pivotal.errors import ConfigError
from pivotal.hosts.diffusers.host import (
    DiffusersHost,
    load_diffusers_folder,
    require_standalone_libraries,
    resolve_device,
)

#: What UIs show for each demo model: the sd1 one draws what its prompts say, the sdxl one is noise.
DEMO_LABELS = {
    "sd1": "demo sd1 (tiny-world model, pre-trained on coloured shapes, 64 px)",
    "sdxl": "demo sdxl (tiny, random weights — outputs are noise)",
}


def build_demo_host(base: str, seed: int = 0, device: str | torch.device | None = None,
                    cache_dir: str | os.PathLike | None = None, pretrained: bool | None = None) -> DiffusersHost:
    """A demo model (see :mod:`pivotal.demo.model`) as a standalone host, fp32.

    Deterministic from ``seed``: a bundle trained on ``--demo sd1`` loads onto a later one.
    ``cache_dir``: where the CLIP tokenizer files are written once (default: the user cache).
    ``pretrained``: the tiny-world weights (default: for sd1) or random ones.
    """
    from pivotal.demo.model import build_demo_parts, is_pretrained
    from pivotal.demo.reward import register

    register()  # the tiny-world reward of the textcraftor mode

    require_standalone_libraries()
    parts = build_demo_parts(base, seed, cache_dir, pretrained=pretrained)
    dev = resolve_device(device)
    for m in (parts.unet, parts.vae, *parts.text_encoders.values()):
        m.to(dev)
    label = (DEMO_LABELS[base] if is_pretrained(base, pretrained)
             else f"demo {base} (tiny, random weights — outputs are noise)")
    return DiffusersHost(parts, label=label)


def load_host(model: str | None = None, demo: str | None = None, device: str | None = None) -> DiffusersHost:
    """Exactly one of ``model`` (a diffusers folder or a single-file .safetensors checkpoint) or
    ``demo`` ("sd1" / "sdxl"). Registers the tiny-world reward (``reward`` setting ``tiny_world``)."""
    from pivotal.demo.reward import register

    register()  # the tiny-world reward of the textcraftor mode (for a tiny-world checkpoint file too)
    if (model is None) == (demo is None):
        raise ConfigError("give exactly one of --model PATH (a diffusers folder or a .safetensors checkpoint) "
                          "or --demo {sd1,sdxl}")
    if demo is not None:
        return build_demo_host(demo, device=device)
    if Path(model).is_file():
        from pivotal.hosts.diffusers.single_file import load_single_file

        return load_single_file(model, device=device)
    return load_diffusers_folder(str(model), device=device)
