"""Pivotal's prediction of what a webui's built-in loader draws for a LoHa / LoKr / DoRA bundle: the
bundle's ΔW per module, as Pivotal computes it
(:meth:`pivotal.adapters.lora_layers.LoraModule.delta_weights`, DoRA's decomposition on the
model's own weights included), written as a *plain* kohya LoRA whose ``up @ down`` is that ΔW.

A ΔW of low numerical rank (LoHa's has rank <= r², LoKr's the product of its factors' ranks) is
written as LoRA factors from its SVD (singular values under 1e-6 of the largest are float32
noise): ``up = U·S``, ``down = Vᵀ``, alpha = the kept rank, so the webui's scale is 1.0. A ΔW of
(nearly) full rank (DoRA's) is written whole as a ``.diff`` key (the webuis' "full" network
type), in ``full_dtype`` (float16 halves a full-size model's file). The webui then draws the
algorithm's keys (its own LoHa / LoKr / DoRA math) and this file; both merge into the same
weights up to float rounding.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any


def plain_lora(module: str, delta: Any, full_dtype: Any = None) -> dict[str, Any]:
    """kohya tensors of ``module`` that add ``delta`` (out, in) or (out, in, k, k): LoRA factors whose
    ``up @ down`` is ``delta`` when that is smaller than ``delta``, else ``delta`` as ``.diff``."""
    import torch

    out = delta.shape[0]
    flat = delta.detach().reshape(out, -1).double()
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    keep = max(1, int((s > s[0] * 1e-6).sum())) if float(s[0]) > 0 else 1
    if keep * sum(flat.shape) >= flat.numel():
        return {f"{module}.diff": delta.detach().to(full_dtype or torch.float32).contiguous()}
    up, down = (u[:, :keep] * s[:keep]).float(), vh[:keep].float()
    if delta.dim() == 4:  # a k x k conv: down is the conv, up a 1 x 1 one
        up, down = up.reshape(out, keep, 1, 1), down.reshape(keep, *delta.shape[1:])
    return {f"{module}.lora_up.weight": up.contiguous(), f"{module}.lora_down.weight": down.contiguous(),
            f"{module}.alpha": torch.tensor(float(keep))}


def pivotal_delta_as_lora(bundle_path: str, targets: list, dst: Path, full_dtype: Any = None) -> Path:
    """The bundle's ΔW as Pivotal computes it on ``targets`` (the host's LoRA targets: the model's
    own weights), written to ``dst`` with the bundle's own ``bundle_emb.*`` tensors (copied as
    they are: the prompt's embedding names mean the same vectors) — by safetensors, not by
    Pivotal's writer, which writes no ``.diff`` key."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from pivotal.adapters.network import LoraNetwork
    from pivotal.formats.bundle import read_bundle

    bundle = read_bundle(bundle_path)
    net, report = LoraNetwork.from_kohya_state_dict(targets, bundle.lora)
    assert not report.unmatched, report.unmatched[:5]
    tensors: dict[str, Any] = {}
    for module in net.modules_of():
        for name, delta in module.delta_weights().items():
            tensors.update(plain_lora(name, delta, full_dtype))
    with safe_open(bundle_path, "pt") as f:
        tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith("bundle_emb.")})
        kept = ("ss_base_model_version", "modelspec.architecture")
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k in kept}
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def png_array(png: bytes) -> Any:
    """An RGB picture as an int16 array (differences do not wrap)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
