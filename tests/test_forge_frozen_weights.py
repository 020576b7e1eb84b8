"""Backward through inference-tensor weights (what Forge loads) without copying them.

Real torch, real tiny models: an LDM UNet and an HF CLIP text model whose weights are re-made under
``torch.inference_mode`` (as Forge's loader makes them). The oracle is the same model with ordinary
weights: gradients through :class:`InferenceWeightsMode` must equal the ordinary ones.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pivotal.adapters.network import LoraNetwork
from pivotal.adapters.unet_targets import unet_lora_targets
from pivotal.hosts.forge.frozen_weights import InferenceWeightsMode, RecastConv2d, RecastLinear, linear_rows
from tiny_text import hf_text_model
from tiny_unets import ldm_unet, run_ldm, sample_inputs


def as_inference_weights(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are inference tensors (made as Forge's
    loader makes them: new Parameters created inside ``torch.inference_mode``)."""
    model = copy.deepcopy(model)
    with torch.inference_mode():
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    m._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.clone()
    assert all(p.is_inference() for p in model.parameters())
    return model


def _lora(unet: nn.Module) -> LoraNetwork:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = LoraNetwork(unet_lora_targets(unet, "sd1", "attn-mlp-conv"), rank=2, alpha=2.0)
        for m in net.modules_of():
            for algo in m.algorithms:
                nn.init.normal_(algo.up, std=0.1)  # a LoRA that does something
    return net


def _unet_grads(unet: nn.Module, mode: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
    net = _lora(unet)
    inputs = sample_inputs("sd1")
    context = inputs["context"].clone().requires_grad_(True)  # stands in for a trained embedding
    with net.attached():
        if mode:
            with InferenceWeightsMode() as routing:
                out = run_ldm(unet, "sd1", {**inputs, "context": context})
            assert routing.routed > 0
        else:
            out = run_ldm(unet, "sd1", {**inputs, "context": context})
        out.pow(2).mean().backward()
    return [p.grad for p in net.parameters()], context.grad


def test_unet_backward_through_inference_weights_matches_ordinary_weights() -> None:
    plain = ldm_unet("sd1")
    plain.requires_grad_(False)
    frozen = as_inference_weights(plain)
    expected_lora, expected_context = _unet_grads(plain, mode=False)
    got_lora, got_context = _unet_grads(frozen, mode=True)
    assert len(got_lora) == len(expected_lora) > 0
    for got, want in zip(got_lora, expected_lora):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got_context, expected_context, rtol=1e-4, atol=1e-6)
    assert not any(p.grad is not None for p in frozen.parameters())


class InPlaceBlock(nn.Module):
    """Forge's transformer-block pattern: the residual is added in place after the norm saved it."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0
        n = self.proj(self.norm(x))
        x += n
        return x


def test_in_place_residual_after_a_norm_gets_the_right_gradient() -> None:
    torch.manual_seed(0)
    block = InPlaceBlock()
    nn.init.normal_(block.norm.weight)
    frozen = as_inference_weights(block)
    x = torch.randn(3, 8, requires_grad=True)
    with InferenceWeightsMode():
        out = frozen(x)
    out.pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    expected = reference + block.proj(block.norm(reference))  # the same block, out of place
    expected.pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_text_encoder_backward_to_a_spliced_embedding() -> None:
    """As a trained embedding reaches the text encoder: added to the token embeddings' output."""
    plain = hf_text_model("clip_l")
    plain.requires_grad_(False)
    frozen = as_inference_weights(plain)
    ids = torch.tensor([[49406, 320, 1125, 49407] + [49407] * 73])
    grads = []
    for model, mode in ((plain, False), (frozen, True)):
        delta = torch.zeros(1, 77, plain.config.hidden_size, requires_grad=True)
        embeddings = getattr(model, "text_model", model).embeddings
        hook = embeddings.token_embedding.register_forward_hook(lambda _m, _i, out: out + delta)
        try:
            with InferenceWeightsMode() if mode else torch.enable_grad():
                out = model(input_ids=ids).last_hidden_state
        finally:
            hook.remove()
        out.pow(2).mean().backward()
        grads.append(delta.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_the_mode_stays_out_of_the_way() -> None:
    frozen = as_inference_weights(nn.Linear(4, 4))
    x = torch.randn(2, 4)
    with InferenceWeightsMode() as routing:
        with torch.no_grad():
            frozen(x.requires_grad_(True))  # no grad mode: nothing to route
        frozen(torch.randn(2, 4))  # nothing needs a gradient
        plain = nn.Linear(4, 4)
        plain(x)  # no inference tensor
    assert routing.routed == 0
    # outside the mode the refusal is torch's own
    with pytest.raises(RuntimeError, match="Inference tensors"):
        frozen(x)


def test_in_place_residual_after_a_norm_with_cast_weights() -> None:
    """Forge's manual cast hands the norm a fresh (ordinary) weight copy: the input must still be
    protected from the in-place add that follows."""
    torch.manual_seed(1)
    block = InPlaceBlock()
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        block(x).pow(2).sum().backward()  # what torch says without the mode
    x.grad = None
    with InferenceWeightsMode():
        out = block(x)
    out.pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    (reference + block.proj(block.norm(reference))).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)


def test_an_unwrapped_layers_output_may_be_added_to_in_place() -> None:
    """Forge's transformer block adds to ``proj_in``'s output in place (``x += attn1(norm1(x))``);
    with ``proj_in`` not wrapped (LoRA preset "attn"), that output comes from the frozen linear on a
    (batch, tokens, channels) input and must accept the add; the gradient is the ordinary one.
    (A Function returning F.linear's 3-D view was refused: "Output 0 of FrozenLinear is a view
    and is being modified inplace".)"""
    torch.manual_seed(2)
    proj = nn.Linear(8, 8)
    frozen = as_inference_weights(copy.deepcopy(proj))
    x = torch.randn(2, 5, 8, requires_grad=True)
    with InferenceWeightsMode():
        h = frozen(x)
        h += torch.tanh(h)  # in place, as Forge's block does
    h.pow(2).sum().backward()
    reference = x.detach().clone().requires_grad_(True)
    r = proj(reference)
    (r + torch.tanh(r)).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    # the per-call-cast layers take the same way
    layer = CastingLinear(8, 0)
    y = x.detach().clone().requires_grad_(True)
    out = linear_rows(RecastLinear, y, layer, _fetch)
    out += 1.0
    out.pow(2).sum().backward()
    z = x.detach().clone().requires_grad_(True)
    (layer(z) + 1.0).pow(2).sum().backward()
    assert out.shape == (2, 5, 8)
    torch.testing.assert_close(y.grad, z.grad)


class CastingLinear(nn.Module):
    """Forge's "manual cast": the weight is stored in fp16 and cast to the input's dtype per call."""

    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(width, width, generator=g).half(), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(width, generator=g).half(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


def _fetch(layer: nn.Module, like: torch.Tensor) -> tuple:
    return layer.weight.to(like.dtype), layer.bias.to(like.dtype), contextlib.nullcontext()


def _saved_bytes(fn: Any) -> tuple[Any, int]:
    total = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


def test_recast_layers_fetch_the_weight_again_instead_of_keeping_a_copy() -> None:
    layers = [CastingLinear(256, seed) for seed in range(3)]
    x = torch.randn(4, 256, requires_grad=True)

    def run(recast: bool) -> torch.Tensor:
        h = x
        for layer in layers:
            h = RecastLinear.apply(h, layer, _fetch) if recast else layer(h)
            h = torch.tanh(h)
        return h

    grads, saved = [], []
    for recast in (False, True):
        x.grad = None
        out, nbytes = _saved_bytes(lambda: run(recast))
        out.sum().backward()
        grads.append(x.grad.clone())
        saved.append(nbytes)
    torch.testing.assert_close(grads[1], grads[0])
    weights = sum(256 * 256 * 4 for _ in layers)  # the fp32 copies plain autograd keeps
    assert saved[0] - saved[1] >= weights, saved


def test_recast_conv2d_matches_the_plain_layer() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)

    def fetch(layer: nn.Module, like: torch.Tensor) -> tuple:
        return layer.weight.to(like.dtype), layer.bias.to(like.dtype), contextlib.nullcontext()

    RecastConv2d.apply(x, conv, fetch).pow(2).sum().backward()
    got = x.grad.clone()
    x.grad = None
    conv(x).pow(2).sum().backward()
    torch.testing.assert_close(got, x.grad)


def test_forge_block_checkpointing_recomputes_under_the_weights_mode_and_is_removed() -> None:
    """The A1111 host's block checkpointing with Forge's wrapper (recompute under the inference-weights
    mode): same output and gradients as without it, every patched forward removed again on exit."""
    from pivotal.hosts.a1111.session import block_checkpointing
    from pivotal.hosts.forge.session import _checkpointed

    class ResBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def _forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.lin(x))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._forward(x)

    torch.manual_seed(0)
    model = nn.Sequential(ResBlock(), ResBlock())
    x = torch.randn(2, 4, requires_grad=True)
    plain = model(x).sum()
    (g_plain,) = torch.autograd.grad(plain, x)
    with block_checkpointing(model, _checkpointed) as count:
        assert count == 2 and all("forward" in m.__dict__ for m in model)
        out = model(x).sum()
        (g_ckpt,) = torch.autograd.grad(out, x)
    assert all("forward" not in m.__dict__ for m in model)
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(g_ckpt, g_plain)
