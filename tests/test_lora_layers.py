"""LoRA layers: attach/detach leaves the host bit-identical; the low-rank math is what kohya writes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pivotal.adapters.lora_layers import LoraConv2d, LoraLinear, LoraMultiheadAttention, part_of_key
from pivotal.adapters.network import LoraNetwork, count_parts, create_lora_module
from pivotal.errors import LoraTargetError


class Host(nn.Module):
    """A small real network with every supported layer kind."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=batch_first)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.lin(x)
        seq = h if self.attn.batch_first else h.transpose(0, 1)
        a, _ = self.attn(seq, seq, seq, need_weights=False)
        return a, self.conv3(self.conv1(img))


def targets(host: Host) -> list[tuple[str, nn.Module]]:
    return [("lora_unet_lin", host.lin), ("lora_unet_conv1", host.conv1),
            ("lora_unet_conv3", host.conv3), ("lora_te2_text_model_encoder_layers_0_self_attn", host.attn)]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 3, 8, 8, generator=g)


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def randomize(net: LoraNetwork) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)


@pytest.mark.parametrize("batch_first", [True, False])
def test_fresh_lora_is_noop_and_detach_is_bit_identical(batch_first: bool) -> None:
    torch.manual_seed(0)
    host = Host(batch_first)
    x, img = inputs()
    before_out = host(x, img)
    before_sd = snapshot(host)
    net = LoraNetwork(targets(host), rank=4, alpha=2.0)
    with net.attached():
        fresh = host(x, img)
        # up weights start at zero: a fresh LoRA changes nothing
        for a, b in zip(fresh, before_out):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        randomize(net)
        changed = host(x, img)
        assert not torch.allclose(changed[0], before_out[0])
        assert not torch.allclose(changed[1], before_out[1])
        # the host's state dict never contains LoRA tensors, even while attached
        assert set(host.state_dict()) == set(before_sd)
    after_out = host(x, img)
    for a, b in zip(after_out, before_out):
        assert torch.equal(a, b)
    for k, v in host.state_dict().items():
        assert torch.equal(v, before_sd[k])
    for m in host.modules():
        assert "forward" not in m.__dict__ and "_pivotal_lora" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_linear_math_matches_kohya_formula() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 5)
    mod = LoraLinear("lora_unet_x", lin, rank=2, alpha=1.0)
    with torch.no_grad():
        mod.algorithm.up.normal_()
    x = torch.randn(3, 6)
    expected = lin(x) + (x @ mod.algorithm.down.T @ mod.algorithm.up.T) * (1.0 / 2)
    mod.attach()
    try:
        torch.testing.assert_close(lin(x), expected)
    finally:
        mod.detach()


def test_conv_shapes_follow_kohya_layout() -> None:
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    mod = LoraConv2d("lora_unet_c", conv, rank=4, alpha=4)
    sd = mod.kohya_state_dict()
    assert sd["lora_unet_c.lora_down.weight"].shape == (4, 8, 3, 3)
    assert sd["lora_unet_c.lora_up.weight"].shape == (16, 4, 1, 1)
    assert sd["lora_unet_c.alpha"].dtype == torch.float32 and sd["lora_unet_c.alpha"].item() == 4


def test_mha_saved_as_separate_qkv_out_modules_and_matches_explicit_math() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=True)
    mod = LoraMultiheadAttention("lora_te2_text_model_encoder_layers_0_self_attn", mha, rank=2, alpha=2)
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0, 0.3)
    sd = mod.kohya_state_dict()
    names = sorted({k.split(".", 1)[0] for k in sd})
    assert names == [f"lora_te2_text_model_encoder_layers_0_self_attn_{p}"
                     for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    # Reference: an equivalent MHA whose weights have the deltas merged in.
    ref = nn.MultiheadAttention(12, 3, batch_first=True)
    ref.load_state_dict(mha.state_dict())
    with torch.no_grad():
        delta = {p: sd[f"{mod.key}_{p}.lora_up.weight"] @ sd[f"{mod.key}_{p}.lora_down.weight"]
                 for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
        ref.in_proj_weight += torch.cat([delta["q_proj"], delta["k_proj"], delta["v_proj"]])
        ref.out_proj.weight += delta["out_proj"]
    x = torch.randn(2, 7, 12)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    mod.attach()
    try:
        got, _ = mha(x, x, x, need_weights=False, attn_mask=mask)
    finally:
        mod.detach()
    want, _ = ref(x, x, x, need_weights=False, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_lora_not_host() -> None:
    torch.manual_seed(0)
    host = Host()
    host.requires_grad_(False)
    net = LoraNetwork(targets(host), rank=2, alpha=2)
    randomize(net)
    x, img = inputs()
    with net.attached():
        a, c = host(x, img)
        (a.square().mean() + c.square().mean()).backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads)
    assert all(p.grad is None for p in host.parameters())


def test_fp16_host_gets_fp32_lora_gradients() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8).to(torch.bfloat16)
    mod = LoraLinear("lora_unet_l", lin, rank=2, alpha=2)
    mod.attach()
    try:
        out = lin(torch.randn(2, 8, dtype=torch.bfloat16))
    finally:
        mod.detach()
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert mod.algorithm.up.grad is not None and mod.algorithm.up.grad.dtype == torch.float32


def test_multiplier_per_part() -> None:
    torch.manual_seed(0)
    host = Host()
    x, img = inputs()
    base = host(x, img)
    net = LoraNetwork(targets(host), rank=2, alpha=2)
    randomize(net)
    with net.attached():
        net.set_multiplier("unet", 0.0)
        net.set_multiplier("te2", 0.0)
        off = host(x, img)
        net.set_multiplier("unet", 1.0)
        on = host(x, img)
    assert torch.equal(off[1], base[1]) and torch.equal(off[0], base[0])
    assert not torch.allclose(on[1], base[1])
    with pytest.raises(LoraTargetError, match="this LoRA has no part 'te1' \\(it has: te2, unet\\)"):
        net.set_multiplier("te1", 1.0)


def test_kohya_round_trip_and_from_file_ranks() -> None:
    torch.manual_seed(0)
    host = Host()
    x, img = inputs()
    net = LoraNetwork(targets(host), rank=3, alpha=1.5)
    randomize(net)
    sd = net.kohya_state_dict()
    assert count_parts(list(sd)) == {"unet": 3, "te2": 4}
    with net.attached():
        want = host(x, img)
    net2, report = LoraNetwork.from_kohya_state_dict(targets(host), sd)
    assert report.matched == len(sd) and not report.unmatched and not report.missing
    assert {m.rank for m in net2.modules_of()} == {3}
    with net2.attached():
        got = host(x, img)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_unmatched_keys_reported_and_zero_match_refused() -> None:
    host = Host()
    net = LoraNetwork(targets(host), rank=2, alpha=2)
    sd = net.kohya_state_dict()
    sd["lora_unet_nowhere.lora_down.weight"] = torch.zeros(2, 2)
    report = net.load_kohya_state_dict(sd)
    assert report.unmatched == ["lora_unet_nowhere.lora_down.weight"]
    with pytest.raises(LoraTargetError, match="none of the 1 LoRA tensors matches this network"):
        net.load_kohya_state_dict({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 2)})
    with pytest.raises(LoraTargetError, match="none of the file's LoRA modules matches this model"):
        LoraNetwork.from_kohya_state_dict(targets(host), {"lora_unet_zz.lora_down.weight": torch.zeros(1, 1)})


def test_shape_mismatch_names_key() -> None:
    host = Host()
    net = LoraNetwork(targets(host), rank=2, alpha=2)
    sd = net.kohya_state_dict()
    sd["lora_unet_lin.lora_down.weight"] = torch.zeros(2, 99)
    with pytest.raises(LoraTargetError, match=r"lora_unet_lin.lora_down.weight: shape \(2, 99\) does not fit"):
        net.load_kohya_state_dict(sd)


def test_double_attach_refused_and_attach_is_all_or_nothing() -> None:
    host = Host()
    net = LoraNetwork(targets(host), rank=2, alpha=2)
    other = LoraNetwork([("lora_unet_conv3", host.conv3)], rank=2, alpha=2)
    other.attach()
    with pytest.raises(LoraTargetError, match="lora_unet_conv3: a Pivotal LoRA is already attached"):
        net.attach()
    # the modules attached before the failure were detached again
    assert "forward" not in host.lin.__dict__ and "forward" not in host.conv1.__dict__
    other.detach()
    other.detach()  # idempotent
    assert "forward" not in host.conv3.__dict__


def test_foreign_instance_forward_is_kept_and_restored() -> None:
    lin = nn.Linear(4, 4)
    calls = []
    original = lin.forward

    def foreign(x):
        calls.append(1)
        return original(x)

    lin.forward = foreign
    mod = create_lora_module("lora_te_x", lin, 2, 2)
    mod.attach()
    lin(torch.zeros(1, 4))
    mod.detach()
    assert lin.forward is foreign and calls == [1]


def test_bad_settings_and_types() -> None:
    with pytest.raises(LoraTargetError, match="LoRA rank must be >= 1, got 0"):
        LoraLinear("lora_unet_a", nn.Linear(2, 2), rank=0, alpha=1)
    with pytest.raises(LoraTargetError, match=r"LoRA dropout must be in \[0, 1\), got 1.0"):
        LoraLinear("lora_unet_a", nn.Linear(2, 2), rank=1, alpha=1, dropout=1.0)
    with pytest.raises(LoraTargetError, match="no LoRA layer for module type GroupNorm"):
        create_lora_module("lora_unet_n", nn.GroupNorm(1, 4), 1, 1)
    with pytest.raises(LoraTargetError, match="LoRA key 'unet_x' has no known prefix"):
        part_of_key("unet_x")
    assert [part_of_key(k) for k in ("lora_te_a", "lora_te1_a", "lora_te2_a", "lora_unet_a")] == \
        ["te", "te1", "te2", "unet"]
