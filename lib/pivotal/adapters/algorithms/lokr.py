"""LoKr (LyCORIS): the Kronecker product of a small and a (low-rank) large factor.

A host weight ``(out, in[, kh, kw])`` is split ``out = a·b``, ``in = c·d`` (LyCORIS'
``factorization(dim, factor)``: a ≤ b, c ≤ d, the smaller part at most ``factor`` when it divides;
-1: as square as possible). ``ΔW = scale · w1 ⊗ w2`` with ``w1`` ``(a, c)`` and ``w2``
``(b, d[, kh, kw])`` (for a conv, ``w1`` is broadcast over the kernel). Tensors, as LyCORIS writes
them and A1111 (``network_lokr.py``) and Forge (``lokr`` patch) read them:

* ``lokr_w1`` ``(a, c)``, or ``lokr_w1_a`` ``(a, r)`` + ``lokr_w1_b`` ``(r, c)`` (``decompose_both``);
* ``lokr_w2`` ``(b, d[, kh, kw])`` (full: when ``r ≥ max(b, d) / 2``), or ``lokr_w2_a`` ``(b, r)`` +
  ``lokr_w2_b`` ``(r, d·kh·kw)``, or with Tucker ``lokr_t2`` ``(r, r, kh, kw)``, ``lokr_w2_a``
  ``(r, b)``, ``lokr_w2_b`` ``(r, d)``;
* ``alpha``: scale = alpha / r with r = ``lokr_w2_b.shape[0]``, else ``lokr_w1_b.shape[0]``; when
  neither half is factorized the scale is **1 whatever alpha says** (both webuis).

Initialisation as LyCORIS: ``w1`` (or its factors) and ``w2_a`` / ``t2`` Kaiming-uniform, ``w2_b``
(or a full ``w2``) zero, so a fresh LoKr is an exact no-op.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from pivotal.adapters.algorithms.base import Algorithm, ModuleLayout, kaiming, read_alpha, read_dora
from pivotal.adapters.algorithms.registry import register_algorithm
from pivotal.errors import LoraTargetError

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B, T2 = "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """``(m, n)`` with ``m·n = dimension``, ``m ≤ n``: ``factor`` itself when it divides, else the
    most balanced split whose smaller part is at most ``factor`` (-1: no bound). LyCORIS' rule."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@register_algorithm
class LoKr(Algorithm):
    name = "lokr"
    tensor_names = (W1, W1A, W1B, W2, W2A, W2B, T2)
    option_names = ("factor", "tucker", "decompose_both", "full_matrix")

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, dropout: float = 0.0,
                 factor: int = -1, tucker: bool = False, decompose_both: bool = False,
                 full_matrix: bool = False, split: tuple[int, int] | None = None,
                 w1_rank: int = 0, w2_mode: str = "") -> None:
        """``factor`` / ``tucker`` / ``decompose_both`` / ``full_matrix``: LyCORIS' options, for
        training. ``split`` (a, c), ``w1_rank`` (0: full w1) and ``w2_mode`` ("full", "lowrank",
        "tucker") rebuild a file's exact layout."""
        super().__init__(shape, rank, alpha, dropout)
        out, inp, *kernel = self.shape
        if split is None:
            a, b = factorization(out, factor)
            c, d = factorization(inp, factor)
            w1_rank = rank if decompose_both and not full_matrix and rank < max(a, c) / 2 else 0
            if full_matrix or rank >= max(b, d) / 2:
                w2_mode = "full"
            elif tucker and kernel and math.prod(kernel) != 1:
                w2_mode = "tucker"
            else:
                w2_mode = "lowrank"
        else:
            a, c = split
            b, d = out // a, inp // c
        self.split = (a, b, c, d)
        self.w2_mode = w2_mode
        ksize = math.prod(kernel)
        self.w1 = nn.Parameter(kaiming((a, c))) if not w1_rank else None
        self.w1_a = nn.Parameter(kaiming((a, w1_rank))) if w1_rank else None
        self.w1_b = nn.Parameter(kaiming((w1_rank, c))) if w1_rank else None
        self.w2: nn.Parameter | None = None
        self.w2_a: nn.Parameter | None = None
        self.w2_b: nn.Parameter | None = None
        self.t2: nn.Parameter | None = None
        if w2_mode == "full":
            self.w2 = nn.Parameter(torch.zeros(b, d, *kernel))
        elif w2_mode == "tucker":
            self.t2 = nn.Parameter(kaiming((rank, rank, *kernel)))
            self.w2_a = nn.Parameter(kaiming((rank, b)))
            self.w2_b = nn.Parameter(torch.zeros(rank, d))
        else:
            self.w2_a = nn.Parameter(kaiming((b, rank)))
            self.w2_b = nn.Parameter(torch.zeros(rank, d * ksize))

    def own_tensors(self) -> dict[str, torch.Tensor]:
        named = {W1: self.w1, W1A: self.w1_a, W1B: self.w1_b, W2: self.w2, W2A: self.w2_a, W2B: self.w2_b,
                 T2: self.t2}
        return {k: v for k, v in named.items() if v is not None}

    @property
    def scale(self) -> float:
        rank = self.w2_b.shape[0] if self.w2_b is not None else (self.w1_b.shape[0] if self.w1_b is not None else 0)
        return self.alpha / rank if rank else 1.0

    def raw_delta(self) -> torch.Tensor:
        a, b, c, d = self.split
        kernel = self.shape[2:]
        w1a, w1b, w2a, w2b = self.w1_a, self.w1_b, self.w2_a, self.w2_b
        w1: torch.Tensor
        w2: torch.Tensor
        if self.w1 is not None:
            w1 = self.w1
        else:
            if w1a is None or w1b is None:  # neither a full nor a low-rank w1: a construction bug
                raise LoraTargetError(f"{self.name}: w1 has neither its full nor its low-rank factors")
            w1 = w1a @ w1b
        if self.w2 is not None:
            w2 = self.w2
        else:
            if w2a is None or w2b is None:  # w2_mode "tucker" or "lowrank" has both
                raise LoraTargetError(f"{self.name}: w2 has neither its full nor its low-rank factors")
            if self.t2 is not None:
                w2 = torch.einsum("i j k l, i p, j r -> p r k l", self.t2, w2a, w2b)
            else:
                w2 = (w2a @ w2b).reshape(b, d, *kernel)
        w1 = w1.reshape(a, c, *[1] * len(kernel))
        return torch.kron(w1, w2.contiguous())

    @classmethod
    def detect(cls, names: set[str]) -> bool:
        return bool(names & set(cls.tensor_names))

    @classmethod
    def layout(cls, tensors: Mapping[str, torch.Tensor]) -> ModuleLayout:
        for name in (W1, W1A, W1B, W2A, W2B):
            t = tensors.get(name)
            if t is not None and t.dim() != 2:
                raise ValueError(f"{name} has shape {tuple(t.shape)}; LoKr factors must be matrices "
                                 "(the webuis multiply them as such)")
        w1, w1a, w1b = tensors.get(W1), tensors.get(W1A), tensors.get(W1B)
        w2, w2a, w2b, t2 = tensors.get(W2), tensors.get(W2A), tensors.get(W2B), tensors.get(T2)
        if w1 is not None:
            a, c = w1.shape
            w1_rank = 0
        elif w1a is not None and w1b is not None:
            if w1a.shape[1] != w1b.shape[0]:
                raise ValueError(f"lokr_w1_a {tuple(w1a.shape)} and lokr_w1_b {tuple(w1b.shape)} do not chain")
            a, c, w1_rank = w1a.shape[0], w1b.shape[1], int(w1b.shape[0])
        else:
            raise ValueError("LoKr module lacks lokr_w1 (or lokr_w1_a + lokr_w1_b)")
        kernel: tuple[int, ...] | None = None
        if w2 is not None:
            if w2.dim() not in (2, 4):
                raise ValueError(f"lokr_w2 has shape {tuple(w2.shape)}")
            b, d_numel, mode, rank = int(w2.shape[0]), int(w2[0].numel()), "full", 0
            kernel = tuple(int(s) for s in w2.shape[2:]) or None
        elif w2a is not None and w2b is not None:
            rank = int(w2b.shape[0])
            if t2 is not None:
                if t2.dim() != 4 or tuple(t2.shape[:2]) != (rank, rank) or w2a.shape[0] != rank:
                    raise ValueError(f"lokr_t2 {tuple(t2.shape)} / lokr_w2_a {tuple(w2a.shape)} / lokr_w2_b "
                                     f"{tuple(w2b.shape)} are not a Tucker layout")
                kernel = tuple(int(s) for s in t2.shape[2:])
                b, d_numel, mode = int(w2a.shape[1]), int(w2b.shape[1]) * math.prod(kernel), "tucker"
            else:
                if w2a.shape[1] != rank:
                    raise ValueError(f"lokr_w2_a {tuple(w2a.shape)} and lokr_w2_b {tuple(w2b.shape)} do not chain")
                b, d_numel, mode = int(w2a.shape[0]), int(w2b.shape[1]), "lowrank"
        else:
            raise ValueError("LoKr module lacks lokr_w2 (or lokr_w2_a + lokr_w2_b)")
        if mode != "tucker" and T2 in tensors:
            raise ValueError("lokr_t2 given without lokr_w2_a / lokr_w2_b")
        scale_rank = rank or w1_rank
        alpha = read_alpha(tensors)
        scale = alpha / scale_rank if (alpha is not None and scale_rank) else 1.0
        out, in_numel = int(a) * b, int(c) * d_numel
        options = {"split": (int(a), int(c)), "w1_rank": w1_rank, "w2_mode": mode}
        return ModuleLayout(cls.name, scale_rank or 1, alpha, scale, out, in_numel,
                            kernel, read_dora(tensors, out, in_numel), options)
