"""Adapters that attach to a host model without replacing any of its modules.

One wrapper, :class:`LoraModule`, for every algorithm and every layer kind: it holds the
algorithm module(s) (one per host weight: one for a Linear or Conv2d, four for a packed
MultiheadAttention) and the host's :class:`~pivotal.adapters.layer_kinds.LayerKind`.

Attaching sets an instance attribute ``forward`` on the host module that calls the host's own
forward and lets the kind add the delta. Detaching deletes that attribute again. The host module
keeps its identity, its parameters, its hooks and its ``state_dict``; adapter parameters live in
this module, never in the host's. That is what lets the webui's model come back bit-identical.

:func:`create_lora_module` builds one for training; :meth:`LoraModule.from_kohya_tensors` from a
file's tensors. ``LoraLinear`` / ``LoraConv2d`` / ``LoraMultiheadAttention`` are plain LoRA on
each kind, kept as short names.
"""

from __future__ import annotations

from typing import Callable, Mapping, cast

import torch
from torch import nn

from pivotal.adapters.algorithms import FULL_PRECISION, Algorithm, AlgorithmSpec, algorithm_class
from pivotal.adapters.algorithms import describe_module as _describe
from pivotal.adapters.kohya_keys import PART_PREFIXES, group_by_module, part_of_key
from pivotal.adapters.layer_kinds import LayerKind, LinearKind, layer_kind_of
from pivotal.errors import LoraTargetError

__all__ = ["PART_PREFIXES", "LoraModule", "LoraLinear", "LoraConv2d", "LoraMultiheadAttention",
           "create_lora_module", "part_of_key", "is_linear_like"]


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, or a module that computes one without subclassing it (Forge's
    ``ForgeOperations.Linear``): see :class:`~pivotal.adapters.layer_kinds.LinearKind`."""
    return LinearKind.matches(module)


class LoraModule(nn.Module):
    """The adapter on one host module: algorithm(s) + layer kind, attachable and detachable.

    ``multiplier`` is the user's strength (per part, set by the network).
    """

    def __init__(self, key: str, host: nn.Module, kind: LayerKind, algorithms: list[Algorithm]) -> None:
        super().__init__()
        if len(algorithms) != len(kind.weight_suffixes()):
            raise LoraTargetError(f"{key}: a {kind.name} layer needs {len(kind.weight_suffixes())} "
                                  f"algorithm module(s), got {len(algorithms)}")
        self.key = key
        self.part = part_of_key(key)
        self.kind = kind
        self.algorithms = nn.ModuleList(algorithms)
        self.multiplier = 1.0
        # A list, not an attribute, so nn.Module does not register the host as our child:
        # our state_dict / parameters() must hold only adapter tensors.
        self._host: list[nn.Module] = [host]
        self._saved_forward: list[Callable[..., torch.Tensor] | None] = []
        self._attached = False

    @classmethod
    def from_kohya_tensors(cls, key: str, host: nn.Module, tensors: Mapping[str, torch.Tensor],
                           dropout: float = 0.0) -> "LoraModule":
        """The module a file's tensors (full kohya keys of this host's module names) describe."""
        kind = layer_kind_of(key, host)
        groups = group_by_module(dict(tensors))
        algos = []
        for suffix, shape in zip(kind.weight_suffixes(), kind.weight_shapes(host)):
            name = key + suffix
            parts = groups.get(name)
            if not parts:
                raise LoraTargetError(f"{key}: the file has no tensors for {name}")
            try:
                algo_cls = _describe_class(parts)
            except ValueError as e:
                raise LoraTargetError(f"{name}: {e}") from None
            algos.append(algo_cls.from_tensors(name, shape, parts, dropout))
        return cls(key, host, kind, algos)

    # -- properties ----------------------------------------------------------------------------
    @property
    def host(self) -> nn.Module:
        return self._host[0]

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def algorithm(self) -> Algorithm:
        """The algorithm module of a one-weight layer (the first one of a packed attention)."""
        return self.algorithms[0]  # type: ignore[return-value]

    @property
    def rank(self) -> int:
        return self.algorithm.rank

    @property
    def alpha(self) -> float:
        return self.algorithm.alpha

    @property
    def scale(self) -> float:
        return self.algorithm.scale

    @property
    def dropout(self) -> float:
        """The largest activation dropout of its algorithm modules (0 when none drops out)."""
        return max(float(getattr(a, "dropout", 0.0)) for a in self.algorithms)

    def module_names(self) -> list[str]:
        """The kohya module names (key before the first '.') this adapter reads and writes."""
        return [self.key + s for s in self.kind.weight_suffixes()]

    def delta_weights(self) -> dict[str, torch.Tensor]:
        """{kohya module name: ΔW} at multiplier 1, each shaped like its host weight."""
        hosts = self.kind.host_weights(self.host)
        algorithms = cast(list[Algorithm], list(self.algorithms))  # nn.ModuleList is typed as holding Modules
        return {n: a.delta_weight(w) for n, a, w in zip(self.module_names(), algorithms, hosts)}

    # -- attach / detach ---------------------------------------------------------------------
    def attach(self) -> None:
        """Route the host's forward through this module. Refuses to stack on another adapter."""
        host = self.host
        if self._attached or getattr(host, "_pivotal_lora", None) is not None:
            raise LoraTargetError(f"{self.key}: a Pivotal LoRA is already attached to this module")
        # An instance-level forward set by someone else (e.g. another extension) is kept and
        # called, and put back on detach.
        self._saved_forward = [host.__dict__.get("forward")]
        base_forward = host.forward
        kind = self.kind

        def forward(*args, **kwargs):
            return kind.forward(self, base_forward, args, kwargs)

        host.forward = forward
        # object.__setattr__: nn.Module.__setattr__ would register us as the host's child and
        # change its state_dict.
        object.__setattr__(host, "_pivotal_lora", self)
        self._attached = True

    def detach(self) -> None:
        """Undo :meth:`attach` exactly (idempotent)."""
        if not self._attached:
            return
        host = self.host
        previous = self._saved_forward[0]
        del host.forward
        if previous is not None:
            host.forward = previous
        del host.__dict__["_pivotal_lora"]
        self._attached = False

    # -- kohya tensors -------------------------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Tensors under full kohya keys, on CPU and contiguous; ``dtype`` casts all but alpha
        and dora_scale."""
        out: dict[str, torch.Tensor] = {}
        for name, algo in zip(self.module_names(), self.algorithms):
            for tname, t in algo.tensors().items():  # type: ignore[operator]
                t = t.detach().to("cpu")
                if dtype is not None and tname not in FULL_PRECISION:
                    t = t.to(dtype)
                out[f"{name}.{tname}"] = t.contiguous()
        return out

    def load_kohya_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """Copy tensors in (full kohya keys); return the keys used. LoraTargetError names the key
        that is missing or does not fit."""
        groups = group_by_module(dict(tensors))
        used: set[str] = set()
        for name, algo in zip(self.module_names(), self.algorithms):
            parts = groups.get(name, {})
            used |= {f"{name}.{t}" for t in algo.load_tensors(name, parts)}  # type: ignore[operator]
        return used


def _describe_class(parts: Mapping[str, torch.Tensor]) -> type[Algorithm]:
    return algorithm_class(_describe(parts).algorithm)


def create_lora_module(key: str, host: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                       spec: AlgorithmSpec | None = None) -> LoraModule:
    """A fresh adapter for ``host`` (its layer kind detected) with ``spec``'s algorithm (LoRA by
    default); LoraTargetError for a layer no kind supports."""
    kind = layer_kind_of(key, host)
    spec = spec or AlgorithmSpec()
    cls = algorithm_class(spec.name)
    algos = [cls.create(shape, rank, alpha, dropout, spec, host_weight=w)
             for shape, w in zip(kind.weight_shapes(host), kind.host_weights(host))]
    return LoraModule(key, host, kind, algos)


def LoraLinear(key: str, host: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> LoraModule:
    """Plain LoRA on a Linear: down (rank, in), up (out, rank)."""
    return create_lora_module(key, host, rank, alpha, dropout)


def LoraConv2d(key: str, host: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> LoraModule:
    """Plain LoRA on a Conv2d: down (rank, in, kh, kw) with the host's geometry, up (out, rank, 1, 1)."""
    return create_lora_module(key, host, rank, alpha, dropout)


def LoraMultiheadAttention(key: str, host: nn.MultiheadAttention, rank: int, alpha: float,
                           dropout: float = 0.0) -> LoraModule:
    """Plain LoRA on q/k/v/out of a packed MultiheadAttention, saved as four kohya modules."""
    return create_lora_module(key, host, rank, alpha, dropout)
