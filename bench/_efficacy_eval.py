"""Measuring a trained bundle: held-out denoising loss with each part of it switched on or off.

The measure is the diffusion model's own: the epsilon MSE, unweighted, of fixed noise at a fixed
grid of timesteps on fixed pictures (``DenoiseSet``), so two variants of a model are compared on
exactly the same draws. Lower is better; a *gain* is the fraction of the base model's loss a
variant removes, ``1 - L_variant / L_base``.

Variants of one bundle (what users compare as a grid):

* ``full``: every LoRA part on, the bundle's embeddings loaded;
* ``emb``: the embeddings alone (no LoRA);
* ``unet``: the UNet LoRA alone; ``te``: the text-encoder LoRA alone. Without the embeddings the
  trigger is plain text, as in a webui where only the LoRA part of the bundle is applied;
* ``base``: nothing of the bundle.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from pivotal.adapters.network import LoraNetwork
from pivotal.hosts.diffusers.host import DiffusersHost
from pivotal.inference.bundle_load import load_bundle_for_model
from pivotal.text.embeddings import EmbeddingSet
from pivotal.training.dreamartist import negative_captions

#: Timesteps every picture is noised at (SD's 1000-step schedule), spread over the range.
TIMESTEPS = (100, 250, 400, 550, 700, 850)
WIDEST = "attn-mlp-conv"


@dataclass
class DenoiseSet:
    """Pictures' latents with fixed noise per timestep. ``latents`` (N, 4, h, w); ``noise``
    (N·T, 4, h, w); ``timesteps`` (N·T,), picture-major."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


def denoise_set(host: DiffusersHost, images: Sequence[Image.Image], seed: int) -> DenoiseSet:
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                          for im in images]) / 127.5 - 1.0
    latents = host.encode_images(pixels.to(host.device))
    n, t = latents.shape[0], len(TIMESTEPS)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n * t, *latents.shape[1:]), generator=gen)
    return DenoiseSet(latents.cpu(), noise, torch.tensor(TIMESTEPS).repeat(n))


@torch.no_grad()
def denoise_loss(host: DiffusersHost, data: DenoiseSet, captions: Sequence[str], embeddings: EmbeddingSet,
                 negatives: Mapping[str, str] | None = None, guidance: float = 1.0) -> float:
    """Mean epsilon MSE over every picture x timestep (captions: one per picture). With
    ``negatives`` ({name: negative name}, DreamArtist++), the prediction is the guided one,
    uncond(captions with the negative names) + guidance · (cond − uncond), as the bundle is used."""
    t = len(TIMESTEPS)
    latents = data.latents.repeat_interleave(t, dim=0)
    alphas = host.alphas_cumprod().cpu()[data.timesteps].view(-1, 1, 1, 1)
    noisy = alphas.sqrt() * latents + (1 - alphas).sqrt() * data.noise
    caps = [c for c in captions for _ in range(t)]
    total, count = 0.0, 0
    for start in range(0, len(caps), 48):
        end = min(start + 48, len(caps))
        x, ts = noisy[start:end].to(host.device, host.dtype), data.timesteps[start:end].to(host.device)
        pred = host.predict(x, ts, host.encode_prompts(caps[start:end], embeddings))
        if negatives:
            neg = host.predict(x, ts, host.encode_prompts(negative_captions(caps[start:end], negatives), embeddings))
            pred = neg.float() + guidance * (pred.float() - neg.float())
        total += float(((pred.float().cpu() - data.noise[start:end]) ** 2).mean(dim=(1, 2, 3)).sum())
        count += end - start
    return total / count


@dataclass
class LoadedParts:
    """A bundle loaded on a host: its network (None when it has no LoRA) and its embeddings."""

    network: LoraNetwork | None
    embeddings: EmbeddingSet


def load_parts(host: DiffusersHost, bundle_path: str) -> LoadedParts:
    targets = host.lora_targets("unet", WIDEST) + host.lora_targets("te", WIDEST)
    dims = {k: int(host.vocabulary(k).shape[1]) for k in host.encoder_keys()}
    loaded = load_bundle_for_model(bundle_path, host.base_model, targets, dims)
    embs = EmbeddingSet()
    for name, emb in loaded.embeddings.items():
        embs.add(name, {k: emb.vectors[k] for k in host.encoder_keys()})
    return LoadedParts(loaded.network, embs)


@contextlib.contextmanager
def variant(parts: LoadedParts, which: str) -> Iterator[EmbeddingSet]:
    """Attach the LoRA parts of ``which`` ("full", "emb", "unet", "te", "base") for the block;
    yields the embeddings to encode with."""
    net = parts.network
    on = {"full": {"unet", "te", "te1", "te2"}, "unet": {"unet"}, "te": {"te", "te1", "te2"}}.get(which, set())
    use_net = net is not None and any(p in on for p in net.parts)
    embeddings = parts.embeddings if which in ("full", "emb") else EmbeddingSet()
    if not use_net:
        yield embeddings
        return
    assert net is not None
    for part in net.parts:
        net.set_multiplier(part, 1.0 if part in on else 0.0)
    with net.attached():
        yield embeddings


def has_part(parts: LoadedParts, which: str) -> bool:
    """Whether the bundle has anything trained for variant ``which`` (a TE-LoRA-free bundle has no "te")."""
    if which == "emb":
        return len(parts.embeddings) > 0
    if parts.network is None:
        return False
    want = {"unet": {"unet"}, "te": {"te", "te1", "te2"}}[which]
    return any(p in want for p in parts.network.parts)


def gain(loss: float, base: float) -> float:
    """The fraction of the base loss removed (negative when worse than the base)."""
    return 1.0 - loss / base
