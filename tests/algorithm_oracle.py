"""The reference math for LoRA-family files, for the algorithm tests.

The tensor products come from LyCORIS' ``functional`` package (``lycoris-lora``, the reference
implementation); the rules *around* them — which rank divides alpha, when the scale is 1, how
DoRA and the strength combine — are the ones A1111 1.10.1 (``extensions-builtin/Lora/network*.py``)
and Forge (``backend/patcher/lora.py``) apply, written out here from their documented behaviour.
Nothing here calls Pivotal.
"""

from __future__ import annotations

import pytest
import torch

lycoris = pytest.importorskip("lycoris", reason="lycoris-lora (the reference implementation) is not installed")
from lycoris.functional import general as ly_general  # noqa: E402
from lycoris.functional import locon as ly_locon  # noqa: E402
from lycoris.functional import loha as ly_loha  # noqa: E402
from lycoris.functional import lokr as ly_lokr  # noqa: E402


def webui_scale(t: dict[str, torch.Tensor], dim: int | None) -> float:
    """A1111 ``NetworkModule.calc_scale`` / Forge: alpha / dim, or 1 without alpha or dim."""
    alpha = t.get("alpha")
    return float(alpha) / dim if (alpha is not None and dim) else 1.0


def reference_delta(t: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """ΔW (scale applied, no DoRA, no strength) of one module's tensors, host weight ``weight_shape``."""
    if "lora_down.weight" in t:
        down, up, mid = t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight")
        delta = ly_locon.diff_weight(down, up, mid, gamma=webui_scale(t, down.shape[0]))
    elif "hada_w1_a" in t:
        scale = torch.tensor(webui_scale(t, t["hada_w1_b"].shape[0]))
        delta = ly_loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"],
                                    t.get("hada_t1"), t.get("hada_t2"), gamma=scale)
    elif any(k.startswith("lokr_") for k in t):
        dim = None
        if "lokr_w1_b" in t:
            dim = t["lokr_w1_b"].shape[0]
        if "lokr_w2_b" in t:
            dim = t["lokr_w2_b"].shape[0]
        delta = ly_lokr.kron_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                    t.get("lokr_w2_a"), t.get("lokr_w2_b"), t.get("lokr_t2"),
                                    scale=webui_scale(t, dim))
    else:
        raise AssertionError(f"no reference for tensors {sorted(t)}")
    return delta.reshape(weight_shape)


def reference_weight(t: dict[str, torch.Tensor], weight: torch.Tensor, strength: float) -> torch.Tensor:
    """The host weight as the webuis leave it after applying the module at ``strength``."""
    delta = reference_delta(t, tuple(weight.shape))
    if "dora_scale" in t:
        return ly_general.apply_dora_scale(weight, delta, t["dora_scale"], strength)
    return weight + strength * delta
