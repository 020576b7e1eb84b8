"""LoRA on Forge's layers: ``ForgeOperations.Linear`` is a plain ``nn.Module`` (not an ``nn.Linear``)
with ``in_features`` / ``out_features`` / ``weight`` / ``bias`` and an ``F.linear`` forward. A model
whose Linears are swapped for that shape must get the same LoRA targets, keys and outputs."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from pivotal.adapters.network import LoraNetwork
from pivotal.adapters.te_names import text_encoder_lora_targets
from pivotal.adapters.unet_targets import unet_lora_targets
from tiny_text import hf_text_model
from tiny_unets import ldm_unet, run_ldm, sample_inputs


class ForgeStyleLinear(nn.Module):
    """The shape of Forge's ``backend/operations.py`` ``ForgeOperations.Linear`` (a Module, not a Linear)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def forge_style(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, ForgeStyleLinear(child))
    assert not any(type(m) is nn.Linear for m in model.modules())
    return model


def test_unet_targets_keys_and_outputs_match_on_forge_style_linears() -> None:
    plain = ldm_unet("sd1")
    forge = forge_style(plain)
    for preset in ("attn", "attn-mlp"):
        assert [k for k, _ in unet_lora_targets(forge, "sd1", preset)] == \
            [k for k, _ in unet_lora_targets(plain, "sd1", preset)]
    outs = []
    for model in (plain, forge):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = LoraNetwork(unet_lora_targets(model, "sd1", "attn-mlp"), rank=2, alpha=2.0)
            for m in net.modules_of():
                for algo in m.algorithms:
                    nn.init.normal_(algo.up, std=0.1)
        with torch.no_grad(), net.attached():
            outs.append(run_ldm(model, "sd1", sample_inputs("sd1")))
    torch.testing.assert_close(outs[1], outs[0])


def test_text_encoder_targets_on_forge_style_linears() -> None:
    plain = hf_text_model("clip_l")
    forge = forge_style(plain)
    assert [k for k, _ in text_encoder_lora_targets(forge, "te", "attn-mlp")] == \
        [k for k, _ in text_encoder_lora_targets(plain, "te", "attn-mlp")]
