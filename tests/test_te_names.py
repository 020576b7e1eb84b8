"""kohya LoRA key names for HF and open_clip text encoders, and the open_clip -> HF converter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pivotal.adapters.te_names import (
    MHA_SUBKEYS,
    expand_lora_keys,
    hf_text_model_prefix,
    openclip_to_hf_state_dict,
    text_encoder_layout,
    text_encoder_lora_targets,
    token_embedding_of,
)
from pivotal.errors import LoraTargetError, ModelLayoutError
from tiny_text import (
    bpe_path,
    clip_tokenizer,
    encode_hf,
    encode_openclip,
    hf_text_config,
    hf_text_model,
    openclip_text_tower,
)

needs_bpe = pytest.mark.skipif(bpe_path() is None, reason="open_clip_torch is not installed")


class _A1111StyleWrapper(nn.Module):
    """Like A1111's FrozenCLIPEmbedderWithCustomWords(.wrapped) -> FrozenCLIPEmbedder(.transformer)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.transformer = inner


class _Hijack(nn.Module):
    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped


def _expected_keys(part: str, layers: int, mlp: bool) -> list[str]:
    keys = []
    for i in range(layers):
        base = f"lora_{part}_text_model_encoder_layers_{i}"
        keys += [f"{base}_self_attn_{s}" for s in MHA_SUBKEYS]
        if mlp:
            keys += [f"{base}_mlp_fc1", f"{base}_mlp_fc2"]
    return keys


@pytest.mark.parametrize("preset,mlp", [("attn", False), ("attn-mlp", True), ("attn-mlp-conv", True)])
def test_hf_keys_and_modules(preset: str, mlp: bool) -> None:
    model = hf_text_model("clip_l")
    targets = text_encoder_lora_targets(model, "te", preset)
    assert [k for k, _ in targets] == _expected_keys("te", 2, mlp)
    assert all(isinstance(m, nn.Linear) for _, m in targets)
    layout = text_encoder_layout(model)
    assert targets[0][1] is layout.layers[0].self_attn.q_proj
    assert targets[-1][1] is (layout.layers[1].mlp.fc2 if mlp else layout.layers[1].self_attn.out_proj)


@needs_bpe
@pytest.mark.parametrize("preset", ["attn", "attn-mlp"])
def test_open_clip_keys_match_hf_keys(preset: str) -> None:
    tower = openclip_text_tower("clip_g")
    hf = hf_text_model("clip_g")
    oc_targets = text_encoder_lora_targets(tower, "te2", preset)
    hf_targets = text_encoder_lora_targets(hf, "te2", preset)
    assert expand_lora_keys(oc_targets) == expand_lora_keys(hf_targets)
    attn_key, attn = oc_targets[0]
    assert attn_key == "lora_te2_text_model_encoder_layers_0_self_attn"
    assert attn is tower.transformer.resblocks[0].attn and isinstance(attn, nn.MultiheadAttention)
    if preset == "attn-mlp":
        mlp = tower.transformer.resblocks[0].mlp
        assert oc_targets[1] == ("lora_te2_text_model_encoder_layers_0_mlp_fc1", mlp.c_fc)
        assert oc_targets[2] == ("lora_te2_text_model_encoder_layers_0_mlp_fc2", mlp.c_proj)
    else:
        assert all(isinstance(m, nn.MultiheadAttention) for _, m in oc_targets)


def test_wrappers_are_seen_through() -> None:
    from transformers import CLIPTextModelWithProjection

    model = hf_text_model("clip_l")
    wrapped = _Hijack(_A1111StyleWrapper(model))
    assert [k for k, _ in text_encoder_lora_targets(wrapped, "te1", "attn")] == _expected_keys("te1", 2, False)
    assert token_embedding_of(wrapped) is token_embedding_of(model)
    with_proj = CLIPTextModelWithProjection(hf_text_config("clip_g"))
    keys = [k for k, _ in text_encoder_lora_targets(with_proj, "te2", "attn-mlp")]
    assert keys == _expected_keys("te2", 2, True)


@needs_bpe
def test_token_embedding_of_open_clip() -> None:
    tower = openclip_text_tower("clip_g")
    assert token_embedding_of(_Hijack(tower)) is tower.token_embedding
    assert text_encoder_layout(tower).kind == "open_clip"


def test_bad_part_preset_and_no_match() -> None:
    model = hf_text_model("clip_l")
    with pytest.raises(LoraTargetError, match=r"^text-encoder part 'te3' is not one of te, te1, te2$"):
        text_encoder_lora_targets(model, "te3", "attn")
    with pytest.raises(LoraTargetError, match=r"^LoRA preset 'conv' is not one of attn, attn-mlp, attn-mlp-conv$"):
        text_encoder_lora_targets(model, "te", "conv")
    with pytest.raises(LoraTargetError, match=r"^lora_te: Linear: no CLIP text transformer found"):
        text_encoder_lora_targets(nn.Linear(2, 2), "te", "attn")
    with pytest.raises(ModelLayoutError, match=r"^Sequential: no CLIP text transformer found"):
        token_embedding_of(nn.Sequential())


@needs_bpe
def test_converted_weights_give_identical_hidden_states() -> None:
    from transformers import CLIPTextModelWithProjection

    tower = openclip_text_tower("clip_g", seed=3)
    model = hf_text_model("clip_g", seed=4)
    converted = openclip_to_hf_state_dict(tower.state_dict(), prefix=hf_text_model_prefix(model), projection=False)
    result = model.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == []
    assert all(k.endswith("position_ids") for k in result.missing_keys)  # a buffer in transformers 4.x
    tok = clip_tokenizer()
    rows = []
    for prompt in ["a photo of a cat", "an oil painting of a lighthouse at dusk, dramatic sky"]:
        ids = tok.encode(prompt, add_special_tokens=False)
        rows.append([49406] + ids + [49407] + [0] * (75 - len(ids)))  # open_clip pads with 0
    ids = torch.tensor(rows)
    with torch.no_grad():
        pooled_oc, tokens_oc = tower(ids)
        tokens_hf = encode_hf(model, ids)
    torch.testing.assert_close(tokens_hf, tokens_oc, atol=1e-5, rtol=1e-5)
    assert torch.equal(encode_openclip(tower, ids), tokens_oc)

    with_proj = CLIPTextModelWithProjection(hf_text_config("clip_g")).eval()
    converted = openclip_to_hf_state_dict(tower.state_dict(), prefix=hf_text_model_prefix(with_proj))
    result = with_proj.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == [] and all(k.endswith("position_ids") for k in result.missing_keys)
    with torch.no_grad():
        text_embeds = with_proj(input_ids=ids).text_embeds
    torch.testing.assert_close(text_embeds, pooled_oc, atol=1e-5, rtol=1e-5)


def test_converter_splits_in_proj_and_refuses_unknown_keys() -> None:
    d = 8
    sd = {
        "transformer.resblocks.0.attn.in_proj_weight": torch.arange(3 * d * d, dtype=torch.float32).view(3 * d, d),
        "transformer.resblocks.0.attn.in_proj_bias": torch.arange(3 * d, dtype=torch.float32),
        "transformer.resblocks.0.mlp.c_fc.weight": torch.zeros(4 * d, d),
        "visual.conv1.weight": torch.zeros(1),
        "logit_scale": torch.zeros(()),
    }
    out = openclip_to_hf_state_dict(sd, prefix="")
    assert sorted(out) == sorted(
        [f"encoder.layers.0.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")]
        + ["encoder.layers.0.mlp.fc1.weight"]
    )
    in_proj = sd["transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(out["encoder.layers.0.self_attn.k_proj.weight"], in_proj[d : 2 * d])
    assert torch.equal(out["encoder.layers.0.self_attn.v_proj.bias"], torch.arange(2 * d, 3 * d, dtype=torch.float32))
    with pytest.raises(ModelLayoutError,
                       match=r"^transformer\.resblocks\.0\.ls_1\.gamma: open_clip text weight has no HF"):
        openclip_to_hf_state_dict({"transformer.resblocks.0.ls_1.gamma": torch.zeros(d)})
    with pytest.raises(ModelLayoutError, match=r"^cls_emb: open_clip text weight has no HF"):
        openclip_to_hf_state_dict({"cls_emb": torch.zeros(d)})
