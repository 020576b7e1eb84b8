"""LoRA (kohya ``networks.lora``) and LoCon, with LyCORIS' optional Tucker core for k×k convs.

Tensors (after ``<module>.``):

* ``lora_down.weight``: ``(r, in)`` for a Linear; ``(r, in, kh, kw)`` for a Conv2d (kohya LoCon:
  the down conv carries the host's kernel, stride and padding); ``(r, in, 1, 1)`` with Tucker;
* ``lora_up.weight``: ``(out, r)``; ``(out, r, 1, 1)`` for a Conv2d;
* ``lora_mid.weight`` (Tucker only): ``(r, r, kh, kw)``, the core that carries the kernel;
* ``alpha``: scale = alpha / r (no alpha: scale 1).

ΔW = scale · up @ down; with Tucker ``ΔW[i, j, :, :] = scale · Σ up[i, n] mid[n, m, :, :] down[m, j]``
(A1111 ``lyco_helpers.rebuild_cp_decomposition``, Forge's ``lora`` patch with ``mid``). The forward
contribution never builds ΔW: ``up(dropout(down(x)))`` (with Tucker ``up(mid(down(x)))``, the
geometry on the mid conv), which is also why only LoRA supports activation dropout. When folded
into a weight (packed attention), dropout is rank dropout: a random subset of the r rows of down.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from pivotal.adapters.algorithms.base import Algorithm, ModuleLayout, kaiming, read_alpha, read_dora
from pivotal.adapters.algorithms.registry import register_algorithm
from pivotal.adapters.layer_kinds import LayerKind

DOWN, UP, MID = "lora_down.weight", "lora_up.weight", "lora_mid.weight"


@register_algorithm
class LoRA(Algorithm):
    name = "lora"
    tensor_names = (DOWN, UP, MID)
    option_names = ("tucker",)
    supports_dropout = True

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, dropout: float = 0.0,
                 tucker: bool = False) -> None:
        super().__init__(shape, rank, alpha, dropout)
        out, inp, *kernel = self.shape
        # Tucker only means something for a kernel larger than 1x1 (LyCORIS' rule).
        self.tucker = bool(tucker and kernel and math.prod(kernel) != 1)
        down: tuple[int, ...]
        up: tuple[int, ...]
        if not kernel:
            down, up = (rank, inp), (out, rank)
        elif self.tucker:
            down, up = (rank, inp, 1, 1), (out, rank, 1, 1)
        else:
            down, up = (rank, inp, *kernel), (out, rank, 1, 1)
        # kohya / PEFT convention: down random, up zero, so a fresh LoRA is an exact no-op.
        self.down = nn.Parameter(kaiming(down))
        self.mid = nn.Parameter(kaiming((rank, rank, *kernel))) if self.tucker else None
        self.up = nn.Parameter(torch.zeros(up))

    def own_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {DOWN: self.down, UP: self.up}
        if self.mid is not None:
            out[MID] = self.mid
        return out

    # -- math ----------------------------------------------------------------------------------
    def raw_delta(self) -> torch.Tensor:
        down = self.down.reshape(self.rank, -1)
        if self.dropout and self.training:
            keep = torch.rand(self.rank, 1, device=down.device) >= self.dropout
            down = down * keep.to(down.dtype) / (1.0 - self.dropout)
        up = self.up.reshape(self.up.shape[0], self.rank)
        if self.mid is None:
            return up @ down
        return torch.einsum("n m k l, i n, m j -> i j k l", self.mid, up, down)

    def forward_delta(self, x: torch.Tensor, kind: LayerKind, host: nn.Module) -> torch.Tensor:
        if self.dora_scale is not None:
            return super().forward_delta(x, kind, host)
        # Train in the LoRA's own dtype (fp32 master weights); the kind casts the result back.
        x = x.to(self.down.dtype)
        if self.mid is None:
            h = kind.apply(host, x, self.down)
        else:
            h = kind.apply(host, kind.pointwise(x, self.down), self.mid)
        if self.dropout and self.training:
            h = F.dropout(h, p=self.dropout)
        return kind.pointwise(h, self.up) * self.scale

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def detect(cls, names: set[str]) -> bool:
        return bool(names & {DOWN, UP, MID})

    @classmethod
    def layout(cls, tensors: Mapping[str, torch.Tensor]) -> ModuleLayout:
        down, up, mid = tensors.get(DOWN), tensors.get(UP), tensors.get(MID)
        if down is None or up is None:
            raise ValueError(f"LoRA module lacks {DOWN if down is None else UP}")
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise ValueError(f"lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} are not "
                             "a Linear or Conv2d pair")
        rank = int(down.shape[0])
        if up.shape[1] != rank:
            raise ValueError(f"rank mismatch: lora_down has {rank} rows, lora_up {up.shape[1]} columns")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise ValueError(f"lora_up {tuple(up.shape)} must be a 1x1 conv")
        if mid is not None:
            if down.dim() != 4 or mid.dim() != 4 or tuple(mid.shape[:2]) != (rank, rank) \
                    or tuple(down.shape[2:]) != (1, 1):
                raise ValueError(f"lora_mid {tuple(mid.shape)} with lora_down {tuple(down.shape)} is not a "
                                 f"Tucker core: expected ({rank}, {rank}, kh, kw) and a 1x1 down")
            mid_kernel = tuple(int(s) for s in mid.shape[2:])
            kernel: tuple[int, ...] | None = mid_kernel
            in_numel = int(down.shape[1]) * math.prod(mid_kernel)
        else:
            kernel = tuple(int(s) for s in down.shape[2:]) or None
            in_numel = int(down[0].numel())
        out = int(up.shape[0])
        alpha = read_alpha(tensors)
        return ModuleLayout(cls.name, rank, alpha, alpha / rank if alpha is not None else 1.0, out, in_numel,
                            kernel, read_dora(tensors, out, in_numel), {"tucker": mid is not None})
