"""Backward through weights made under ``torch.inference_mode``, without copying them.

Forge creates every weight of the loaded model under ``torch.inference_mode`` (the loader and the
LoRA merger are decorated with it), so the weights are *inference tensors*, and autograd refuses to
save one for backward ("Inference tensors cannot be saved for backward"). Backward through a frozen
``linear`` or ``conv2d`` needs the weight only to pass the gradient on to the layer's input; that is
what the :class:`torch.autograd.Function` s here do, holding the weight by reference instead of in
autograd's saved tensors. Nothing is copied and no module is touched.

:class:`InferenceWeightsMode` routes the calls: a ``TorchFunctionMode`` (thread-local, so a
generation on another thread never sees it) entered only around the host's training forwards. It
steps in only when grad mode is on and some argument needs a gradient; every other call runs as it
would:

* ``linear`` / ``conv2d`` with an inference-tensor weight: the functions below (gradient to the
  input only);
* ``layer_norm``: its input cloned (Forge's transformer blocks add to that input in place,
  ``x += attn(norm(x))``, after the norm saved it), its (small) weights cloned when they are
  inference tensors; ``group_norm``: the weights cloned when they are inference tensors;
* anything else with an inference-tensor argument: those arguments cloned (small buffers in practice).

A layer whose weight is cast (or moved) on every call — Forge's "manual cast" for float8 or fp16
storage, or its CPU swap in low VRAM — hands ``F.linear`` a fresh copy, which autograd would keep
until backward: a copy of the whole model. :class:`RecastLinear` / :class:`RecastConv2d` instead
fetch the weight again in backward (the session installs them on such layers).

A frozen weight never gets a gradient: the host's weights have ``requires_grad`` off for the
session, and these functions return none for them.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map


class FrozenLinear(torch.autograd.Function):
    """``F.linear(x, w, b)`` whose backward gives x its gradient only; ``w`` is held by reference.
    ``x`` is (N, in): call it through :func:`linear_rows`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.weight = weight  # not save_for_backward: that is the refused save
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        return grad @ ctx.weight.to(grad.dtype), None, None


class FrozenConv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward gives the input its gradient only; the weight held by reference."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Any,
                padding: Any, dilation: Any, groups: int) -> torch.Tensor:
        ctx.weight, ctx.config, ctx.input_shape = weight, (stride, padding, dilation, groups), x.shape
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        stride, padding, dilation, groups = ctx.config
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, ctx.weight.to(grad.dtype), grad, stride, padding,
                                                dilation, groups)
        return grad_input, None, None, None, None, None, None


def _clone_inference(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value


def linear_rows(function: Any, x: torch.Tensor, *args: Any) -> torch.Tensor:
    """``function.apply(x, *args)`` (a linear :class:`torch.autograd.Function`) on ``x`` (..., in)
    flattened to rows (N, in), the result shaped back to (..., out) outside the Function.

    ``F.linear`` of a 3-D input returns a view of its 2-D product; returned from a Function's
    forward, such a view may not be changed in place ("Output 0 of FrozenLinear is a view and is
    being modified inplace"), and Forge's blocks do exactly that to an unwrapped layer's output
    (``x += attn1(norm1(x))`` after ``proj_in``). A reshape outside the Function is an ordinary
    view that autograd lets the caller change in place; nothing is copied."""
    if x.dim() <= 2:
        return function.apply(x, *args)
    out = function.apply(x.reshape(-1, x.shape[-1]), *args)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return F.linear(*tree_map(_clone_inference, (x, weight, bias)))
    return linear_rows(FrozenLinear, x, weight, bias)


def _conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride: Any = 1,
            padding: Any = 0, dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    if isinstance(padding, str) or weight.requires_grad or (bias is not None and bias.requires_grad):
        # "same"/"valid" padding has no direct input-gradient helper: take the (copying) plain way
        args = tree_map(_clone_inference, (x, weight, bias))
        return F.conv2d(*args, stride, padding, dilation, groups)
    return FrozenConv2d.apply(x, weight, bias, stride, padding, dilation, groups)


def _layer_norm(x: torch.Tensor, normalized_shape: Any, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *_cudnn: Any) -> torch.Tensor:
    # the input is cloned too: the caller may add to it in place after this norm saved it
    return F.layer_norm(x.clone(), normalized_shape, _clone_inference(weight), _clone_inference(bias), eps)


def _group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, eps: float = 1e-5, *_cudnn: Any) -> torch.Tensor:
    return F.group_norm(_clone_inference(x), num_groups, _clone_inference(weight), _clone_inference(bias), eps)


#: the calls handled without copying the weight (each spelling the mode may see)
HANDLERS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.linear: _linear,
    torch._C._nn.linear: _linear,
    F.conv2d: _conv2d,
    torch.conv2d: _conv2d,
}
#: norms, routed whenever a gradient is needed (inference weights or not)
NORMS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.layer_norm: _layer_norm,
    torch.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    torch.group_norm: _group_norm,
}


class InferenceWeightsMode(TorchFunctionMode):
    """Within ``with InferenceWeightsMode():`` (this thread only), calls that would save an
    inference tensor for backward, or a norm input that is changed in place later, are routed as
    the module docstring says. ``routed`` counts the calls it handled (``cloned``: how many of
    them by cloning inference-tensor arguments)."""

    def __init__(self) -> None:
        super().__init__()
        self.routed = 0
        self.cloned = 0

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(t.requires_grad for t in tensors):
            return func(*args, **kwargs)
        if func in NORMS:
            self.routed += 1
            return NORMS[func](*args, **kwargs)
        if not any(t.is_inference() for t in tensors):
            return func(*args, **kwargs)
        self.routed += 1
        handler = HANDLERS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        self.cloned += 1
        args, kwargs = tree_map(_clone_inference, (args, kwargs))
        return func(*args, **kwargs)


# -- layers whose weight is fetched (cast, moved) per call ------------------------------------------------
#: ``fetch(layer, like) -> (weight, bias, context)``: the layer's weight and bias as its forward would
#: use them for input ``like`` (dtype, device), and a context manager to compute them in
Fetch = Callable[[Any, torch.Tensor], tuple[torch.Tensor, Optional[torch.Tensor], Any]]


class RecastLinear(torch.autograd.Function):
    """A linear layer whose weight ``fetch`` makes per call: fetched again in backward instead of
    kept (``layer`` and ``fetch`` are plain arguments, not tensors). ``x`` is (N, in): call it
    through :func:`linear_rows`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Any, fetch: Fetch) -> torch.Tensor:
        ctx.layer, ctx.fetch = layer, fetch
        weight, bias, context = fetch(layer, x)
        with context:
            return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        weight, _bias, context = ctx.fetch(ctx.layer, grad)
        with context:
            return grad @ weight, None, None


class RecastConv2d(torch.autograd.Function):
    """:class:`RecastLinear` for a zero-padded ``conv2d`` layer."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Any, fetch: Fetch) -> torch.Tensor:
        ctx.layer, ctx.fetch, ctx.input_shape = layer, fetch, x.shape
        weight, bias, context = fetch(layer, x)
        with context:
            return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        layer = ctx.layer
        weight, _bias, context = ctx.fetch(layer, grad)
        with context:
            grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, layer.stride, layer.padding,
                                                    layer.dilation, layer.groups)
        return grad_input, None, None
