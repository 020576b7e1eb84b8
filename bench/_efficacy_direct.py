"""The efficacy benchmark's methods that Pivotal's trainer does not have: ``hypernetwork`` (the
webui's kind, :mod:`_hypernet`) and ``dreambooth`` (the whole UNet fine-tuned with prior
preservation), trained by :mod:`_direct_train` at the same steps, batch, data and seed as the rest.

Each writes one safetensors file (its "bundle": the hypernetwork's MLPs, or the whole fine-tuned
UNet, fp32), whose size is the method's file size. :func:`applied` puts a file on a host for
measuring: the hypernetwork is hooked in; the fine-tuned UNet replaces the first base's UNet, and
on another base model (the transfer measure) is applied as a difference, ``W2 + (W_ft - W_base)``
(the webui checkpoint merger's "add difference", how a fine-tune is carried to another model).
The trigger is plain text: the concept's name for the hypernetwork (as the webui trains one, the
name only in the captions), DreamBooth's rare word ("a [V] dog") for dreambooth.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from _direct_train import DirectSettings, image_latents, train_direct, unet_weights
from _efficacy_data import Concept, write_training_folder
from _hypernet import LAYER_STRUCTURE, Hypernetwork
from pivotal.formats.safetensors_io import atomic_save
from pivotal.hosts.diffusers.host import DiffusersHost
from pivotal.text.embeddings import EmbeddingSet

#: Settings of the direct methods (LRs chosen by the pilot in bench/RESULTS.md). ``targets``:
#: "all" = the webui's default sizes (text context and every UNet width), "cross" = context only.
DIRECT: dict[str, dict[str, Any]] = {
    "hypernetwork": dict(lr=3e-4, targets="all", layer_norm=False),
    "dreambooth": dict(lr=3e-5, class_count=8, class_steps=20, prior_weight=1.0),
}
#: the guidance of generated class images (as Pivotal's prior preservation draws them)
CLASS_GUIDANCE = 7.0
#: the first base model's UNet weights, for applying a DreamBooth file to another base as a difference
_BASE_UNET: dict[int, dict[str, torch.Tensor]] = {}


def trigger(method: str, concept: Concept) -> str:
    return concept.rare if method == "dreambooth" else concept.trigger


def class_prompt(concept: Concept) -> str:
    """The class the concept belongs to, in the base world's words (as the ``prior`` method's)."""
    return f"a red {concept.init or 'square'} on a white background"


def class_latents(host: DiffusersHost, concept: Concept, work: Path, count: int, steps: int) -> torch.Tensor:
    """(count, 4, h, w): class images the base model draws from the class prompt (image n: seed n),
    cached as PNGs in ``work``."""
    folder = work / f"db-classes-{concept.key}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for n in range(count):
        path = folder / f"{n:03d}.png"
        if not path.is_file():
            host.generate(class_prompt(concept), "", EmbeddingSet(), steps, n, 64, 64, CLASS_GUIDANCE).save(path)
        images.append(Image.open(path).convert("RGB"))
    return image_latents(host, images)


def train_direct_method(host: DiffusersHost, concept: Concept, method: str, seed: int, work: Path, steps: int,
                        batch_size: int, overrides: dict[str, Any] | None = None) -> tuple[str, float]:
    """(file path, median ms per step) of ``method`` trained on ``concept``."""
    opts = {**DIRECT[method], **(overrides or {})}
    data = write_training_folder(work / f"data-{concept.key}-{trigger(method, concept)}", concept,
                                 trigger(method, concept))
    tag = "-".join(f"{k}{v}" for k, v in sorted(opts.items()))
    out = work / f"out-{concept.key}-{method}-{tag}-s{seed}.safetensors"
    if method == "hypernetwork":
        hyper = Hypernetwork(host.unet, opts["targets"], LAYER_STRUCTURE, opts["layer_norm"], seed=seed)
        settings = DirectSettings(steps=steps, lr=opts["lr"], batch_size=batch_size, seed=seed)
        secs = train_direct(host, data, lambda: list(hyper.parameters()), settings,
                            applied=lambda: hyper.attached(host.unet))
        tensors = {k: v.detach().clone().contiguous() for k, v in hyper.state_dict().items()}
        meta = {"targets": opts["targets"], "layer_norm": str(bool(opts["layer_norm"]))}
    elif method == "dreambooth":
        unet = host.unet
        base = _BASE_UNET.setdefault(id(unet), {k: v.detach().clone() for k, v in unet.state_dict().items()})
        prior = (class_latents(host, concept, work, opts["class_count"], opts["class_steps"]), class_prompt(concept))
        settings = DirectSettings(steps=steps, lr=opts["lr"], batch_size=batch_size, seed=seed,
                                  prior_weight=opts["prior_weight"])
        try:
            secs = train_direct(host, data, lambda: list(unet.parameters()), settings, prior=prior)
            tensors = {k: v.detach().clone().contiguous() for k, v in unet.state_dict().items()}
        finally:
            with torch.no_grad():
                unet.load_state_dict(base)  # the base UNet back, exactly
        meta = {}
    else:
        raise ValueError(f"not a direct method: {method}")
    atomic_save(out, tensors, {"method": method, **meta})
    secs = sorted(secs)
    return str(out), 1000 * secs[len(secs) // 2]


@contextlib.contextmanager
def applied(host: DiffusersHost, method: str, path: str, first_unet: torch.nn.Module) -> Iterator[None]:
    """The file at ``path`` on ``host`` for the block (see the module docstring); the host's
    model is bit-identical afterwards. ``first_unet``: the UNet the file was trained on."""
    tensors = load_file(path)
    if method == "hypernetwork":
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        hyper = Hypernetwork(host.unet, meta["targets"], LAYER_STRUCTURE, meta["layer_norm"] == "True")
        hyper.load_state_dict(tensors)
        with hyper.attached(host.unet):
            yield
        return
    if host.unet is first_unet:
        state = tensors
    else:
        base = _BASE_UNET[id(first_unet)]
        own = host.unet.state_dict()
        state = {k: own[k] + (tensors[k] - base[k]) for k in own}
    with unet_weights(host.unet, state):
        yield
