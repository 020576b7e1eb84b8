"""A webui-style hypernetwork, for the efficacy benchmark's method comparison (bench only).

What AUTOMATIC1111's webui calls a hypernetwork (``modules/hypernetworks``; read for its facts):
small MLPs that rewrite the inputs of an attention layer's key and value projections, ``k =
to_k(x + mlp_k(x))`` and ``v = to_v(x + mlp_v(x))``; one (k, v) pair per input width, shared by
every attention layer of that width. The MLP's widths are the input width times the "layer
structure" (default ``1, 2, 1``: D -> 2D -> D), activation "linear" (none) by default, optional
layer norm after each linear and dropout after hidden layers; weights start N(0, 0.01), biases 0,
so a new hypernetwork is nearly the identity. The webui's default sizes cover the text context and
every UNet width, so it rewrites self-attention too (there the input is the picture's features).

The tiny world's UNet has the same width (64) for its features and its text context, so keying by
width alone would make one MLP serve both; here the pairs are keyed by kind and width ("cross64",
"self64"), which is what the webui's keying amounts to on SD1.5 (768 vs 320/640/1280).
``targets="cross"`` rewrites the text context only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

LAYER_STRUCTURE = (1.0, 2.0, 1.0)
ACTIVATIONS = {"linear": nn.Identity, "relu": nn.ReLU, "swish": nn.Hardswish, "tanh": nn.Tanh}


class HyperMLP(nn.Module):
    """``x + mlp(x)`` over the last dimension (x: (B, N, dim))."""

    def __init__(self, dim: int, structure: Sequence[float] = LAYER_STRUCTURE, layer_norm: bool = False,
                 activation: str = "linear", dropout: float = 0.0, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if structure[0] != 1 or structure[-1] != 1 or len(structure) < 2:
            raise ValueError(f"layer structure {tuple(structure)} must start and end with 1 (e.g. 1, 2, 1)")
        layers: list[nn.Module] = []
        widths = [int(dim * m) for m in structure]
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            last = i == len(widths) - 2
            layers.append(nn.Linear(a, b))
            if not last and activation != "linear":
                layers.append(ACTIVATIONS[activation]())
            if layer_norm:
                layers.append(nn.LayerNorm(b))
            if not last and dropout > 0:
                layers.append(nn.Dropout(dropout))
        # As the webui's "Normal" init: weights (layer norm's too) N(0, 0.01), biases 0.
        for layer in layers:
            if isinstance(layer, (nn.Linear, nn.LayerNorm)):
                with torch.no_grad():
                    layer.weight.normal_(0.0, 0.01, generator=generator)
                    layer.bias.zero_()
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x.float()).to(x.dtype)


def attention_inputs(unet: nn.Module, targets: str) -> list[tuple[str, nn.Module]]:
    """(key, attention module) of every attention whose k/v inputs a hypernetwork rewrites:
    cross-attention ("attn2", key "cross<context width>") and, with ``targets="all"``,
    self-attention ("attn1", key "self<feature width>")."""
    if targets not in ("cross", "all"):
        raise ValueError(f"hypernetwork targets {targets!r}: cross or all")
    out = []
    for name, module in unet.named_modules():
        if not (hasattr(module, "to_k") and hasattr(module, "to_v")):
            continue
        kind = {"attn2": "cross", "attn1": "self"}.get(name.rsplit(".", 1)[-1])
        if kind == "cross" or (kind == "self" and targets == "all"):
            out.append((f"{kind}{module.to_k.in_features}", module))
    return out


class Hypernetwork(nn.Module):
    """The (k, v) MLP pairs of one hypernetwork, ``pairs[key]["k"|"v"]``."""

    def __init__(self, unet: nn.Module, targets: str = "all", structure: Sequence[float] = LAYER_STRUCTURE,
                 layer_norm: bool = False, activation: str = "linear", dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.targets = targets
        self.pairs = nn.ModuleDict()
        for key, module in attention_inputs(unet, targets):
            if key not in self.pairs:
                dim = module.to_k.in_features
                self.pairs[key] = nn.ModuleDict({kv: HyperMLP(dim, structure, layer_norm, activation, dropout, gen)
                                                 for kv in ("k", "v")})

    @contextlib.contextmanager
    def attached(self, unet: nn.Module) -> Iterator[None]:
        """Rewrite the k/v inputs of ``unet``'s attentions for the block (forward pre-hooks on
        ``to_k``/``to_v``); the hooks are removed on exit, so the UNet is then bit-identical to
        before (its weights are never touched)."""
        handles = []
        try:
            for key, module in attention_inputs(unet, self.targets):
                for kv, proj in (("k", module.to_k), ("v", module.to_v)):
                    mlp = self.pairs[key][kv]
                    handles.append(proj.register_forward_pre_hook(
                        lambda _m, args, mlp=mlp: (mlp(args[0]), *args[1:])))
            yield
        finally:
            for h in handles:
                h.remove()
