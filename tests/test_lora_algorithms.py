"""LoRA / LoCon (+ Tucker) / LoHa / LoKr / DoRA: numerically what the reference implementation
and the webuis' built-in loaders compute, on every layer kind; foreign files built from the
documented key rules load and apply exactly; ``pivotal inspect`` names the algorithm per part.

The oracle (tests/algorithm_oracle.py) is LyCORIS' functional math with the webuis' scale and
DoRA rules; its functions are first checked against formulas written out here.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from algorithm_oracle import ly_general, ly_locon, ly_loha, ly_lokr, reference_weight
from pivotal.adapters.algorithms import AlgorithmSpec, describe_module
from pivotal.adapters.algorithms.lokr import factorization
from pivotal.adapters.lora_layers import LoraModule, create_lora_module
from pivotal.adapters.network import LoraNetwork
from pivotal.cli.main import main
from pivotal.errors import BundleError, LoraTargetError
from pivotal.formats.bundle import read_bundle

G = torch.Generator().manual_seed(0)


def rnd(*shape: int, std: float = 0.3) -> torch.Tensor:
    return torch.randn(shape, generator=G) * std


# -- 1. the oracle's own functions against formulas written out here ---------------------------------
def test_lycoris_loha_matches_the_hadamard_formula_plain_and_tucker() -> None:
    # Plain: ΔW = γ (w1a @ w1b) ⊙ (w2a @ w2b). lycoris-lora 3.0.0's helper built the second
    # product from w1a (a copied line); 4.1.3, installed here, is right — this test would catch it.
    w1a, w1b, w2a, w2b = rnd(6, 3), rnd(3, 5), rnd(6, 3), rnd(3, 5)
    want = 0.7 * torch.stack([torch.stack([sum(w1a[i, r] * w1b[r, j] for r in range(3)) *
                                           sum(w2a[i, r] * w2b[r, j] for r in range(3)) for j in range(5)])
                              for i in range(6)])
    got = ly_loha.diff_weight(w1b, w1a, w2b, w2a, None, None, gamma=torch.tensor(0.7))
    torch.testing.assert_close(got, want)
    # conv, flattened b: reshaped to (out, in, kh, kw)
    b4, b4_2 = rnd(3, 4 * 9), rnd(3, 4 * 9)
    got = ly_loha.diff_weight(b4, w1a, b4_2, w2a, None, None, gamma=torch.tensor(1.0)).reshape(6, 4, 3, 3)
    torch.testing.assert_close(got, ((w1a @ b4) * (w2a @ b4_2)).reshape(6, 4, 3, 3))
    # Tucker: W_i[p, q] = Σ_ab t_i[a, b] a_i[a, p] b_i[b, q]
    t1, t2, a1, a2, b1, b2 = rnd(3, 3, 3, 3), rnd(3, 3, 3, 3), rnd(3, 6), rnd(3, 6), rnd(3, 4), rnd(3, 4)

    def core(t, a, b):
        return sum(t[x, y][None, None] * a[x][:, None, None, None] * b[y][None, :, None, None]
                   for x in range(3) for y in range(3))

    got = ly_loha.diff_weight(b1, a1, b2, a2, t1, t2, gamma=torch.tensor(1.0))
    torch.testing.assert_close(got, core(t1, a1, b1) * core(t2, a2, b2), rtol=1e-5, atol=1e-5)


def test_lycoris_lokr_locon_and_dora_match_their_formulas() -> None:
    w1, w2 = rnd(2, 3), rnd(4, 5)
    kron = torch.zeros(8, 15)
    for i in range(2):
        for j in range(3):
            kron[i * 4:(i + 1) * 4, j * 5:(j + 1) * 5] = w1[i, j] * w2
    torch.testing.assert_close(ly_lokr.kron_weight(w1, None, None, w2, None, None, None, scale=1.0), kron)
    w2c = rnd(4, 5, 3, 3)
    got = ly_lokr.kron_weight(w1, None, None, w2c, None, None, None, scale=0.5)
    torch.testing.assert_close(got[4 + 1, 5 * 2 + 3], 0.5 * w1[1, 2] * w2c[1, 3])
    # LoCon Tucker: ΔW[i, j] = Σ_nm up[i, n] mid[n, m] down[m, j]
    up, mid, down = rnd(6, 2, 1, 1), rnd(2, 2, 3, 3), rnd(2, 4, 1, 1)
    want = torch.einsum("in,nmkl,mj->ijkl", up.flatten(1), mid, down.flatten(1))
    torch.testing.assert_close(ly_locon.diff_weight(down, up, mid, gamma=1.0), want)
    # DoRA (webui convention): W + s·((W + ΔW) · m / ‖W + ΔW‖_col − W), the norm per input column
    w, d, m = rnd(5, 4), rnd(5, 4), rnd(1, 4).abs() + 0.5
    merged = w + d
    norms = torch.stack([merged[:, j].norm() for j in range(4)])
    want = w + 0.6 * (merged * (m[0] / norms) - w)
    torch.testing.assert_close(ly_general.apply_dora_scale(w, d, m, 0.6), want)


def test_lokr_factorization_is_lycoris() -> None:
    from lycoris.functional.general import factorization as ly_factorization

    for dim in (1, 7, 12, 20, 64, 127, 128, 250, 320, 360, 1024, 1280):
        for factor in (-1, 2, 4, 8, 16):
            assert factorization(dim, factor) == ly_factorization(dim, factor), (dim, factor)


# -- 2. Pivotal's modules against the oracle, per algorithm and layer kind ---------------------------
class Host(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(12, 20)
        self.conv1 = nn.Conv2d(8, 12, 1)
        self.conv3 = nn.Conv2d(8, 12, 3, padding=1, stride=2)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)


KEYS = {"lin": "lora_unet_lin", "conv1": "lora_unet_conv1", "conv3": "lora_unet_conv3",
        "attn": "lora_te2_text_model_encoder_layers_0_self_attn"}
SPECS = {
    "lora": AlgorithmSpec("lora"),
    "locon-tucker": AlgorithmSpec("lora", options={"tucker": True}),
    "loha": AlgorithmSpec("loha"),
    "loha-tucker": AlgorithmSpec("loha", options={"tucker": True}),
    "lokr": AlgorithmSpec("lokr"),
    "lokr-factor4-tucker": AlgorithmSpec("lokr", options={"factor": 4, "tucker": True}),
    "lokr-both": AlgorithmSpec("lokr", options={"decompose_both": True}),
    "lora-dora": AlgorithmSpec("lora", dora=True),
    "loha-dora": AlgorithmSpec("loha", dora=True),
    "lokr-dora": AlgorithmSpec("lokr", dora=True),
}


def run(host: Host, layer: str, x: torch.Tensor) -> torch.Tensor:
    m = getattr(host, layer)
    return m(x, x, x, need_weights=False)[0] if layer == "attn" else m(x)


def inputs(layer: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return {"lin": torch.randn(3, 12, generator=g), "attn": torch.randn(2, 5, 12, generator=g)}.get(
        layer, torch.randn(2, 8, 6, 6, generator=g))


def reference_host(host: Host, layer: str, tensors: dict[str, torch.Tensor], key: str, strength: float) -> Host:
    """A copy of ``host`` whose ``layer`` weight is what the webuis merge in."""
    ref = copy.deepcopy(host)
    mod = getattr(ref, layer)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        name, _, rest = k.partition(".")
        groups.setdefault(name, {})[rest] = t
    with torch.no_grad():
        if layer == "attn":
            chunks = list(mod.in_proj_weight.chunk(3, 0))
            new = [reference_weight(groups[f"{key}_{p}"], w, strength)
                   for p, w in zip(("q_proj", "k_proj", "v_proj"), chunks)]
            mod.in_proj_weight.copy_(torch.cat(new))
            mod.out_proj.weight.copy_(reference_weight(groups[f"{key}_out_proj"], mod.out_proj.weight, strength))
        else:
            mod.weight.copy_(reference_weight(groups[key], mod.weight, strength))
    return ref


def randomize(module: LoraModule, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))  # stay a plausible magnitude
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("layer", list(KEYS))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_module_equals_reference_on_every_layer_kind(spec_name: str, layer: str) -> None:
    host = Host()
    x = inputs(layer)
    before = run(host, layer, x)
    mod = create_lora_module(KEYS[layer], getattr(host, layer), 2, 1.5, spec=SPECS[spec_name])
    with torch.no_grad():
        mod.attach()
        try:
            torch.testing.assert_close(run(host, layer, x), before, rtol=0, atol=1e-6)  # fresh: a no-op
        finally:
            mod.detach()
    randomize(mod)
    tensors = mod.kohya_state_dict()
    names = {k.partition(".")[2] for k in tensors}
    assert ("dora_scale" in names) == SPECS[spec_name].dora
    for strength in (1.0, 0.6):
        mod.multiplier = strength
        mod.attach()
        try:
            with torch.no_grad():
                got = run(host, layer, x)
        finally:
            mod.detach()
        want = run(reference_host(host, layer, tensors, KEYS[layer], strength), layer, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the delta each module reports is the host weight's shape
    for name, d in mod.delta_weights().items():
        assert d.shape == (getattr(host, layer).weight.shape if layer != "attn" else (12, 12)), name
    assert torch.equal(run(host, layer, x), before)


def test_tucker_layouts_are_the_lycoris_shapes() -> None:
    host = Host()
    sd = create_lora_module("lora_unet_c", host.conv3, 2, 2, spec=SPECS["locon-tucker"]).kohya_state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items() if k != "lora_unet_c.alpha"} == {
        "lora_unet_c.lora_down.weight": (2, 8, 1, 1), "lora_unet_c.lora_mid.weight": (2, 2, 3, 3),
        "lora_unet_c.lora_up.weight": (12, 2, 1, 1)}
    sd = create_lora_module("lora_unet_c", host.conv3, 2, 2, spec=SPECS["loha-tucker"]).kohya_state_dict()
    assert tuple(sd["lora_unet_c.hada_t1"].shape) == (2, 2, 3, 3)
    assert tuple(sd["lora_unet_c.hada_w1_a"].shape) == (2, 12)
    sd = create_lora_module("lora_unet_c", host.conv3, 2, 2, spec=SPECS["loha"]).kohya_state_dict()
    assert tuple(sd["lora_unet_c.hada_w1_b"].shape) == (2, 8 * 9)
    # LoKr on (12, 8, 3, 3), factor -1: 12 = 3·4, 8 = 2·4; rank 2 < 4/2 is false, so w2 is full
    sd = create_lora_module("lora_unet_c", host.conv3, 2, 2, spec=SPECS["lokr"]).kohya_state_dict()
    assert tuple(sd["lora_unet_c.lokr_w1"].shape) == (3, 2) and tuple(sd["lora_unet_c.lokr_w2"].shape) == (4, 4, 3, 3)
    # DoRA magnitude: one per input column
    sd = create_lora_module("lora_unet_c", host.conv3, 2, 2, spec=SPECS["lora-dora"]).kohya_state_dict(torch.float16)
    assert tuple(sd["lora_unet_c.dora_scale"].shape) == (1, 8, 1, 1)
    assert sd["lora_unet_c.dora_scale"].dtype == torch.float32
    assert sd["lora_unet_c.lora_up.weight"].dtype == torch.float16


def test_dora_gradient_reaches_every_tensor() -> None:
    host = Host().requires_grad_(False)
    mod = create_lora_module("lora_unet_lin", host.lin, 2, 2, spec=SPECS["lokr-dora"])
    randomize(mod)
    with torch.enable_grad():
        mod.attach()
        try:
            host.lin(inputs("lin")).square().sum().backward()
        finally:
            mod.detach()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mod.parameters())


# -- 3. foreign files, built from the documented key rules (not Pivotal's writer) -------------------
def foreign_tensors(host: Host, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A LyCORIS-style file mixing every layout, tensor names and shapes as LyCORIS documents them."""
    def r(*s):
        return torch.randn(s, generator=gen) * 0.3

    t: dict[str, torch.Tensor] = {}
    # LoCon with Tucker on the 3x3 conv, no alpha (scale 1)
    t |= {"lora_unet_conv3.lora_down.weight": r(4, 8, 1, 1), "lora_unet_conv3.lora_mid.weight": r(4, 4, 3, 3),
          "lora_unet_conv3.lora_up.weight": r(12, 4, 1, 1)}
    # LoHa on the Linear, alpha 2 over rank 4, with DoRA (per input column)
    t |= {"lora_unet_lin.hada_w1_a": r(20, 4), "lora_unet_lin.hada_w1_b": r(4, 12),
          "lora_unet_lin.hada_w2_a": r(20, 4), "lora_unet_lin.hada_w2_b": r(4, 12),
          "lora_unet_lin.alpha": torch.tensor(2.0),
          "lora_unet_lin.dora_scale": host.lin.weight.detach().norm(dim=0, keepdim=True) * 1.1}
    # LoKr on the 1x1 conv: w1_a/w1_b factors, full w2, alpha 1 over w1's rank 1
    t |= {"lora_unet_conv1.lokr_w1_a": r(3, 1), "lora_unet_conv1.lokr_w1_b": r(1, 2),
          "lora_unet_conv1.lokr_w2": r(4, 4, 1, 1), "lora_unet_conv1.alpha": torch.tensor(1.0)}
    # the packed attention: LoKr with factorized w2 on q, LoHa Tucker-free on k, LoRA on v and out
    a = "lora_te_text_model_encoder_layers_0_self_attn"
    t |= {f"{a}_q_proj.lokr_w1": r(3, 3), f"{a}_q_proj.lokr_w2_a": r(4, 1), f"{a}_q_proj.lokr_w2_b": r(1, 4),
          f"{a}_q_proj.alpha": torch.tensor(0.5)}
    t |= {f"{a}_k_proj.hada_w1_a": r(12, 2), f"{a}_k_proj.hada_w1_b": r(2, 12),
          f"{a}_k_proj.hada_w2_a": r(12, 2), f"{a}_k_proj.hada_w2_b": r(2, 12)}
    for p in ("v_proj", "out_proj"):
        t |= {f"{a}_{p}.lora_down.weight": r(3, 12), f"{a}_{p}.lora_up.weight": r(12, 3),
              f"{a}_{p}.alpha": torch.tensor(3.0)}
    return t


def host_targets_keys() -> dict[str, str]:
    return {"lin": "lora_unet_lin", "conv1": "lora_unet_conv1", "conv3": "lora_unet_conv3",
            "attn": "lora_te_text_model_encoder_layers_0_self_attn"}


def host_targets(host: Host) -> list:
    return [(key, getattr(host, layer)) for layer, key in host_targets_keys().items()]


def test_foreign_lycoris_file_loads_and_applies_exactly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    host = Host()
    tensors = foreign_tensors(host, torch.Generator().manual_seed(5))
    path = tmp_path / "lyco.safetensors"
    save_file(tensors, str(path), {"ss_network_module": "lycoris.kohya", "ss_base_model_version": "sd_v1"})
    bundle = read_bundle(path)
    assert bundle.unknown_keys == [] and set(bundle.lora) == set(tensors)
    net, report = LoraNetwork.from_kohya_state_dict(host_targets(host), bundle.lora)
    assert report.matched == len(tensors) and not report.unmatched and not report.missing
    for strength in (1.0, 0.7):
        for part in net.parts:
            net.set_multiplier(part, strength)
        with net.attached(), torch.no_grad():
            got = {layer: run(host, layer, inputs(layer)) for layer in KEYS}
        for layer, key in host_targets_keys().items():
            want = run(reference_host(host, layer, tensors, key, strength), layer, inputs(layer))
            torch.testing.assert_close(got[layer], want, rtol=1e-4, atol=1e-5, msg=f"{layer} at {strength}")
    # Pivotal writes back what it read (plus alpha = rank where the file had none: the same scale)
    written = net.kohya_state_dict()
    for k, t in tensors.items():
        torch.testing.assert_close(written[k], t, msg=k)
    assert {k for k in written if k not in tensors} == {"lora_unet_conv3.alpha",
                                                       "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha"}
    assert main(["inspect", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["lora"]["unet"]["algorithms"] == ["loha+dora", "lokr", "lora"]
    assert r["lora"]["te"]["algorithms"] == ["loha", "lokr", "lora"]
    assert main(["inspect", str(path)]) == 0
    assert "loha+dora, lokr, lora" in capsys.readouterr().out


@pytest.mark.parametrize("tensors, message", [
    ({"hada_w1_a": torch.zeros(4, 2), "hada_w1_b": torch.zeros(2, 3), "hada_w2_a": torch.zeros(4, 2)},
     "LoHa module lacks hada_w2_b"),
    ({"lora_down.weight": torch.zeros(2, 3), "lora_up.weight": torch.zeros(4, 2), "dora_scale": torch.ones(4, 1)},
     r"dora_scale has shape \(4, 1\): a magnitude per output row \(LyCORIS wd_on_out\)"),
    ({"lokr_w1": torch.zeros(2, 2), "lokr_w2_a": torch.zeros(2, 1), "lokr_w2_b": torch.zeros(1, 2, 3, 3)},
     r"lokr_w2_b has shape \(1, 2, 3, 3\); LoKr factors must be matrices"),
    ({"lora_down.weight": torch.zeros(2, 3), "hada_w1_a": torch.zeros(2, 3)},
     "tensors hada_w1_a, lora_down.weight mix the algorithms loha, lora"),
])
def test_broken_modules_are_refused_by_name(tensors: dict[str, torch.Tensor], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        describe_module(tensors)
    path = tmp_path / "b.safetensors"
    save_file({f"lora_unet_x.{k}": v for k, v in tensors.items()}, str(path))
    with pytest.raises(BundleError, match=r"b.safetensors \[lora_unet_x\]: " + message):
        read_bundle(path)


def test_a_tensor_no_algorithm_writes_is_reported() -> None:
    with pytest.raises(ValueError, match=r"tensor\(s\) lokr_t1 do not belong to a lokr module"):
        describe_module({"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(2, 2), "lokr_t1": torch.zeros(1)})


def test_a_file_module_that_does_not_fit_the_layer_names_it() -> None:
    host = Host()
    t = {"lora_unet_lin.hada_w1_a": torch.zeros(20, 2), "lora_unet_lin.hada_w1_b": torch.zeros(2, 13),
         "lora_unet_lin.hada_w2_a": torch.zeros(20, 2), "lora_unet_lin.hada_w2_b": torch.zeros(2, 13)}
    with pytest.raises(LoraTargetError, match=r"lora_unet_lin: the file's loha module makes a \(20, 13\) delta; "
                                              r"this model's layer has \(20, 12\)"):
        LoraNetwork.from_kohya_state_dict(host_targets(host), t)


def test_layouts_report_rank_alpha_and_scale_as_the_webuis_do() -> None:
    lay = describe_module({"lokr_w1": torch.zeros(2, 2), "lokr_w2": torch.zeros(3, 3), "alpha": torch.tensor(8.0)})
    assert (lay.algorithm, lay.scale, lay.out_features, lay.in_numel) == ("lokr", 1.0, 6, 6)  # no factor: scale 1
    lay = describe_module({"lokr_w1_a": torch.zeros(2, 1), "lokr_w1_b": torch.zeros(1, 2),
                           "lokr_w2_a": torch.zeros(3, 2), "lokr_w2_b": torch.zeros(2, 3), "alpha": torch.tensor(8.0)})
    assert (lay.rank, lay.scale) == (2, 4.0)  # w2_b's rank wins, as in A1111 and Forge
    lay = describe_module({"hada_w1_a": torch.zeros(5, 4), "hada_w1_b": torch.zeros(4, 7),
                           "hada_w2_a": torch.zeros(5, 4), "hada_w2_b": torch.zeros(4, 7)})
    assert (lay.rank, lay.alpha, lay.scale) == (4, None, 1.0)
