"""A LoRA trained on the diffusers UNet acts the same on the LDM UNet (the webui's), via kohya keys.

Also: detaching a LoRA gives back the host model bit-identical (outputs and state dict).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pivotal.adapters.network import LoraNetwork
from pivotal.adapters.unet_names import UNetLayout, convert_diffusers_unet_to_ldm
from pivotal.adapters.unet_targets import unet_lora_targets
from tiny_unets import BASES, diffusers_unet, ldm_unet, run_diffusers, run_ldm, sample_inputs

NEEDS_DIFFUSERS = "diffusers is not installed (webui environment); the cross-check trains on diffusers"
PRESET = "attn-mlp-conv"
RANK, ALPHA = 4, 2.0


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key


def _train(net: LoraNetwork, forward, inputs: dict[str, torch.Tensor], steps: int = 4) -> None:
    """A few AdamW steps towards a random target, so that every lora_up weight moves off zero."""
    with torch.no_grad():
        shape = forward(inputs).shape
    target = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(forward(inputs), target)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("base", BASES)
def test_lora_trained_on_diffusers_matches_on_ldm(base):
    pytest.importorskip("diffusers", reason=NEEDS_DIFFUSERS)
    diff = diffusers_unet(base).requires_grad_(False)
    ldm = ldm_unet(base, seed=99).requires_grad_(False)
    ldm.load_state_dict(convert_diffusers_unet_to_ldm(diff.state_dict(), UNetLayout.from_diffusers(diff)))
    inputs = sample_inputs(base)
    with torch.no_grad():
        plain_diff, plain_ldm = run_diffusers(diff, base, inputs), run_ldm(ldm, base, inputs)
    torch.testing.assert_close(plain_ldm, plain_diff, atol=1e-5, rtol=1e-4)
    diff_before, ldm_before = _snapshot(diff), _snapshot(ldm)

    net_diff = LoraNetwork(unet_lora_targets(diff, base, PRESET), rank=RANK, alpha=ALPHA)
    net_diff.attach()
    _train(net_diff, lambda i: run_diffusers(diff, base, i), inputs)
    tensors = net_diff.kohya_state_dict()
    ups = {k: t for k, t in tensors.items() if k.endswith(".lora_up.weight")}
    assert len(ups) == len(unet_lora_targets(diff, base, PRESET))
    assert all(t.abs().sum() > 0 for t in ups.values()), "training left some lora_up weights at zero"

    net_ldm = LoraNetwork(unet_lora_targets(ldm, base, PRESET), rank=RANK, alpha=ALPHA)
    report = net_ldm.load_kohya_state_dict(tensors)
    assert report.unmatched == [] and report.missing == []
    assert report.matched == len(tensors)
    net_ldm.attach()
    with torch.no_grad():
        lora_diff, lora_ldm = run_diffusers(diff, base, inputs), run_ldm(ldm, base, inputs)
    assert (lora_diff - plain_diff).abs().max() > 1e-2, "the trained LoRA has no visible effect"
    torch.testing.assert_close(lora_ldm, lora_diff, atol=1e-5, rtol=1e-4)

    net_diff.detach()
    net_ldm.detach()
    with torch.no_grad():
        assert torch.equal(run_diffusers(diff, base, inputs), plain_diff)
        assert torch.equal(run_ldm(ldm, base, inputs), plain_ldm)
    _assert_bit_identical(diff, diff_before)
    _assert_bit_identical(ldm, ldm_before)


@pytest.mark.parametrize("base", BASES)
def test_lora_on_ldm_detaches_bit_identical(base):
    """The webui case alone (no diffusers needed): train on the LDM UNet, detach, nothing changed."""
    ldm = ldm_unet(base).requires_grad_(False)
    inputs = sample_inputs(base)
    with torch.no_grad():
        plain = run_ldm(ldm, base, inputs)
    before = _snapshot(ldm)
    net = LoraNetwork(unet_lora_targets(ldm, base, PRESET), rank=RANK, alpha=ALPHA)
    with net.attached():
        _train(net, lambda i: run_ldm(ldm, base, i), inputs, steps=2)
        with torch.no_grad():
            assert (run_ldm(ldm, base, inputs) - plain).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.equal(run_ldm(ldm, base, inputs), plain)
    _assert_bit_identical(ldm, before)
