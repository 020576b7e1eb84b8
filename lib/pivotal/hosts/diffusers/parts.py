"""The pieces a :class:`~pivotal.hosts.diffusers.host.DiffusersHost` is made of.

Loaders (a diffusers pipeline folder, the tiny demo model) fill a :class:`PipelineParts`; the host
only checks and uses it. Nothing here imports diffusers, so this module loads anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from pivotal.formats.bundle import ENCODER_KEYS

__all__ = ["DEFAULT_PAD_IDS", "ENCODER_KEYS", "PipelineParts"]
#: What each tokenizer pads with when it names no pad token: SD1/clip_l pads with EOS, SDXL's
#: tokenizer_2 (clip_g) with "!" (id 0) as its special_tokens_map says and diffusers uses.
DEFAULT_PAD_IDS: dict[str, int] = {"clip_l": 49407, "clip_g": 0}


@dataclass
class PipelineParts:
    """Everything a Stable Diffusion pipeline needs to train and sample.

    ``text_encoders`` / ``tokenizers`` are keyed by encoder key ("clip_l", and "clip_g" for
    SDXL, which must be a ``CLIPTextModelWithProjection``). ``scheduler_config`` is the
    pipeline's ``scheduler/scheduler_config.json`` as a dict (beta schedule, prediction type).
    ``force_zeros_for_empty_prompt``: SDXL pipelines use zero conditioning for an empty negative
    prompt (``model_index.json`` says so); SD1 pipelines encode "" like any other prompt.
    """

    base_model: str
    unet: nn.Module
    vae: nn.Module
    text_encoders: dict[str, nn.Module]
    tokenizers: dict[str, Any]
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool = False
    #: where the parts came from (a folder, "demo sd1 seed 0"), for messages
    source: str = ""
