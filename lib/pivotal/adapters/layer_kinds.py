"""Layer kinds: how a weight delta reaches one kind of host layer.

An algorithm (:mod:`pivotal.adapters.algorithms`) knows its parameters and the weight delta they
make; a *kind* knows the host layer: the shape of its weight, the functional op that applies a
weight to an input with the layer's geometry, and how the delta joins the host's output.

* :class:`LinearKind`: anything that computes ``F.linear(x, weight, bias)`` with a 2-D ``weight``
  and ``in_features`` / ``out_features`` — ``nn.Linear`` and, by duck typing, Forge's
  ``ForgeOperations.Linear`` (an ``nn.Module`` that is *not* an ``nn.Linear`` subclass). The delta
  is *added to the output*: ``host(x) + op(x, ΔW)``.
* :class:`Conv2dKind`: ``nn.Conv2d`` (1×1 and k×k, ungrouped); added to the output with the
  host's own stride, padding, dilation and padding mode.
* :class:`MultiheadAttentionKind`: ``nn.MultiheadAttention`` with a packed ``in_proj_weight``
  (open_clip's text tower, SDXL's clip_g in the webui). Its output projection is applied inside
  ``F.multi_head_attention_forward``, so no output can be added to: the deltas are *folded into
  effective weights* per call. Four deltas: q, k, v (rows of ``in_proj_weight``) and out.

:func:`layer_kind_of` picks the kind for a host module.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, cast

import torch
from torch import nn
from torch.nn import functional as F

from pivotal.adapters.kohya_keys import MHA_PROJECTIONS
from pivotal.errors import LoraTargetError


class Adapter(Protocol):
    """What a kind needs of the attach/detach wrapper (:class:`pivotal.adapters.lora_layers.LoraModule`)."""

    multiplier: float

    @property
    def host(self) -> nn.Module: ...

    @property
    def algorithms(self) -> nn.ModuleList: ...


class LayerKind:
    """Base: one host weight, the delta added to the host's output through :meth:`apply`."""

    name = "layer"

    def weight_suffixes(self) -> tuple[str, ...]:
        """Module-name suffixes of the kohya modules one host is saved as (``""``: the key itself)."""
        return ("",)

    def host_weights(self, host: nn.Module) -> list[torch.Tensor]:
        """The host weight each delta applies to, in :meth:`weight_suffixes` order."""
        return [cast(torch.Tensor, host.weight)]

    def weight_shapes(self, host: nn.Module) -> list[tuple[int, ...]]:
        return [tuple(w.shape) for w in self.host_weights(host)]

    def apply(self, host: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through the host's op with ``weight`` (host geometry, no bias)."""
        raise NotImplementedError

    def pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``x`` through a 1×1 op with ``weight`` (a low-rank factor), no bias, no geometry."""
        raise NotImplementedError

    def forward(self, module: Adapter, base_forward: Callable[..., Any], args: tuple,
                kwargs: dict) -> Any:
        """The host's output with the adapter's delta added (scaled by its multiplier)."""
        out = base_forward(*args, **kwargs)
        if module.multiplier == 0.0:
            return out
        x = args[0] if args else next(iter(kwargs.values()))
        algorithm: Any = module.algorithms[0]  # an Algorithm (nn.ModuleList is typed as holding Modules)
        delta = algorithm.forward_delta(x, self, module.host)
        return out + (delta * module.multiplier).to(out.dtype)


class LinearKind(LayerKind):
    """``F.linear`` hosts, duck-typed (``nn.Linear``, Forge's ``ForgeOperations.Linear``)."""

    name = "linear"

    @staticmethod
    def matches(host: nn.Module) -> bool:
        w = getattr(host, "weight", None)
        return (isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(getattr(host, "in_features", None), int)
                and isinstance(getattr(host, "out_features", None), int)
                and not isinstance(host, nn.MultiheadAttention))

    def apply(self, host: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)

    def pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight)


class Conv2dKind(LayerKind):
    """``nn.Conv2d`` (ungrouped). ``apply`` is the host's own ``_conv_forward`` (stride, padding,
    dilation, padding mode) with another weight."""

    name = "conv2d"

    @staticmethod
    def matches(host: nn.Module) -> bool:
        return isinstance(host, nn.Conv2d)

    def apply(self, host: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The class's method, not the instance's: an instance-level patch (another extension's)
        # must not run twice.
        return nn.Conv2d._conv_forward(host, x, weight, None)  # type: ignore[arg-type]

    def pointwise(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, weight)


class MultiheadAttentionKind(LayerKind):
    """Packed ``nn.MultiheadAttention``: four deltas folded into the weights per call."""

    name = "multihead_attention"

    @staticmethod
    def matches(host: nn.Module) -> bool:
        return isinstance(host, nn.MultiheadAttention)

    def weight_suffixes(self) -> tuple[str, ...]:
        return tuple(f"_{p}" for p in MHA_PROJECTIONS)

    def host_weights(self, host: nn.Module) -> list[torch.Tensor]:
        mha = cast(nn.MultiheadAttention, host)
        q, k, v = mha.in_proj_weight.chunk(3, 0)
        return [q, k, v, mha.out_proj.weight]

    def forward(self, module: Adapter, base_forward: Callable[..., Any], args: tuple,
                kwargs: dict) -> Any:
        return self._attention(module, base_forward, *args, **kwargs)

    def _attention(self, module: Adapter, base_forward, query, key, value, key_padding_mask=None,
                   need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False):
        if module.multiplier == 0.0:
            return base_forward(query, key, value, key_padding_mask=key_padding_mask,
                                need_weights=need_weights, attn_mask=attn_mask,
                                average_attn_weights=average_attn_weights, is_causal=is_causal)
        mha: nn.MultiheadAttention = module.host  # type: ignore[assignment]
        hosts = self.host_weights(mha)
        algorithms: list[Any] = list(module.algorithms)
        deltas = [a.delta_weight(w) * module.multiplier for a, w in zip(algorithms, hosts)]
        w = mha.in_proj_weight
        in_w = w + torch.cat(deltas[:3], dim=0).to(w.dtype)
        out_w = mha.out_proj.weight + deltas[3].to(mha.out_proj.weight.dtype)
        batched = query.dim() == 3
        if mha.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, mha.embed_dim, mha.num_heads, in_w, mha.in_proj_bias,
            mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout, out_w, mha.out_proj.bias,
            training=mha.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if mha.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights


#: Tried in order; the first whose ``matches`` accepts the host wins.
KINDS: tuple[type[LayerKind], ...] = (MultiheadAttentionKind, Conv2dKind, LinearKind)


def supports_layer(host: nn.Module) -> bool:
    """Whether some layer kind can carry an adapter on ``host``."""
    return any(k.matches(host) for k in KINDS)  # type: ignore[attr-defined]


def layer_kind_of(key: str, host: nn.Module) -> LayerKind:
    """The kind for ``host``; LoraTargetError naming ``key`` for a layer no kind supports."""
    if isinstance(host, nn.MultiheadAttention):
        if not host._qkv_same_embed_dim or host.in_proj_weight is None:
            raise LoraTargetError(f"{key}: MultiheadAttention with separate q/k/v weights "
                                  "(kdim/vdim != embed_dim) is not supported")
        if host.bias_k is not None or host.add_zero_attn:
            raise LoraTargetError(f"{key}: MultiheadAttention with bias_k/add_zero_attn is not supported")
        return MultiheadAttentionKind()
    if isinstance(host, nn.Conv2d):
        if host.groups != 1:
            raise LoraTargetError(f"{key}: grouped convolutions (groups={host.groups}) are not supported")
        return Conv2dKind()
    if LinearKind.matches(host):
        return LinearKind()
    raise LoraTargetError(f"{key}: no LoRA layer for module type {type(host).__name__} "
                          "(supported: Linear, Conv2d, MultiheadAttention)")
