"""LoRA layers that attach to a host model without replacing any of its modules.

One abstraction, :class:`LoraModule`, with one subclass per kind of host layer:

* :class:`LoraLinear` for ``nn.Linear``;
* :class:`LoraConv2d` for ``nn.Conv2d`` (1x1 and 3x3; kohya "LoCon" layout: the down conv has the
  host's kernel/stride/padding, the up conv is 1x1);
* :class:`~pivotal.adapters.lora_mha.LoraMultiheadAttention` for ``nn.MultiheadAttention`` with a packed
  ``in_proj_weight`` (open_clip's text tower, SDXL's clip_g in the webui), saved as four kohya
  modules ``_q_proj`` / ``_k_proj`` / ``_v_proj`` / ``_out_proj``.

Attaching sets an instance attribute ``forward`` on the host module that calls the host's own
forward and adds the low-rank term. Detaching deletes that attribute again. The host module keeps
its identity, its parameters, its hooks and its ``state_dict``; LoRA parameters live in this
module, never in the host's. That is what lets the webui's model come back bit-identical.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from pivotal.errors import LoraTargetError

#: Kohya key prefix → part of the model. Order matters: ``lora_te1_`` before ``lora_te_``.
PART_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
)


def part_of_key(key: str) -> str:
    """The model part ("unet", "te", "te1", "te2") a kohya key belongs to."""
    for prefix, part in PART_PREFIXES:
        if key.startswith(prefix):
            return part
    raise LoraTargetError(f"LoRA key {key!r} has no known prefix (expected one of "
                          f"{', '.join(p for p, _ in PART_PREFIXES)})")


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, or a module that computes one without subclassing it (Forge builds its models
    from ``ForgeOperations.Linear``, a plain ``nn.Module`` with ``in_features`` / ``out_features`` and
    a 2-D ``weight``): LoRA attaches to either the same way, through its ``forward``."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (isinstance(in_f, int) and isinstance(out_f, int) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (out_f, in_f))


class LoraModule(nn.Module):
    """Base class: a low-rank delta for one host module, attachable and detachable.

    ``scale = alpha / rank`` as kohya and the webui compute it; ``multiplier`` is the user's
    strength (per part, set by :class:`LoraNetwork`).
    """

    def __init__(self, key: str, host: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if rank < 1:
            raise LoraTargetError(f"LoRA rank must be >= 1, got {rank} (setting: rank)")
        if not 0.0 <= dropout < 1.0:
            raise LoraTargetError(f"LoRA dropout must be in [0, 1), got {dropout} (setting: dropout)")
        self.key = key
        self.part = part_of_key(key)
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.multiplier = 1.0
        # A list, not an attribute, so nn.Module does not register the host as our child:
        # our state_dict / parameters() must hold only LoRA tensors.
        self._host: list[nn.Module] = [host]
        self._saved_forward: list[Callable[..., torch.Tensor] | None] = []
        self._attached = False

    @property
    def host(self) -> nn.Module:
        return self._host[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def attached(self) -> bool:
        return self._attached

    # -- attach / detach ---------------------------------------------------------------------
    def attach(self) -> None:
        """Route the host's forward through this module. Refuses to stack on another LoRA."""
        host = self.host
        if self._attached or getattr(host, "_pivotal_lora", None) is not None:
            raise LoraTargetError(f"{self.key}: a Pivotal LoRA is already attached to this module")
        # An instance-level forward set by someone else (e.g. another extension) is kept and
        # called, and put back on detach.
        self._saved_forward = [host.__dict__.get("forward")]
        base_forward = host.forward

        def forward(*args, **kwargs):
            return self.lora_forward(base_forward, *args, **kwargs)

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

    # -- math --------------------------------------------------------------------------------
    def lora_forward(self, base_forward: Callable[..., torch.Tensor], *args, **kwargs):
        raise NotImplementedError

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under kohya keys: ``{key}.lora_down.weight``, ``.lora_up.weight``, ``.alpha``."""
        raise NotImplementedError

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        """Copy tensors in; return the keys used. Shapes must match (LoraTargetError)."""
        raise NotImplementedError

    def _alpha_tensor(self) -> torch.Tensor:
        return torch.tensor(self.alpha, dtype=torch.float32)


class _DownUp(LoraModule):
    """Shared body of Linear and Conv2d LoRA: ``host(x) + up(dropout(down(x))) * scale * mult``."""

    down: nn.Module
    up: nn.Module

    def lora_forward(self, base_forward, *args, **kwargs):
        out = base_forward(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        if self.multiplier == 0.0:
            return out
        # Train in the LoRA's own dtype (fp32 master weights) and cast the result back, so an
        # fp16 host still gets fp32 gradients on the LoRA tensors.
        h = self.down(x.to(self.down.weight.dtype))
        if self.dropout and self.training:
            h = nn.functional.dropout(h, p=self.dropout)
        delta = self.up(h) * (self.scale * self.multiplier)
        return out + delta.to(out.dtype)

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        return {
            f"{self.key}.lora_down.weight": self.down.weight.detach(),
            f"{self.key}.lora_up.weight": self.up.weight.detach(),
            f"{self.key}.alpha": self._alpha_tensor(),
        }

    def load_kohya_state_dict(self, tensors: dict[str, torch.Tensor]) -> set[str]:
        used = set()
        for name, param in (("lora_down.weight", self.down.weight), ("lora_up.weight", self.up.weight)):
            k = f"{self.key}.{name}"
            if k not in tensors:
                raise LoraTargetError(f"{self.key}: missing tensor {k}")
            t = tensors[k]
            if tuple(t.shape) != tuple(param.shape):
                raise LoraTargetError(f"{k}: shape {tuple(t.shape)} does not fit this model's "
                                      f"module (expected {tuple(param.shape)})")
            with torch.no_grad():
                param.copy_(t.to(param.dtype))
            used.add(k)
        ak = f"{self.key}.alpha"
        if ak in tensors:
            self.alpha = float(tensors[ak].float().item())
            used.add(ak)
        return used

    def _init_weights(self) -> None:
        # kohya / PEFT convention: down random, up zero, so a fresh LoRA is an exact no-op.
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)


class LoraLinear(_DownUp):
    """LoRA for ``nn.Linear`` (or a Linear-like module, see :func:`is_linear_like`): down (rank, in), up (out, rank)."""

    def __init__(self, key: str, host: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(key, host, rank, alpha, dropout)
        self.down = nn.Linear(host.in_features, rank, bias=False)
        self.up = nn.Linear(rank, host.out_features, bias=False)
        self._init_weights()


class LoraConv2d(_DownUp):
    """LoRA for ``nn.Conv2d``: down (rank, in, kh, kw) with the host's stride/padding, up (out, rank, 1, 1)."""

    def __init__(self, key: str, host: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(key, host, rank, alpha, dropout)
        if host.groups != 1:
            raise LoraTargetError(f"{key}: grouped convolutions (groups={host.groups}) are not supported")
        self.down = nn.Conv2d(host.in_channels, rank, host.kernel_size, host.stride, host.padding,
                              host.dilation, bias=False, padding_mode=host.padding_mode)
        self.up = nn.Conv2d(rank, host.out_channels, 1, bias=False)
        self._init_weights()
