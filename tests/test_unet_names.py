"""UNet names: diffusers <-> LDM mapping, state-dict conversion, kohya LoRA keys and presets.

Tests that need diffusers skip visibly in the webui environment (no diffusers there); the LDM-only
tests run in both environments.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pivotal.adapters.unet_names import (
    UNetLayout,
    convert_diffusers_unet_to_ldm,
    convert_ldm_unet_to_diffusers,
    is_diffusers_unet,
    is_ldm_unet,
)
from pivotal.adapters.unet_targets import PRESET_SETTING, PRESETS, unet_lora_targets
from pivotal.errors import LoraTargetError, ModelLayoutError
from pivotal.training.config import TrainConfig
from tiny_unets import BASES, diffusers_unet, ldm_unet, run_diffusers, run_ldm, sample_inputs

NEEDS_DIFFUSERS = "diffusers is not installed (webui environment); diffusers-side checks need it"

# The real models' layouts: SD1.x/2.x (4 levels, no transformer at the lowest) and SDXL.
SD1_REAL = UNetLayout(4, 2, (True, True, True, False), (False, True, True, True), True)
SDXL_REAL = UNetLayout(3, 2, (False, True, True), (True, True, False), True)
TINY = {
    "sd1": UNetLayout(3, 2, (True, True, False), (False, True, True), True),
    "sdxl": UNetLayout(3, 2, (False, True, True), (True, True, False), True),
}


@pytest.fixture(scope="module", params=BASES)
def base(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ldm(base):
    return ldm_unet(base)


@pytest.fixture(scope="module")
def diff(base):
    pytest.importorskip("diffusers", reason=NEEDS_DIFFUSERS)
    return diffusers_unet(base)


def _leaf_with_params(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]


# -- layouts ---------------------------------------------------------------------------------
def test_layout_from_ldm(base, ldm):
    assert UNetLayout.from_ldm(ldm) == TINY[base]


def test_layout_from_diffusers_equals_ldm(base, diff, ldm):
    assert UNetLayout.from_diffusers(diff) == UNetLayout.from_ldm(ldm) == TINY[base]


def test_detection_by_structure(ldm):
    assert is_ldm_unet(ldm) and not is_diffusers_unet(ldm)
    assert not is_ldm_unet(nn.Linear(2, 2)) and not is_diffusers_unet(nn.Linear(2, 2))


def test_detection_diffusers(diff):
    assert is_diffusers_unet(diff) and not is_ldm_unet(diff)


def test_from_ldm_rejects_other_modules():
    with pytest.raises(ModelLayoutError, match=r"^Linear is not an LDM UNetModel"):
        UNetLayout.from_ldm(nn.Linear(2, 2))


def test_from_ldm_rejects_missing_output_block():
    unet = ldm_unet("sd1")
    del unet.output_blocks[8]
    with pytest.raises(ModelLayoutError, match=r"has 8 output_blocks; 3 levels of 2 resnets need 9$"):
        UNetLayout.from_ldm(unet)


def test_from_ldm_rejects_partial_attention():
    unet = ldm_unet("sd1")
    unet.input_blocks[2] = unet.input_blocks[2][:1]  # drop one transformer of level 0
    with pytest.raises(ModelLayoutError, match=r"^LDM UNet down level 0 has transformers in only some blocks$"):
        UNetLayout.from_ldm(unet)


def test_from_diffusers_rejects_unknown_block_type():
    config = {"down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["UpBlock2D"] * 2,
              "layers_per_block": 2}
    with pytest.raises(ModelLayoutError, match=r"down block type 'AttnDownBlock2D' has no LDM counterpart"):
        UNetLayout.from_diffusers(config)


def test_from_diffusers_rejects_per_level_counts():
    config = {"down_block_types": ["DownBlock2D"] * 2, "up_block_types": ["UpBlock2D"] * 2,
              "layers_per_block": [1, 2]}
    with pytest.raises(ModelLayoutError, match=r"per-level layers_per_block \[1, 2\]"):
        UNetLayout.from_diffusers(config)


def test_layout_validates_lengths():
    with pytest.raises(ModelLayoutError, match=r"^UNet layout has 3 levels but attention flags for 2 down and 3 up"):
        UNetLayout(3, 2, (True, True), (True, True, True))


# -- name mapping: known pairs from the real checkpoints -------------------------------------
SD1_PAIRS = [
    ("conv_in.weight", "input_blocks.0.0.weight"),
    ("time_embedding.linear_1.weight", "time_embed.0.weight"),
    ("time_embedding.linear_2.bias", "time_embed.2.bias"),
    ("down_blocks.0.resnets.0.norm1.weight", "input_blocks.1.0.in_layers.0.weight"),
    ("down_blocks.0.resnets.1.conv1.weight", "input_blocks.2.0.in_layers.2.weight"),
    ("down_blocks.0.attentions.1.proj_in.weight", "input_blocks.2.1.proj_in.weight"),
    ("down_blocks.0.downsamplers.0.conv.weight", "input_blocks.3.0.op.weight"),
    ("down_blocks.1.resnets.0.conv_shortcut.weight", "input_blocks.4.0.skip_connection.weight"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
     "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"),
    ("down_blocks.2.downsamplers.0.conv", "input_blocks.9.0.op"),
    ("down_blocks.3.resnets.1.time_emb_proj.weight", "input_blocks.11.0.emb_layers.1.weight"),
    ("mid_block.resnets.0.norm2.bias", "middle_block.0.out_layers.0.bias"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
     "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"),
    ("mid_block.resnets.1.conv2.weight", "middle_block.2.out_layers.3.weight"),
    ("up_blocks.0.resnets.2.conv1.weight", "output_blocks.2.0.in_layers.2.weight"),
    ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.1.conv.weight"),
    ("up_blocks.1.attentions.2.norm.weight", "output_blocks.5.1.norm.weight"),
    ("up_blocks.1.upsamplers.0.conv.bias", "output_blocks.5.2.conv.bias"),
    ("up_blocks.3.attentions.2.proj_out", "output_blocks.11.1.proj_out"),
    ("up_blocks.3.resnets.2", "output_blocks.11.0"),
    ("conv_norm_out.weight", "out.0.weight"),
    ("conv_out.bias", "out.2.bias"),
]
SDXL_PAIRS = [
    ("add_embedding.linear_1.weight", "label_emb.0.0.weight"),
    ("add_embedding.linear_2.bias", "label_emb.0.2.bias"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0.weight",
     "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0.weight"),
    ("down_blocks.1.downsamplers.0.conv.weight", "input_blocks.6.0.op.weight"),
    ("up_blocks.0.attentions.2.proj_out.weight", "output_blocks.2.1.proj_out.weight"),
    ("up_blocks.0.upsamplers.0.conv.weight", "output_blocks.2.2.conv.weight"),
    ("up_blocks.2.resnets.0.conv_shortcut.weight", "output_blocks.6.0.skip_connection.weight"),
]


@pytest.mark.parametrize(("layout", "pairs"), [(SD1_REAL, SD1_PAIRS), (SDXL_REAL, SDXL_PAIRS)], ids=["sd1", "sdxl"])
def test_known_pairs(layout, pairs):
    for diffusers_name, ldm_name in pairs:
        assert layout.to_ldm(diffusers_name) == ldm_name
        assert layout.to_diffusers(ldm_name) == diffusers_name


@pytest.mark.parametrize(("func", "path", "message"), [
    ("to_ldm", "down_blocks.3.downsamplers.0.conv",
     r"^UNet name 'down_blocks.3.downsamplers.0.conv' has no LDM counterpart$"),
    ("to_ldm", "down_blocks.3.attentions.0.proj_in",
     r"^UNet name 'down_blocks.3.attentions.0.proj_in' has no LDM counterpart$"),
    ("to_ldm", "down_blocks.0.resnets.2.conv1", r"'down_blocks.0.resnets.2.conv1' has no LDM counterpart$"),
    ("to_ldm", "up_blocks.3.upsamplers.0.conv", r"'up_blocks.3.upsamplers.0.conv' has no LDM counterpart$"),
    ("to_ldm", "up_blocks.4.resnets.0", r"has no LDM counterpart \(the UNet has 4 levels\)$"),
    ("to_ldm", "down_blocks.0.resnets.0.nonlinearity", r"has no LDM counterpart \(resnet part 'nonlinearity'\)$"),
    ("to_ldm", "down_blocks.x.resnets.0", r"has no LDM counterpart \('x' is not a block index\)$"),
    ("to_ldm", "down_blocks.0.downsamplers.0.op", r"'down_blocks.0.downsamplers.0.op' has no LDM counterpart$"),
    ("to_diffusers", "input_blocks.3.0.conv", r"'input_blocks.3.0.conv' has no diffusers counterpart$"),
    ("to_ldm", "time_proj", r"^UNet name 'time_proj' has no LDM counterpart$"),
    ("to_diffusers", "input_blocks.12.0", r"^UNet name 'input_blocks.12.0' has no diffusers counterpart$"),
    ("to_diffusers", "input_blocks.12.0.op", r"'input_blocks.12.0.op' has no diffusers counterpart$"),
    ("to_diffusers", "input_blocks.10.1", r"'input_blocks.10.1' has no diffusers counterpart$"),
    ("to_diffusers", "input_blocks.01.0", r"\('01' is not a block index\)$"),
    ("to_diffusers", "output_blocks.0.1.conv", r"'output_blocks.0.1.conv' has no diffusers counterpart$"),
    ("to_diffusers", "output_blocks.11.2.conv", r"'output_blocks.11.2.conv' has no diffusers counterpart$"),
    ("to_diffusers", "middle_block.3", r"'middle_block.3' has no diffusers counterpart$"),
    ("to_diffusers", "input_blocks.1.0.in_layers.1", r"\(resnet part 'in_layers.1'\)$"),
    ("to_diffusers", "label_emb.0", r"^UNet name 'label_emb.0' has no diffusers counterpart$"),
])
def test_no_counterpart(func, path, message):
    with pytest.raises(ModelLayoutError, match=message):
        getattr(SD1_REAL, func)(path)


def test_mid_block_without_attention():
    layout = UNetLayout(2, 1, (False, False), (False, False), mid_attention=False)
    assert layout.to_ldm("mid_block.resnets.1.conv1") == "middle_block.1.in_layers.2"
    assert layout.to_diffusers("middle_block.1.in_layers.2") == "mid_block.resnets.1.conv1"
    with pytest.raises(ModelLayoutError, match=r"'mid_block.attentions.0' has no LDM counterpart$"):
        layout.to_ldm("mid_block.attentions.0")


# -- name mapping: every name of the tiny models ---------------------------------------------
def test_ldm_names_round_trip(base, ldm):
    layout = UNetLayout.from_ldm(ldm)
    mapped = {}
    for name in [n for n, _ in ldm.named_parameters()] + _leaf_with_params(ldm):
        there = layout.to_diffusers(name)
        assert layout.to_ldm(there) == name
        mapped[there] = name
    assert len(mapped) == len(list(ldm.named_parameters())) + len(_leaf_with_params(ldm))


def test_diffusers_names_round_trip_onto_ldm(base, diff, ldm):
    layout = UNetLayout.from_diffusers(diff)
    ldm_params = dict(ldm.named_parameters())
    assert {layout.to_ldm(n) for n, _ in diff.named_parameters()} == set(ldm_params)
    ldm_modules = dict(ldm.named_modules())
    sides = (("diffusers", diff, layout.to_ldm, layout.to_diffusers, ldm_modules),
             ("ldm", ldm, layout.to_diffusers, layout.to_ldm, dict(diff.named_modules())))
    for side, model, there, back, other in sides:
        must_map = set(_leaf_with_params(model))
        for name, module in model.named_modules():
            if not name:
                continue
            try:
                mapped = there(name)
            except ModelLayoutError:
                # Containers and parameter-free layers (SiLU, Dropout, ModuleList) may lack one.
                assert name not in must_map, f"{side} module {name} holds parameters but has no counterpart"
                continue
            assert back(mapped) == name
            if mapped not in other:
                # LDM's skip_connection is an nn.Identity where diffusers has no conv_shortcut.
                assert name not in must_map and not list(module.parameters()), (side, name, mapped)
                continue
            twin = other[mapped]
            for kind in (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm):
                assert isinstance(module, kind) == isinstance(twin, kind), (name, mapped)


def test_state_dict_conversion_gives_same_outputs(base, diff):
    layout = UNetLayout.from_diffusers(diff)
    unet = ldm_unet(base, seed=123)  # different weights, all to be replaced
    result = unet.load_state_dict(convert_diffusers_unet_to_ldm(diff.state_dict(), layout), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    inputs = sample_inputs(base)
    with torch.no_grad():
        expected = run_diffusers(diff, base, inputs)
        got = run_ldm(unet, base, inputs)
    assert expected.abs().mean() > 0.1  # a real signal, not zeros
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_state_dict_conversion_reverse(base, diff, ldm):
    layout = UNetLayout.from_ldm(ldm)
    original = ldm.state_dict()
    back = convert_ldm_unet_to_diffusers(original, layout)
    assert set(back) == set(diff.state_dict())
    twice = convert_diffusers_unet_to_ldm(back, layout)
    assert list(twice) == list(original) and all(twice[k] is v for k, v in original.items())
    fresh = diffusers_unet(base, seed=5)
    fresh.load_state_dict(back, strict=True)
    inputs = sample_inputs(base, seed=2)
    with torch.no_grad():
        expected, got = run_ldm(ldm, base, inputs), run_diffusers(fresh, base, inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_conversion_rejects_unknown_key():
    with pytest.raises(ModelLayoutError, match=r"^UNet name 'model.diffusion_model.out.0.weight' has no diffusers"):
        convert_ldm_unet_to_diffusers({"model.diffusion_model.out.0.weight": torch.zeros(1)}, SD1_REAL)


# -- LoRA targets ----------------------------------------------------------------------------
# Tiny-model counts. sd1: 11 transformers (4 down, 1 mid, 6 up) x 1 block; sdxl: 11 x 2 blocks.
# attn: 8 per block; mlp: 2 per block + proj_in/out per transformer; conv: 17 resnets x 3,
# plus conv_shortcut where channels change (sd1: 1 down + 9 up; sdxl: 2 down + 9 up), plus
# 2 downsamplers and 2 upsamplers.
COUNTS = {
    ("sd1", "attn"): 88, ("sd1", "attn-mlp"): 88 + 22 + 22, ("sd1", "attn-mlp-conv"): 132 + 51 + 10 + 4,
    ("sdxl", "attn"): 176, ("sdxl", "attn-mlp"): 176 + 44 + 22, ("sdxl", "attn-mlp-conv"): 242 + 51 + 11 + 4,
}
SPOT_KEYS = {
    "sd1": {
        "lora_unet_down_blocks_0_attentions_0_proj_in": nn.Conv2d,
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q": nn.Linear,
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0": nn.Linear,
        "lora_unet_up_blocks_2_attentions_2_transformer_blocks_0_ff_net_0_proj": nn.Linear,
        "lora_unet_up_blocks_0_upsamplers_0_conv": nn.Conv2d,
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut": nn.Conv2d,
        "lora_unet_mid_block_resnets_1_time_emb_proj": nn.Linear,
    },
    "sdxl": {
        "lora_unet_input_blocks_4_1_proj_in": nn.Linear,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": nn.Linear,
        "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k": nn.Linear,
        "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2": nn.Linear,
        "lora_unet_output_blocks_2_2_conv": nn.Conv2d,
        "lora_unet_input_blocks_3_0_op": nn.Conv2d,
        "lora_unet_output_blocks_8_0_skip_connection": nn.Conv2d,
        "lora_unet_middle_block_2_emb_layers_1": nn.Linear,
    },
}
PREFIXES = {"sd1": ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"),
            "sdxl": ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")}


@pytest.mark.parametrize("preset", PRESETS)
def test_ldm_targets(base, ldm, preset):
    targets = unet_lora_targets(ldm, base, preset)
    keys = [k for k, _ in targets]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    assert len(keys) == COUNTS[(base, preset)]
    assert keys[0].startswith(PREFIXES[base][0])
    assert all(k.startswith(PREFIXES[base]) for k in keys)
    assert all(type(m) in (nn.Linear, nn.Conv2d) for _, m in targets)
    if preset == "attn-mlp-conv":
        found = dict(targets)
        for key, kind in SPOT_KEYS[base].items():
            assert type(found[key]) is kind, key
    # The module returned is the model's own module (not a copy) at the mapped name.
    layout = UNetLayout.from_ldm(ldm)
    modules = dict(ldm.named_modules())
    by_id = {id(m): n for n, m in modules.items()}
    for key, module in targets:
        name = by_id[id(module)]
        expected = name if base == "sdxl" else layout.to_diffusers(name)
        assert key == "lora_unet_" + expected.replace(".", "_")


def test_presets_nest(base, ldm):
    sets = [{k for k, _ in unet_lora_targets(ldm, base, p)} for p in PRESETS]
    assert sets[0] < sets[1] < sets[2]


@pytest.mark.parametrize("preset", PRESETS)
def test_targets_same_keys_on_both_sides(base, diff, ldm, preset):
    from_diffusers = unet_lora_targets(diff, base, preset)
    from_ldm = unet_lora_targets(ldm, base, preset)
    assert [k for k, _ in from_diffusers] == [k for k, _ in from_ldm]
    for (key, a), (_, b) in zip(from_diffusers, from_ldm):
        assert type(a) is type(b), key
        assert a.weight.shape == b.weight.shape, key


def test_unknown_preset(ldm, base):
    # the error names the setting a user can change: it must be a real one
    assert PRESET_SETTING in {f.name for f in dataclasses.fields(TrainConfig)}
    with pytest.raises(LoraTargetError, match=r"^unknown LoRA target preset 'all' \(setting: lora_preset; "
                                               r"allowed: attn, attn-mlp, attn-mlp-conv\)$"):
        unet_lora_targets(ldm, base, "all")


def test_unknown_base(ldm):
    message = r"^unknown base model 'sd3' for UNet LoRA targets \(allowed: sd1, sdxl\)$"
    with pytest.raises(LoraTargetError, match=message):
        unet_lora_targets(ldm, "sd3", "attn")


def test_not_a_unet():
    with pytest.raises(ModelLayoutError, match=r"^Sequential is neither a diffusers nor an LDM UNet$"):
        unet_lora_targets(nn.Sequential(nn.Linear(2, 2)), "sd1", "attn")


def test_nothing_matches():
    unet = ldm_unet("sd1")
    for module in unet.modules():
        if hasattr(module, "transformer_blocks"):
            module.transformer_blocks = nn.ModuleList()
    with pytest.raises(LoraTargetError, match=r"^LoRA target preset 'attn' matched no Linear/Conv2d module of this "
                                               r"ldm UNet \(UNetModel\)$"):
        unet_lora_targets(unet, "sd1", "attn")
