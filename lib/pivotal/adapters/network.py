"""A set of LoRA modules over one or more model parts, attached and detached together."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from pivotal.adapters.lora_layers import LoraConv2d, LoraLinear, LoraModule, is_linear_like, part_of_key
from pivotal.adapters.lora_mha import MHA_PROJECTIONS, LoraMultiheadAttention
from pivotal.errors import LoraTargetError

#: (full kohya key, host module) as returned by the target finders.
Target = tuple[str, nn.Module]


@dataclass
class LoadReport:
    """What loading a kohya state dict matched. ``unmatched``: file keys no module claimed;
    ``missing``: network modules the file had no tensors for (they stay a no-op)."""

    matched: int = 0
    unmatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def kohya_module_names(module: LoraModule) -> list[str]:
    """The kohya module names (key before the first '.') this module reads and writes."""
    if isinstance(module, LoraMultiheadAttention):
        return [f"{module.key}_{p}" for p in MHA_PROJECTIONS]
    return [module.key]


def create_lora_module(key: str, host: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> LoraModule:
    """The LoRA module for ``host``'s type; LoraTargetError for a type that has none."""
    if is_linear_like(host):
        return LoraLinear(key, host, rank, alpha, dropout)
    if isinstance(host, nn.Conv2d):
        return LoraConv2d(key, host, rank, alpha, dropout)
    if isinstance(host, nn.MultiheadAttention):
        return LoraMultiheadAttention(key, host, rank, alpha, dropout)
    raise LoraTargetError(f"{key}: no LoRA layer for module type {type(host).__name__} "
                          "(supported: Linear, Conv2d, MultiheadAttention)")


class LoraNetwork(nn.Module):
    """LoRA modules keyed by kohya name, with a strength multiplier per part.

    ``parameters()`` yields only LoRA tensors. The host modules are never children of this one.
    """

    def __init__(self, targets: Sequence[Target], rank: int, alpha: float, dropout: float = 0.0,
                 ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None) -> None:
        """``ranks`` / ``alphas``: per-key overrides (used when building from a file)."""
        super().__init__()
        if not targets:
            raise LoraTargetError("no LoRA targets given: the chosen preset matched no module")
        self.lora_modules = nn.ModuleDict()
        for key, host in targets:
            if key in self.lora_modules:
                raise LoraTargetError(f"duplicate LoRA key {key!r}")
            r = (ranks or {}).get(key, rank)
            a = (alphas or {}).get(key, alpha)
            self.lora_modules[key] = create_lora_module(key, host, r, a, dropout)
        self.multipliers: dict[str, float] = {}

    # -- construction from a file ------------------------------------------------------------
    @classmethod
    def from_kohya_state_dict(cls, targets: Sequence[Target], tensors: dict[str, torch.Tensor],
                              dropout: float = 0.0) -> tuple["LoraNetwork", LoadReport]:
        """Build a network with each module's rank and alpha read from ``tensors``, then load it.

        Targets the file has no tensors for are left out. Zero matches is an error, not a
        silent no-op.
        """
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        present = []
        for key, host in targets:
            name = f"{key}_q_proj" if isinstance(host, nn.MultiheadAttention) else key
            down = tensors.get(f"{name}.lora_down.weight")
            if down is None:
                continue
            ranks[key] = int(down.shape[0])
            alpha = tensors.get(f"{name}.alpha")
            alphas[key] = float(alpha.float().item()) if alpha is not None else float(down.shape[0])
            present.append((key, host))
        if not present:
            sample = ", ".join(sorted({k.split(".", 1)[0] for k in tensors})[:5])
            raise LoraTargetError(f"none of the file's LoRA modules matches this model "
                                  f"(first file modules: {sample or 'none'})")
        net = cls(present, rank=1, alpha=1.0, dropout=dropout, ranks=ranks, alphas=alphas)
        report = net.load_kohya_state_dict(tensors)
        return net, report

    # -- parts and strength ------------------------------------------------------------------
    def modules_of(self, part: str | None = None) -> Iterator[LoraModule]:
        for m in self.lora_modules.values():
            if part is None or m.part == part:
                yield m  # type: ignore[misc]

    @property
    def parts(self) -> list[str]:
        return sorted({m.part for m in self.modules_of()})

    def set_multiplier(self, part: str, value: float) -> None:
        """Strength for one part ("unet", "te", "te1", "te2"); 0 switches it off."""
        if part not in self.parts:
            raise LoraTargetError(f"this LoRA has no part {part!r} (it has: {', '.join(self.parts)})")
        self.multipliers[part] = float(value)
        for m in self.modules_of(part):
            m.multiplier = float(value)

    # -- attach / detach ---------------------------------------------------------------------
    def attach(self) -> None:
        """Attach every module; if one fails, the ones already attached are detached again."""
        done: list[LoraModule] = []
        try:
            for m in self.modules_of():
                m.attach()
                done.append(m)
        except BaseException:
            for m in reversed(done):
                m.detach()
            raise

    def detach(self) -> None:
        for m in self.modules_of():
            m.detach()

    @contextlib.contextmanager
    def attached(self) -> Iterator["LoraNetwork"]:
        """``with net.attached(): ...`` — detached again however the block ends."""
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    # -- kohya state dict ----------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """All tensors under kohya keys, on CPU, contiguous, optionally cast (alpha stays fp32)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules_of():
            for k, t in m.kohya_state_dict().items():
                t = t.detach().to("cpu")
                if dtype is not None and not k.endswith(".alpha"):
                    t = t.to(dtype)
                out[k] = t.contiguous()
        return out

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> LoadReport:
        """Copy matching tensors in. Zero matches raises; unmatched keys are reported."""
        owner: dict[str, LoraModule] = {}
        for m in self.modules_of():
            for name in kohya_module_names(m):
                owner[name] = m
        by_module: dict[LoraModule, dict[str, torch.Tensor]] = {}
        report = LoadReport()
        for k, t in tensors.items():
            m = owner.get(k.split(".", 1)[0])
            if m is None:
                report.unmatched.append(k)
            else:
                by_module.setdefault(m, {})[k] = t
        if not by_module:
            raise LoraTargetError(f"none of the {len(tensors)} LoRA tensors matches this network "
                                  f"(first keys: {', '.join(sorted(tensors)[:5])})")
        for m in self.modules_of():
            if m in by_module:
                report.matched += len(m.load_kohya_state_dict(by_module[m]))
            else:
                report.missing.append(m.key)
        report.unmatched.sort()
        return report


def count_parts(keys: Sequence[str]) -> dict[str, int]:
    """Number of kohya *modules* per part among tensor ``keys``."""
    names = {k.split(".", 1)[0] for k in keys}
    counts: dict[str, int] = {}
    for n in names:
        p = part_of_key(n)
        counts[p] = counts.get(p, 0) + 1
    return counts
