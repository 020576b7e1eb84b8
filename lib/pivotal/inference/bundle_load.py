"""Loading a bundle onto a model: what matches, what is skipped and why.

Policy (as the webui's own loader, and checklist items 18, 21, 22):

* an embedding whose vector size differs from the model's encoder is skipped with a warning
  naming the bundle and key; the LoRA part still loads;
* an embedding whose name an embeddings-folder file already has is skipped: the folder wins,
  and the warning names both files;
* LoRA keys that match no module are reported (count and first few); zero matches is an error.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from pivotal.adapters.network import LoadReport, LoraNetwork, Target
from pivotal.errors import BundleError
from pivotal.formats.bundle import Bundle, BundleEmbedding, read_bundle

SHOWN_KEYS = 5


@dataclass
class LoadedBundle:
    bundle: Bundle
    network: LoraNetwork | None
    embeddings: dict[str, BundleEmbedding]
    skipped: dict[str, str] = field(default_factory=dict)  # embedding name -> reason
    report: LoadReport | None = None
    warnings: list[str] = field(default_factory=list)


def load_bundle_for_model(path: str | os.PathLike, base_model: str, targets: Sequence[Target],
                          encoder_dims: Mapping[str, int],
                          folder_embeddings: Mapping[str, str] | None = None) -> LoadedBundle:
    """Read ``path`` and prepare it for a model.

    ``targets``: every LoRA-able module of the model (widest preset) with its kohya key.
    ``encoder_dims``: vector size per encoder key, e.g. ``{"clip_l": 768}`` or ``{"clip_l": 768, "clip_g": 1280}``.
    ``folder_embeddings``: {lower-cased name: file} of the embeddings folder (they win).
    """
    bundle = read_bundle(path)
    if bundle.base_model != base_model:
        raise BundleError(path, f"is a {bundle.base_model} bundle; the loaded model is {base_model}")
    out = LoadedBundle(bundle, None, {}, warnings=list(bundle.warnings))
    for name, emb in bundle.embeddings.items():
        reason = _embedding_problem(str(path), emb, encoder_dims, folder_embeddings or {})
        if reason:
            out.skipped[name] = reason
            out.warnings.append(reason)
        else:
            out.embeddings[name] = emb
    if bundle.lora:
        net, report = LoraNetwork.from_kohya_state_dict(targets, bundle.lora)
        out.network, out.report = net, report
        unread = unread_layer_keys(report.unmatched, [key for key, _ in targets])
        unmatched = [k for k in report.unmatched if k not in unread]
        if unmatched:
            first = ", ".join(unmatched[:SHOWN_KEYS])
            out.warnings.append(f"{path}: {len(unmatched)} LoRA tensor(s) match no module of this "
                                f"model and were ignored (first: {first})")
    return out


_TE_LAYER = re.compile(r"^lora_(te[12]?)_text_model_encoder_layers_(\d+)_")


def unread_layer_keys(keys: Sequence[str], target_keys: Sequence[str]) -> set[str]:
    """The ``keys`` for text-encoder layers after the last one the model reads.

    SDXL reads clip_l at its penultimate layer (and a clip skip does the same on SD1), so the model
    has no target there, while kohya trains every layer: those tensors can change nothing. They are
    kept out of the "match no module" warning, which is for keys that should have matched.
    """
    last: dict[str, int] = {}
    for key in target_keys:
        m = _TE_LAYER.match(key + "_")
        if m:
            last[m[1]] = max(last.get(m[1], -1), int(m[2]))
    out = set()
    for key in keys:
        m = _TE_LAYER.match(key)
        if m and m[1] in last and int(m[2]) > last[m[1]]:
            out.add(key)
    return out


def _embedding_problem(path: str, emb: BundleEmbedding, dims: Mapping[str, int],
                       folder: Mapping[str, str]) -> str:
    """Why ``emb`` cannot be used with this model ('' when it can)."""
    if emb.name.lower() in folder:
        return (f"embedding {emb.name!r} from {path} skipped: {folder[emb.name.lower()]} in the "
                "embeddings folder has the same name and wins")
    for key, want in dims.items():
        t = emb.vectors.get(key)
        if t is None:
            return f"{path} [{emb.key_of(key)}]: missing; embedding skipped"
        if int(t.shape[1]) != want:
            return (f"{path} [{emb.key_of(key)}]: vectors are {int(t.shape[1])}-dimensional but "
                    f"this model's {key} encoder needs {want}; embedding skipped")
    return ""
