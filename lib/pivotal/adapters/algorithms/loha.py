"""LoHa (LyCORIS): the Hadamard product of two low-rank products.

Tensors (after ``<module>.``), as LyCORIS writes them and A1111 (``network_hada.py``) and Forge
(``loha`` patch) read them, for a host weight ``(out, in[, kh, kw])`` and rank r:

* plain: ``hada_w1_a`` / ``hada_w2_a`` ``(out, r)``, ``hada_w1_b`` / ``hada_w2_b`` ``(r, in·kh·kw)``;
  ``ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)``, reshaped to the host weight;
* Tucker (a k×k conv): ``hada_w1_a`` / ``hada_w2_a`` ``(r, out)``, ``hada_w1_b`` / ``hada_w2_b``
  ``(r, in)``, ``hada_t1`` / ``hada_t2`` ``(r, r, kh, kw)``;
  ``W_i[p, q, :, :] = Σ t_i[a, b, :, :] w_i_a[a, p] w_i_b[b, q]`` and ``ΔW = scale · W_1 ⊙ W_2``;
* ``alpha``: scale = alpha / r with r = ``hada_w1_b.shape[0]`` (no alpha: scale 1).

Initialisation as LyCORIS: ``w1_b``, ``w2_b`` ~ N(0, 1), ``w1_a`` ~ N(0, 0.1), ``w2_a`` = 0 (so a
fresh LoHa is an exact no-op), Tucker cores ~ N(0, 0.1).
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from pivotal.adapters.algorithms.base import Algorithm, ModuleLayout, read_alpha, read_dora
from pivotal.adapters.algorithms.registry import register_algorithm

W1A, W1B, W2A, W2B, T1, T2 = "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"


def _normal(shape: tuple[int, ...], std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape) * std)


@register_algorithm
class LoHa(Algorithm):
    name = "loha"
    tensor_names = (W1A, W1B, W2A, W2B, T1, T2)
    option_names = ("tucker",)

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, dropout: float = 0.0,
                 tucker: bool = False) -> None:
        super().__init__(shape, rank, alpha, dropout)
        out, inp, *kernel = self.shape
        self.tucker = bool(tucker and kernel and math.prod(kernel) != 1)
        if self.tucker:
            a, b = (rank, out), (rank, inp)
        else:
            a, b = (out, rank), (rank, inp * math.prod(kernel))
        self.w1_b = _normal(b, 1.0)
        self.w1_a = _normal(a, 0.1)
        self.w2_b = _normal(b, 1.0)
        self.w2_a = nn.Parameter(torch.zeros(a))
        self.t1 = _normal((rank, rank, *kernel), 0.1) if self.tucker else None
        self.t2 = _normal((rank, rank, *kernel), 0.1) if self.tucker else None

    def own_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {W1A: self.w1_a, W1B: self.w1_b, W2A: self.w2_a, W2B: self.w2_b}
        if self.t1 is not None and self.t2 is not None:
            out[T1], out[T2] = self.t1, self.t2
        return out

    def raw_delta(self) -> torch.Tensor:
        if self.t1 is None or self.t2 is None:
            return (self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)
        return _tucker(self.t1, self.w1_a, self.w1_b) * _tucker(self.t2, self.w2_a, self.w2_b)

    @classmethod
    def detect(cls, names: set[str]) -> bool:
        return bool(names & set(cls.tensor_names))

    @classmethod
    def layout(cls, tensors: Mapping[str, torch.Tensor]) -> ModuleLayout:
        missing = [n for n in (W1A, W1B, W2A, W2B) if n not in tensors]
        if missing:
            raise ValueError(f"LoHa module lacks {', '.join(missing)}")
        w1a, w1b, w2a, w2b = (tensors[n] for n in (W1A, W1B, W2A, W2B))
        t1, t2 = tensors.get(T1), tensors.get(T2)
        if (t1 is None) != (t2 is None):
            raise ValueError("LoHa module has one of hada_t1 / hada_t2 but not the other")
        if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)):
            raise ValueError("hada_w1_a/_b and hada_w2_a/_b must be matrices")
        rank = int(w1b.shape[0])
        if t1 is None or t2 is None:
            if w1a.shape[1] != rank or w2a.shape != w1a.shape or w2b.shape != w1b.shape:
                raise ValueError(f"LoHa factor shapes do not agree: w1_a {tuple(w1a.shape)}, w1_b "
                                 f"{tuple(w1b.shape)}, w2_a {tuple(w2a.shape)}, w2_b {tuple(w2b.shape)}")
            out, in_numel, kernel = int(w1a.shape[0]), int(w1b.shape[1]), None
        else:
            if t1.dim() != 4 or t1.shape != t2.shape or tuple(t1.shape[:2]) != (rank, rank) \
                    or w1a.shape[0] != rank or w2a.shape != w1a.shape or w2b.shape != w1b.shape:
                raise ValueError(f"LoHa Tucker shapes do not agree: t1 {tuple(t1.shape)}, w1_a {tuple(w1a.shape)}, "
                                 f"w1_b {tuple(w1b.shape)}")
            kernel = tuple(int(s) for s in t1.shape[2:])
            out, in_numel = int(w1a.shape[1]), int(w1b.shape[1]) * math.prod(kernel)
        alpha = read_alpha(tensors)
        return ModuleLayout(cls.name, rank, alpha, alpha / rank if alpha is not None else 1.0, out, in_numel,
                            kernel, read_dora(tensors, out, in_numel), {"tucker": t1 is not None})


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(r, r, kh, kw)`` core × ``a`` (r, out) × ``b`` (r, in) → ``(out, in, kh, kw)``."""
    return torch.einsum("i j k l, i p, j r -> p r k l", t, a, b)
