"""``__metadata__`` of a bundle: the kohya ``ss_*`` fields the webui reads, modelspec basics, and
Pivotal's own ``pivotal.*`` record of the embeddings and the training settings.

All values are strings (safetensors requires it). JSON values are written compactly; the webui
JSON-decodes values that start with ``{``, so only objects that are meant to be read that way
(``ss_tag_frequency``) start with one.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

import pivotal
from pivotal.adapters.algorithms import describe_module
from pivotal.adapters.kohya_keys import group_by_module

#: ``ss_base_model_version`` per base model. The webui shows a card for SDXL models only when the
#: value starts with ``sdxl_``; any other value means SD1.
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
FORMAT_VERSION = "1"


@dataclass
class TrainingInfo:
    """What a bundle records about how it was made (all optional but the name)."""

    output_name: str
    resolution: tuple[int, int] = (512, 512)
    #: images per epoch (an image once per repeat) and class images, as kohya counts them
    num_train_images: int = 0
    num_reg_images: int = 0
    #: {dataset folder name: {tag: count}}, as kohya writes it.
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    #: The training settings (JSON-able), recorded under ``pivotal.training``.
    settings: dict[str, Any] = field(default_factory=dict)
    #: Base checkpoint name and hash, when known.
    base_checkpoint: str = ""
    base_checkpoint_hash: str = ""
    #: The last held-out validation loss and the step it was measured at (None: no validation set).
    validation_loss: float | None = None
    validation_step: int = 0
    #: the drift in % measured with it (None: not measured; see pivotal.training.validation)
    validation_drift: float | None = None
    #: {setting: value as written} that a sweep varied for this run (empty: not a sweep's run)
    sweep: dict[str, str] = field(default_factory=dict)
    #: prior preservation's class images (pivotal.training.prior's report + the weight; empty: off)
    prior: dict[str, Any] = field(default_factory=dict)
    #: DreamArtist++: {"cfg": scale, "negatives": {positive: negative name}} (empty: off)
    dreamartist: dict[str, Any] = field(default_factory=dict)
    #: the training objective, as kohya records it (``ss_zero_terminal_snr``, ``ss_max_grad_norm``,
    #: ``ss_masked_loss``, ``ss_v_parameterization``); None: not recorded
    zero_terminal_snr: bool | None = None
    max_grad_norm: float | None = None
    masked_loss: bool | None = None
    v_prediction: bool | None = None
    #: what the dataset's folders said (``pivotal.dataset``): repeats, loss scales, masks found
    dataset: dict[str, Any] = field(default_factory=dict)


def lora_rank_alpha(lora: dict[str, torch.Tensor]) -> tuple[int, float]:
    """The most common (rank, alpha) over the LoRA modules; (0, 0) when there are none."""
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    for parts in group_by_module(lora).values():
        lay = describe_module(parts)
        ranks[lay.rank] += 1
        if lay.alpha is not None:
            alphas[lay.alpha] += 1
    rank = ranks.most_common(1)[0][0] if ranks else 0
    alpha = alphas.most_common(1)[0][0] if alphas else float(rank)
    return rank, alpha


def lora_algorithms(lora: dict[str, torch.Tensor]) -> list[str]:
    """The distinct algorithm labels of the modules ("lora", "loha+dora", …), sorted."""
    return sorted({describe_module(parts).label for parts in group_by_module(lora).values()})


def network_fields(lora: dict[str, torch.Tensor]) -> dict[str, str]:
    """``ss_network_module`` (+ ``ss_network_args``) as kohya / LyCORIS write them: plain LoRA is
    ``networks.lora``; anything else ``lycoris.kohya`` with ``{"algo": …}`` (and ``dora_wd``)."""
    labels = lora_algorithms(lora)
    algos = sorted({label.split("+")[0] for label in labels})
    if not lora or labels == ["lora"]:
        return {"ss_network_module": "networks.lora"}
    args: dict[str, str] = {"algo": algos[0] if len(algos) == 1 else ",".join(algos)}
    if any(label.endswith("+dora") for label in labels):
        args["dora_wd"] = "True"
    return {"ss_network_module": "lycoris.kohya",
            "ss_network_args": json.dumps(args, separators=(",", ":"))}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def build_metadata(base_model: str, lora: dict[str, torch.Tensor], embeddings: list[dict[str, Any]],
                   info: TrainingInfo, model_hash: str, now: _dt.datetime | None = None) -> dict[str, str]:
    """The full ``__metadata__`` dict.

    ``embeddings``: ``[{"name", "vectors", "init_text", "encoders"}]`` in bundle order.
    ``model_hash``: sha256 of the file's data section (see ``safetensors_io.data_hash``).
    """
    now = now or _dt.datetime.now(_dt.timezone.utc)
    rank, alpha = lora_rank_alpha(lora)
    w, h = info.resolution
    meta = {
        "ss_output_name": info.output_name,
        "ss_base_model_version": BASE_MODEL_VERSION[base_model],
        # kohya's / LyCORIS' module name, so tools that branch on it know the algorithm.
        **network_fields(lora),
        "ss_network_dim": str(rank),
        "ss_network_alpha": _num(alpha),
        "ss_tag_frequency": json.dumps(info.tag_frequency, ensure_ascii=False, separators=(",", ":")),
        "ss_resolution": f"({w}, {h})",
        "ss_num_train_images": str(int(info.num_train_images)),
        "ss_num_reg_images": str(int(info.num_reg_images)),
        "ss_training_finished_at": str(now.timestamp()),
        "sshs_model_hash": model_hash,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH[base_model],
        "modelspec.implementation": "sd-webui-pivotal",
        "modelspec.title": info.output_name,
        "modelspec.date": now.date().isoformat(),
        "modelspec.resolution": f"{w}x{h}",
        "pivotal.format": FORMAT_VERSION,
        "pivotal.version": pivotal.__version__,
        "pivotal.embeddings": json.dumps(embeddings, ensure_ascii=False, separators=(",", ":")),
        "pivotal.training": json.dumps(info.settings, ensure_ascii=False, separators=(",", ":"),
                                       sort_keys=True, default=str),
    }
    if info.validation_loss is not None:
        meta["pivotal.validation_loss"] = repr(float(info.validation_loss))
        meta["pivotal.validation_step"] = str(int(info.validation_step))
    for flag, on in (("ss_zero_terminal_snr", info.zero_terminal_snr), ("ss_masked_loss", info.masked_loss),
                     ("ss_v_parameterization", info.v_prediction)):
        if on is not None:
            meta[flag] = str(bool(on))  # kohya's spelling: "True" / "False"
    if info.max_grad_norm is not None:
        meta["ss_max_grad_norm"] = repr(float(info.max_grad_norm))
    if info.zero_terminal_snr is not None:
        meta["pivotal.noise_schedule"] = "zero_terminal_snr" if info.zero_terminal_snr else "model"
    if info.dataset:
        meta["pivotal.dataset"] = json.dumps(info.dataset, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    if info.validation_drift is not None:
        meta["pivotal.validation_drift"] = repr(float(info.validation_drift))
    if info.sweep:
        meta["pivotal.sweep"] = json.dumps(info.sweep, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    for key, record in (("pivotal.prior", info.prior), ("pivotal.dreamartist", info.dreamartist)):
        if record:
            meta[key] = json.dumps(record, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    if info.base_checkpoint:
        meta["ss_sd_model_name"] = info.base_checkpoint
    if info.base_checkpoint_hash:
        meta["ss_new_sd_model_hash"] = info.base_checkpoint_hash
    return meta
