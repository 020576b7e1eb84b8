"""DoRA (weight-decomposed low-rank adaptation) as the webuis' built-in loaders apply it.

A DoRA module stores ``dora_scale``, a magnitude per *input* column of the host weight: shape
``(1, in)`` for a Linear, ``(1, in, 1, 1)`` for a Conv2d. With the algorithm's scaled delta ``ΔW``
(``alpha / rank`` already applied) and the user's strength ``m``::

    W' = (W + ΔW) · dora_scale / ‖W + ΔW‖_col        ‖·‖_col: the norm over every axis but 1
    W_applied = W + m · (W' − W)

That is A1111 1.10.1's ``NetworkModule.apply_weight_decompose`` (then ``* multiplier``) and Forge's
``weight_decompose`` for a ``dora_scale`` whose first axis is 1 (Forge adds ``eps`` to the norm;
A1111 does not — the two agree to ~1e-7). They disagree on a ``dora_scale`` of shape
``(out, 1)`` (LyCORIS' ``wd_on_out=True`` default): A1111 still takes column norms (a wrong
picture), Forge takes the *original* weight's row norms. So Pivotal writes and trains the column
convention only, and reads ``(out, 1)`` scales nowhere (refused by name). LyCORIS' own merge
scales the strength differently (``(W + ΔW) · (m · (s/‖·‖ − 1) + 1)``); the two agree at
strength 1, and Pivotal follows the webuis at every strength.
"""

from __future__ import annotations

import torch


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖weight‖ over every axis but 1, shaped ``(1, in, 1, …)`` to broadcast against ``weight``."""
    w = weight.transpose(0, 1).reshape(weight.shape[1], -1)
    n = w.norm(dim=1, keepdim=True)
    return n.reshape(weight.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)


def magnitude_shape(weight_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of ``dora_scale`` for a host weight of ``weight_shape``."""
    return (1, weight_shape[1], *[1] * (len(weight_shape) - 2))


def initial_magnitude(host_weight: torch.Tensor) -> torch.Tensor:
    """``dora_scale`` that makes a fresh DoRA an exact no-op: the host's own column norms (fp32)."""
    return column_norm(host_weight.detach().float())


def decomposed_delta(host_weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """``W' − W`` (see the module docstring) in ``delta``'s dtype and device; same shape as ``W``."""
    w = host_weight.detach().to(device=delta.device, dtype=delta.dtype)
    merged = w + delta.reshape(w.shape)
    # clamp_min only keeps an all-zero column finite (A1111 would give NaN there); any other norm is
    # used as it is, so the result equals A1111's.
    norm = column_norm(merged).clamp_min(torch.finfo(merged.dtype).tiny)
    return merged * (magnitude.to(merged) / norm) - w
