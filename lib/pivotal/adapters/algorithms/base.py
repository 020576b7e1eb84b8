"""The algorithm strategy: what every LoRA-family algorithm owns and answers.

An :class:`Algorithm` adapts *one* host weight of shape ``(out, in[, kh, kw])``. It owns

* its parameters (fp32 master weights, created by ``__init__`` from a rank and options, or by
  :meth:`Algorithm.from_tensors` from a file's tensors);
* its weight delta, :meth:`Algorithm.delta_weight`: a tensor of the host weight's shape, with
  ``alpha / rank`` applied and, when the module has a ``dora_scale``, the DoRA decomposition;
* its forward contribution, :meth:`Algorithm.forward_delta` (default: the delta through the layer
  kind's op; an algorithm may do something cheaper, as LoRA does);
* its tensor names: :attr:`Algorithm.tensor_names` (write / read), :meth:`Algorithm.detect`
  (is this module mine?), :meth:`Algorithm.layout` (rank, alpha and weight shape a file's tensors
  describe, checked without a host), :meth:`Algorithm.tensors` / :meth:`Algorithm.load_tensors`.

``alpha`` and ``dora_scale`` are shared by every algorithm and handled here. The user's strength
(``multiplier``) is not the algorithm's business: the layer kind applies it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from pivotal.adapters.algorithms import dora
from pivotal.adapters.kohya_keys import ALPHA, DORA_SCALE
from pivotal.adapters.layer_kinds import LayerKind
from pivotal.errors import LoraTargetError

#: Tensor names kept in fp32 whatever the save precision: a scalar, and the magnitude whose
#: rounding would change the *whole* host weight (not only the delta).
FULL_PRECISION = (ALPHA, DORA_SCALE)


@dataclass(frozen=True)
class AlgorithmSpec:
    """Which algorithm to train, with its options. Options an algorithm does not take are
    ignored, so one set of settings serves every algorithm."""

    name: str = "lora"
    dora: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ModuleLayout:
    """What one kohya module's tensors describe, read without a host."""

    algorithm: str
    rank: int
    alpha: float | None           # None: the file has no alpha (scale 1, as the webuis read it)
    scale: float                  # the scale the webuis apply
    out_features: int
    in_numel: int                 # elements of one output row: in × kh × kw
    kernel: tuple[int, ...] | None = None   # (kh, kw) when the tensors tell it
    dora: bool = False
    options: dict[str, Any] = field(default_factory=dict)   # constructor options that rebuild it

    @property
    def label(self) -> str:
        return self.algorithm + ("+dora" if self.dora else "")


class Algorithm(nn.Module):
    """Base class. Subclasses set :attr:`name`, :attr:`tensor_names`, :attr:`option_names`, create
    their parameters in ``__init__`` and implement :meth:`raw_delta`, :meth:`detect` and
    :meth:`layout`."""

    #: The name settings, ``pivotal inspect`` and ``ss_network_args`` use ("lora", "loha", …).
    name: ClassVar[str] = ""
    #: Every tensor name (after ``<module>.``) the algorithm writes or reads, ``alpha`` and
    #: ``dora_scale`` excepted.
    tensor_names: ClassVar[tuple[str, ...]] = ()
    #: Keyword options ``__init__`` takes besides shape, rank, alpha and dropout.
    option_names: ClassVar[tuple[str, ...]] = ()
    #: Whether ``dropout`` means something for this algorithm (else it must be 0).
    supports_dropout: ClassVar[bool] = False

    def __init__(self, shape: tuple[int, ...], rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise LoraTargetError(f"LoRA rank must be >= 1, got {rank} (setting: rank)")
        if not 0.0 <= dropout < 1.0:
            raise LoraTargetError(f"LoRA dropout must be in [0, 1), got {dropout} (setting: dropout)")
        if dropout and not self.supports_dropout:
            raise LoraTargetError(f"{self.name}: dropout is not supported by this algorithm "
                                  "(setting: lora_dropout; use 0)")
        if len(shape) not in (2, 4):
            raise LoraTargetError(f"{self.name}: host weight shape {tuple(shape)} is neither Linear nor Conv2d")
        self.shape = tuple(int(s) for s in shape)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.dora_scale: nn.Parameter | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, shape: tuple[int, ...], rank: int, alpha: float, dropout: float = 0.0,
               spec: AlgorithmSpec | None = None, host_weight: torch.Tensor | None = None) -> "Algorithm":
        """A fresh (no-op) module for training, with ``spec``'s options and DoRA."""
        spec = spec or AlgorithmSpec(cls.name)
        options = {k: v for k, v in spec.options.items() if k in cls.option_names}
        algo = cls(shape, rank, alpha, dropout, **options)
        if spec.dora:
            if host_weight is None:
                raise LoraTargetError(f"{cls.name}: DoRA needs the host weight")
            if dropout:
                raise LoraTargetError("DoRA works on the weight, so activation dropout has no place in it "
                                      "(setting: lora_dropout; use 0 with dora)")
            algo.dora_scale = nn.Parameter(dora.initial_magnitude(host_weight))
        return algo

    @classmethod
    def from_tensors(cls, key: str, shape: tuple[int, ...], tensors: Mapping[str, torch.Tensor],
                     dropout: float = 0.0) -> "Algorithm":
        """The module a file's tensors (names without ``<module>.``) describe, for a host weight of
        ``shape``. LoraTargetError naming ``key`` when they do not fit."""
        try:
            lay = cls.layout(tensors)
        except ValueError as e:
            raise LoraTargetError(f"{key}: {e}") from None
        check_fits(key, lay, shape)
        alpha = lay.alpha if lay.alpha is not None else float(lay.rank)
        algo = cls(shape, lay.rank, alpha, dropout if cls.supports_dropout and not lay.dora else 0.0,
                   **lay.options)
        if lay.dora:
            algo.dora_scale = nn.Parameter(torch.zeros(dora.magnitude_shape(algo.shape)))
        algo.load_tensors(key, tensors)
        return algo

    # -- detection and layout (no host needed) -------------------------------------------------
    @classmethod
    def detect(cls, names: set[str]) -> bool:
        """Whether a module with these tensor names is this algorithm's."""
        raise NotImplementedError

    @classmethod
    def layout(cls, tensors: Mapping[str, torch.Tensor]) -> ModuleLayout:
        """Rank, alpha, scale and weight shape the tensors describe; ValueError (a sentence)
        when they are inconsistent."""
        raise NotImplementedError

    # -- tensors -----------------------------------------------------------------------------
    def own_tensors(self) -> dict[str, torch.Tensor]:
        """{tensor name: parameter} of the algorithm's own tensors (no alpha, no dora_scale)."""
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor to save, detached, under its name: own tensors, ``alpha``, ``dora_scale``."""
        out = {k: t.detach() for k, t in self.own_tensors().items()}
        out[ALPHA] = torch.tensor(self.alpha, dtype=torch.float32)
        if self.dora_scale is not None:
            out[DORA_SCALE] = self.dora_scale.detach()
        return out

    def load_tensors(self, key: str, tensors: Mapping[str, torch.Tensor]) -> set[str]:
        """Copy a file's tensors in (a tensor may come in any shape with the same number of
        elements, as the webuis reshape them); return the names used. LoraTargetError names
        ``key.name`` for a missing, unexpected or ill-fitting tensor."""
        params = dict(self.own_tensors())
        if self.dora_scale is not None:
            params[DORA_SCALE] = self.dora_scale
        extra = sorted(set(tensors) - set(params) - {ALPHA})
        if extra:
            raise LoraTargetError(f"{key}: tensor(s) {', '.join(extra)} do not belong to this "
                                  f"{self.name} module")
        used = set()
        for name, param in params.items():
            k = f"{key}.{name}"
            if name not in tensors:
                raise LoraTargetError(f"{key}: missing tensor {k}")
            t = tensors[name]
            if t.numel() != param.numel():
                raise LoraTargetError(f"{k}: shape {tuple(t.shape)} does not fit this model's "
                                      f"module (expected {tuple(param.shape)})")
            with torch.no_grad():
                param.copy_(t.reshape(param.shape).to(param.dtype))
            used.add(name)
        if ALPHA in tensors:
            self.alpha = float(tensors[ALPHA].float().item())
            used.add(ALPHA)
        return used

    # -- math ----------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """What the raw delta is multiplied by: ``alpha / rank`` (kohya, LyCORIS, the webuis)."""
        return self.alpha / self.rank

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.own_tensors().values())).dtype

    def raw_delta(self) -> torch.Tensor:
        """The delta before scaling, in any shape with the host weight's number of elements."""
        raise NotImplementedError

    def delta_weight(self, host_weight: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW, shaped like the host weight: ``scale · raw`` (then DoRA's decomposition, which needs
        ``host_weight``)."""
        delta = self.raw_delta().reshape(self.shape) * self.scale
        if self.dora_scale is not None:
            if host_weight is None:
                raise LoraTargetError(f"{self.name}+dora: the delta needs the host weight")
            delta = dora.decomposed_delta(host_weight, delta, self.dora_scale)
        return delta

    def forward_delta(self, x: torch.Tensor, kind: LayerKind, host: nn.Module) -> torch.Tensor:
        """This module's addition to the host's output for input ``x`` (before the multiplier),
        in the algorithm's dtype."""
        w = self.delta_weight(kind.host_weights(host)[0] if self.dora_scale is not None else None)
        return kind.apply(host, x.to(w.dtype), w)

    def extra_repr(self) -> str:
        return f"{self.name}, shape={self.shape}, rank={self.rank}, alpha={self.alpha:g}" + \
            (", dora" if self.dora_scale is not None else "")


def check_fits(key: str, lay: ModuleLayout, shape: tuple[int, ...]) -> None:
    """LoraTargetError unless a file module of layout ``lay`` fits a host weight of ``shape``."""
    out, in_numel = shape[0], math.prod(shape[1:])
    kernel = tuple(shape[2:]) or None
    if lay.out_features != out or lay.in_numel != in_numel:
        raise LoraTargetError(f"{key}: the file's {lay.label} module makes a ({lay.out_features}, "
                              f"{lay.in_numel}) delta; this model's layer has ({out}, {in_numel})"
                              + (f" (weight {tuple(shape)})" if kernel else ""))
    if lay.kernel is not None and kernel is not None and lay.kernel != kernel and math.prod(lay.kernel) != 1:
        raise LoraTargetError(f"{key}: the file's {lay.label} module has a {lay.kernel} kernel; this "
                              f"model's layer has {kernel}")


def read_alpha(tensors: Mapping[str, torch.Tensor]) -> float | None:
    """The file's alpha, or None; ValueError for a tensor that is not one number."""
    t = tensors.get(ALPHA)
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"alpha must be a single number, got shape {tuple(t.shape)}")
    return float(t.float().item())


def read_dora(tensors: Mapping[str, torch.Tensor], out: int, in_numel: int) -> bool:
    """Whether the module has a ``dora_scale`` of the column convention; ValueError otherwise."""
    t = tensors.get(DORA_SCALE)
    if t is None:
        return False
    if t.dim() >= 2 and t.shape[0] == out and out != 1 and all(s == 1 for s in t.shape[1:]):
        raise ValueError(f"dora_scale has shape {tuple(t.shape)}: a magnitude per output row (LyCORIS "
                         "wd_on_out), which A1111 and Forge apply differently; only the per-input-column "
                         "convention (1, in[, 1, 1]) is loaded. Re-save it with wd_on_out=False")
    if t.dim() < 2 or t.shape[0] != 1 or in_numel % t.numel() != 0 or any(s != 1 for s in t.shape[2:]):
        raise ValueError(f"dora_scale has shape {tuple(t.shape)}; expected (1, in[, 1, 1])")
    return True


def kaiming(shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor initialised as ``nn.Linear`` / ``nn.Conv2d`` initialise their weight."""
    t = torch.empty(shape)
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    return t
