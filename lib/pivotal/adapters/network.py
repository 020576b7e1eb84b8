"""A set of adapters (LoRA or another algorithm) over one or more model parts, attached and
detached together, saved and loaded under kohya keys."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from pivotal.adapters.algorithms import AlgorithmSpec
from pivotal.adapters.kohya_keys import count_parts, group_by_module, split_key
from pivotal.adapters.layer_kinds import layer_kind_of
from pivotal.adapters.lora_layers import LoraModule, create_lora_module
from pivotal.errors import LoraTargetError

__all__ = ["Target", "LoadReport", "LoraNetwork", "create_lora_module", "count_parts", "kohya_module_names"]

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
    return module.module_names()


class LoraNetwork(nn.Module):
    """Adapter modules keyed by kohya name, with a strength multiplier per part.

    ``parameters()`` yields only adapter tensors. The host modules are never children of this one.
    """

    def __init__(self, targets: Sequence[Target], rank: int, alpha: float, dropout: float = 0.0,
                 ranks: dict[str, int] | None = None, alphas: dict[str, float] | None = None,
                 spec: AlgorithmSpec | None = None, specs: Mapping[str, AlgorithmSpec] | None = None) -> None:
        """``ranks`` / ``alphas`` / ``specs``: per-key overrides of ``rank`` / ``alpha`` / ``spec``
        (the algorithm; plain LoRA when None)."""
        super().__init__()
        if not targets:
            raise LoraTargetError("no LoRA targets given: the chosen preset matched no module")
        modules = []
        for key, host in targets:
            r = (ranks or {}).get(key, rank)
            a = (alphas or {}).get(key, alpha)
            modules.append(create_lora_module(key, host, r, a, dropout, (specs or {}).get(key, spec)))
        self._add(modules)

    def _add(self, modules: Sequence[LoraModule]) -> None:
        self.lora_modules = nn.ModuleDict()
        for m in modules:
            if m.key in self.lora_modules:
                raise LoraTargetError(f"duplicate LoRA key {m.key!r}")
            self.lora_modules[m.key] = m
        self.multipliers: dict[str, float] = {}

    @classmethod
    def from_modules(cls, modules: Sequence[LoraModule]) -> "LoraNetwork":
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._add(modules)
        return net

    # -- construction from a file ------------------------------------------------------------
    @classmethod
    def from_kohya_state_dict(cls, targets: Sequence[Target], tensors: dict[str, torch.Tensor],
                              dropout: float = 0.0) -> tuple["LoraNetwork", LoadReport]:
        """Build a network whose modules (algorithm, rank, alpha, layout) are read from
        ``tensors``, then load it.

        Targets the file has no tensors for are left out. Zero matches is an error, not a
        silent no-op.
        """
        groups = group_by_module(tensors)
        modules = []
        for key, host in targets:
            names = [key + s for s in layer_kind_of(key, host).weight_suffixes()]
            if not any(n in groups for n in names):
                continue
            modules.append(LoraModule.from_kohya_tensors(key, host, {k: t for k, t in tensors.items()
                                                                      if split_key(k)[0] in names}, dropout))
        if not modules:
            sample = ", ".join(sorted(groups)[:5])
            raise LoraTargetError(f"none of the file's LoRA modules matches this model "
                                  f"(first file modules: {sample or 'none'})")
        net = cls.from_modules(modules)
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
        """All tensors under kohya keys, on CPU, contiguous, optionally cast (alpha and
        dora_scale stay fp32)."""
        out: dict[str, torch.Tensor] = {}
        for m in self.modules_of():
            out.update(m.kohya_state_dict(dtype))
        return out

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> LoadReport:
        """Copy matching tensors in. Zero matches raises; unmatched keys are reported."""
        owner: dict[str, LoraModule] = {}
        for m in self.modules_of():
            for name in m.module_names():
                owner[name] = m
        by_module: dict[LoraModule, dict[str, torch.Tensor]] = {}
        report = LoadReport()
        for k, t in tensors.items():
            found = owner.get(split_key(k)[0])
            if found is None:
                report.unmatched.append(k)
            else:
                by_module.setdefault(found, {})[k] = t
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
