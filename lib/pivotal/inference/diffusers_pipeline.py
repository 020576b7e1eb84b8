"""Load a Pivotal bundle into a diffusers pipeline in one call: LoRA and embeddings.

``load_bundle_into_pipeline(pipe, SOURCE)`` takes the bundle ``.safetensors`` itself or a folder
written by ``pivotal export-diffusers`` and calls diffusers' own loaders: ``load_lora_weights``
with the LoRA keys (kohya names, which diffusers converts), then ``load_textual_inversion`` once
per embedding and encoder (SDXL: clip_l into ``text_encoder``/``tokenizer``, clip_g into
``text_encoder_2``/``tokenizer_2``). diffusers adds one token per vector (``NAME``, ``NAME_1``, ...)
and expands ``NAME`` in prompts to all of them, so prompts name the embedding as in the webui.

No diffusers import here: ``pipe`` is used through those methods only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from pivotal.errors import BundleError, ConfigError
from pivotal.formats.bundle import read_bundle
from pivotal.formats.diffusers_export import LORA_FILE, MANIFEST_FILE
from pivotal.formats.safetensors_io import load_tensors, read_header


def _from_folder(folder: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    manifest_path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        base = str(manifest["base_model"])
        entries = dict(manifest["embeddings"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(manifest_path, f"not a pivotal export-diffusers folder ({e})") from e
    lora = load_tensors(read_header(folder / LORA_FILE)) if manifest.get("lora") else {}
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    for name, entry in entries.items():
        path = folder / str(entry["file"])
        tensors = load_tensors(read_header(path))
        want = ("emb_params",) if base == "sd1" else ("clip_l", "clip_g")
        if sorted(tensors) != sorted(want):
            raise BundleError(path, f"expected the keys {', '.join(want)}, found {', '.join(sorted(tensors))}")
        embeddings[name] = {"clip_l": tensors["emb_params"]} if base == "sd1" else tensors
    return base, lora, embeddings


def load_bundle_into_pipeline(pipe: Any, source: str | os.PathLike, adapter_name: str | None = None) -> dict[str, Any]:
    """Load the LoRA and every embedding of ``source`` into the diffusers pipeline ``pipe``.

    ``source``: a bundle file, or a ``pivotal export-diffusers`` folder. ``adapter_name``: passed to
    ``load_lora_weights`` (default: diffusers' own naming). Returns ``{"base_model", "lora_tensors",
    "embeddings"}``. ConfigError when the bundle's base model (sd1 / sdxl) is not the pipeline's;
    BundleError for an unreadable source.
    """
    path = Path(source)
    if path.is_dir():
        base, lora, embeddings = _from_folder(path)
    else:
        bundle = read_bundle(path)
        base, lora = bundle.base_model, dict(bundle.lora)
        embeddings = {name: dict(emb.vectors) for name, emb in bundle.embeddings.items()}
    pipe_base = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd1"
    if base != pipe_base:
        raise ConfigError(f"{path}: a {base} bundle cannot load into this {pipe_base} pipeline "
                          f"({type(pipe).__name__})")
    if lora:
        # a copy: diffusers pops keys from the dict it is given while converting kohya names
        pipe.load_lora_weights({k: v.clone() for k, v in lora.items()}, adapter_name=adapter_name)
    for name, vectors in embeddings.items():
        pipe.load_textual_inversion(vectors["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        if base == "sdxl":
            pipe.load_textual_inversion(vectors["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    return {"base_model": base, "lora_tensors": len(lora), "embeddings": sorted(embeddings)}
