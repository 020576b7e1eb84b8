"""Other trainers' files, built here from each tool's documented key rules (never with Pivotal's
writer), on the tiny SD1/SDXL models: read right, or refused naming the format.

* peft / diffusers LoRA (``unet.<diffusers path>.lora_A.weight`` / ``lora_B.weight``, alpha from
  ``lora_adapter_metadata``): applied on the webui's LDM UNet equals peft applying it on the
  diffusers UNet (peft is the oracle; skipped where peft is not installed);
* kohya SD1 LoRA with LDM names (``lora_unet_input_blocks_…``, no metadata, with TE keys): SD1, every
  module applied as A1111 applies it (W + alpha/rank · up @ down on the module of that name);
* kohya SDXL TE LoRA over all clip_l layers: no "match no module" noise for the layer SDXL never reads;
* OneTrainer SDXL bundle with the ``<embedding>`` placeholder and ``_out`` keys;
* diffusers' pivotal ``{name}_emb.safetensors`` (``clip_l``/``clip_g``);
* LyCORIS LoHa / LoKr / DoRA / LoCon with Tucker and peft DoRA: refused by name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tiny_text
import tiny_unets
from pivotal.adapters.te_names import text_encoder_lora_targets
from pivotal.adapters.unet_names import UNetLayout, convert_diffusers_unet_to_ldm
from pivotal.adapters.unet_targets import unet_lora_targets
from pivotal.cli.main import main
from pivotal.errors import BundleError
from pivotal.formats.bundle import read_bundle
from pivotal.inference.bundle_load import load_bundle_for_model

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
NEEDS_DIFFUSERS = "diffusers/peft not installed (webui environment): the oracle applies the file with peft"


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def _attn_linears(unet: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in unet.named_modules()
            if isinstance(m, nn.Linear) and ".attn" in n and n.endswith(ATTN)}


# -- peft / diffusers ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("base,config", [("sd1", None), ("sdxl", {"r": 4, "lora_alpha": 8})])
def test_peft_diffusers_lora_applies_as_peft_does(base: str, config: dict | None, tmp_path: Path) -> None:
    pytest.importorskip("diffusers", reason=NEEDS_DIFFUSERS)
    peft = pytest.importorskip("peft", reason=NEEDS_DIFFUSERS)
    diff = tiny_unets.diffusers_unet(base).requires_grad_(False)
    ldm = tiny_unets.ldm_unet(base, seed=99).requires_grad_(False)
    ldm.load_state_dict(convert_diffusers_unet_to_ldm(diff.state_dict(), UNetLayout.from_diffusers(diff)))
    # diffusers' save_lora_weights: "unet." + the peft state dict of the UNet (lora_A = down, lora_B = up)
    sd = {}
    for i, (name, lin) in enumerate(sorted(_attn_linears(diff).items())):
        sd[f"unet.{name}.lora_A.weight"] = _rand(4, lin.in_features, seed=2 * i)
        sd[f"unet.{name}.lora_B.weight"] = _rand(lin.out_features, 4, seed=2 * i + 1)
    meta = {"format": "pt"}
    if config:
        meta["lora_adapter_metadata"] = json.dumps({f"unet.{k}": v for k, v in config.items()})
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path), meta)

    bundle = read_bundle(path)
    assert bundle.base_model == base and bundle.formats == {"unet": ["peft/diffusers"]}
    inputs = tiny_unets.sample_inputs(base)
    loaded = load_bundle_for_model(path, base, unet_lora_targets(ldm, base, "attn-mlp-conv"), {})
    assert loaded.report.matched == len(sd) + len(sd) // 2 and loaded.report.unmatched == [] and not loaded.warnings
    with torch.no_grad(), loaded.network.attached():
        got = tiny_unets.run_ldm(ldm, base, inputs)
    # the oracle: peft itself, on the diffusers UNet (alpha = r when the file has no config, as diffusers loads it)
    lora_config = peft.LoraConfig(r=4, lora_alpha=(config or {"lora_alpha": 4})["lora_alpha"],
                                  target_modules=list(ATTN))
    peft.inject_adapter_in_model(lora_config, diff)
    result = peft.set_peft_model_state_dict(diff, {k[len("unet."):]: v for k, v in sd.items()})
    assert not [k for k in result.unexpected_keys if "lora" in k]
    with torch.no_grad():
        want = tiny_unets.run_diffusers(diff, base, inputs)
    plain = tiny_unets.run_ldm(ldm, base, inputs)
    assert (want - plain).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_peft_dora_is_refused_by_name(tmp_path: Path) -> None:
    sd = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": _rand(2, 8, seed=1),
          "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": _rand(8, 2, seed=2),
          "unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector": _rand(8, seed=3)}
    save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(BundleError,
                       match=r"DoRA \(peft\) \(lora_magnitude_vector …\) in 1 module\(s\).*not supported yet"):
        read_bundle(tmp_path / "a.safetensors")
    del sd["unet.down_blocks.0.attentions.0.proj_in.lora_magnitude_vector"]
    save_file(sd, str(tmp_path / "b.safetensors"), {"lora_adapter_metadata": json.dumps({"unet.use_dora": True})})
    with pytest.raises(BundleError, match=r"DoRA \(use_dora in lora_adapter_metadata, unet\) is not supported yet"):
        read_bundle(tmp_path / "b.safetensors")


# -- kohya SD1 with LDM names ---------------------------------------------------------------------
def _kohya_module(key: str, host: nn.Module, seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    if isinstance(host, nn.Conv2d):
        down = _rand(rank, host.in_channels, *host.kernel_size, seed=seed)
        up = _rand(host.out_channels, rank, 1, 1, seed=seed + 1)
    else:
        down, up = _rand(rank, host.in_features, seed=seed), _rand(host.out_features, rank, seed=seed + 1)
    return {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(1.0)}


def _merged_output(host: nn.Module, file: dict[str, torch.Tensor], key: str, x: torch.Tensor) -> torch.Tensor:
    """A1111's math for one module: W + alpha / rank * up @ down (conv: over the kernel)."""
    down, up, alpha = file[f"{key}.lora_down.weight"], file[f"{key}.lora_up.weight"], file[f"{key}.alpha"]
    scale = float(alpha) / down.shape[0]
    if isinstance(host, nn.Conv2d):
        delta = torch.einsum("or,rihw->oihw", up.flatten(1), down)
        return nn.functional.conv2d(x, host.weight + scale * delta, host.bias, host.stride, host.padding)
    return nn.functional.linear(x, host.weight + scale * up @ down, host.bias)


def test_sd1_lora_with_ldm_names_and_te_keys_is_sd1_and_fully_applied(tmp_path: Path) -> None:
    ldm = tiny_unets.ldm_unet("sd1").requires_grad_(False)
    te = tiny_text.hf_text_model("clip_l").requires_grad_(False)
    # kohya/A1111 rule: "lora_unet_" + the LDM module path with "_" (what A1111 maps back by name)
    hosts: dict[str, nn.Module] = {}
    for name, m in ldm.named_modules():
        if (isinstance(m, nn.Linear) and ".attn" in name and name.endswith(ATTN)) or name.endswith("in_layers.2"):
            hosts["lora_unet_" + name.replace(".", "_")] = m
    layers = tiny_text.TINY_LAYERS
    te_layers = te.text_model.encoder.layers if hasattr(te, "text_model") else te.encoder.layers
    for i in range(layers):
        hosts[f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"] = te_layers[i].self_attn.q_proj
    file: dict[str, torch.Tensor] = {}
    for i, (key, host) in enumerate(sorted(hosts.items())):
        file.update(_kohya_module(key, host, seed=10 * i))
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in file)
    path = tmp_path / "ldm_sd1.safetensors"
    save_file(file, str(path))  # no metadata, as many trainers write it

    bundle = read_bundle(path)
    assert bundle.base_model == "sd1" and bundle.formats["unet"] == ["kohya, LDM UNet names"]
    targets = unet_lora_targets(ldm, "sd1", "attn-mlp-conv") + text_encoder_lora_targets(te, "te", "attn-mlp")
    loaded = load_bundle_for_model(path, "sd1", targets, {"clip_l": 32})
    assert loaded.report.unmatched == [] and loaded.report.matched == len(file) and not loaded.warnings
    by_host = {id(m.host): m for m in loaded.network.modules_of()}
    with loaded.network.attached():
        for i, (key, host) in enumerate(sorted(hosts.items())):
            assert id(host) in by_host, key  # the module of that LDM name, nothing else
            conv = isinstance(host, nn.Conv2d)
            x = _rand(2, host.in_channels, 4, 4, seed=i) if conv else _rand(3, host.in_features, seed=i)
            torch.testing.assert_close(host(x), _merged_output(host, file, key, x), atol=1e-5, rtol=1e-4)


def test_unet_only_ldm_names_tell_sd1_from_sdxl(tmp_path: Path) -> None:
    for key, base in (("lora_unet_input_blocks_1_1_proj_in", "sd1"), ("lora_unet_output_blocks_9_1_proj_in", "sd1"),
                      ("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q", "sdxl"),
                      ("lora_unet_output_blocks_0_1_proj_in", "sdxl"), ("lora_unet_input_blocks_4_1_proj_in", "sdxl")):
        save_file({f"{key}.lora_down.weight": _rand(2, 8, seed=1), f"{key}.lora_up.weight": _rand(8, 2, seed=2)},
                  str(tmp_path / "u.safetensors"))
        assert read_bundle(tmp_path / "u.safetensors").base_model == base, key


# -- kohya SDXL text encoders -----------------------------------------------------------------------
def test_sdxl_te_lora_on_clip_l_last_layer_is_no_noise(tmp_path: Path) -> None:
    ldm = tiny_unets.ldm_unet("sdxl")
    te1 = tiny_text.hf_text_model("clip_l")
    te2 = tiny_text.openclip_text_tower("clip_g")
    layers = tiny_text.TINY_LAYERS
    file: dict[str, torch.Tensor] = {}
    dims = {"te1": tiny_text.TINY_DIMS["clip_l"][0], "te2": tiny_text.TINY_DIMS["clip_g"][0]}
    for part in ("te1", "te2"):
        for i in range(layers):  # kohya trains every layer of both encoders
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                key = f"lora_{part}_text_model_encoder_layers_{i}_self_attn_{proj}"
                file.update({f"{key}.lora_down.weight": _rand(2, dims[part], seed=i),
                             f"{key}.lora_up.weight": _rand(dims[part], 2, seed=i + 1),
                             f"{key}.alpha": torch.tensor(2.0)})
    path = tmp_path / "xl_te.safetensors"
    save_file(file, str(path), {"ss_base_model_version": "sdxl_base_v1-0"})
    # the webui host reads clip_l at its penultimate layer: no target on the last one
    targets = (unet_lora_targets(ldm, "sdxl", "attn") + text_encoder_lora_targets(te1, "te1", "attn", layers - 1)
               + text_encoder_lora_targets(te2, "te2", "attn"))
    loaded = load_bundle_for_model(path, "sdxl", targets, {"clip_l": 32, "clip_g": 64})
    assert loaded.warnings == []
    assert sorted({k.split(".")[0] for k in loaded.report.unmatched}) == [
        f"lora_te1_text_model_encoder_layers_{layers - 1}_self_attn_{p}"
        for p in ("k_proj", "out_proj", "q_proj", "v_proj")]
    stray = dict(file, **{"lora_te1_text_model_encoder_layers_0_self_attn_zz.lora_down.weight": _rand(2, 32, seed=9),
                          "lora_te1_text_model_encoder_layers_0_self_attn_zz.lora_up.weight": _rand(32, 2, seed=9)})
    save_file(stray, str(path), {"ss_base_model_version": "sdxl_base_v1-0"})
    loaded = load_bundle_for_model(path, "sdxl", targets, {"clip_l": 32, "clip_g": 64})
    assert len(loaded.warnings) == 1 and "2 LoRA tensor(s) match no module" in loaded.warnings[0]


# -- OneTrainer and diffusers embeddings -----------------------------------------------------------
def _sdxl_lora() -> dict[str, torch.Tensor]:
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    return {f"{key}.lora_down.weight": _rand(2, 64, seed=1), f"{key}.lora_up.weight": _rand(64, 2, seed=2),
            f"{key}.alpha": torch.tensor(2.0)}


def test_onetrainer_placeholder_and_output_keys(tmp_path: Path, capsys: Any) -> None:
    # OneTrainer: bundle_additional_embeddings writes bundle_emb.<placeholder>.clip_l/.clip_g, output
    # embeddings add *_out keys; the default placeholder is the literal "<embedding>"
    file = _sdxl_lora()
    for name in ("<embedding>", "mychar"):
        for enc, dim in (("clip_l", 32), ("clip_g", 64)):
            file[f"bundle_emb.{name}.{enc}"] = _rand(1, dim, seed=3)
            file[f"bundle_emb.{name}.{enc}_out"] = _rand(1, dim, seed=4)
    path = tmp_path / "ot.safetensors"
    save_file(file, str(path), {"ss_base_model_version": "sdxl_base_v1-0"})
    bundle = read_bundle(path)
    assert bundle.base_model == "sdxl" and list(bundle.embeddings) == ["mychar"] and len(bundle.lora) == 3
    assert any(w.startswith("embedding '<embedding>' skipped") and "OneTrainer's default placeholder" in w
               for w in bundle.warnings)
    assert any("embedding 'mychar': extra key" in w and "'clip_l_out'" in w and "'clip_g_out'" in w
               and "ignored (OneTrainer's output-embedding vectors, which no webui reads)" in w
               for w in bundle.warnings)
    assert not any("SD1" in w for w in bundle.warnings)
    assert main(["inspect", str(path)]) == 0
    assert "<embedding>" in capsys.readouterr().out


def test_diffusers_pivotal_embedding_file(tmp_path: Path) -> None:
    # diffusers' advanced pivotal scripts: {output name}_emb.safetensors = {"clip_l": (N, d_l), "clip_g": (N, d_g)};
    # the webui's embeddings folder names it by its file name
    path = tmp_path / "mychar_emb.safetensors"
    save_file({"clip_l": _rand(2, 32, seed=1), "clip_g": _rand(2, 64, seed=2)}, str(path))
    bundle = read_bundle(path)
    assert bundle.base_model == "sdxl" and list(bundle.embeddings) == ["mychar_emb"] and not bundle.lora
    loaded = load_bundle_for_model(path, "sdxl", [], {"clip_l": 32, "clip_g": 64})
    assert list(loaded.embeddings) == ["mychar_emb"] and loaded.network is None
    save_file({"clip_l": _rand(3, 32, seed=1)}, str(tmp_path / "sd1_emb.safetensors"))
    one = read_bundle(tmp_path / "sd1_emb.safetensors")
    assert one.base_model == "sd1" and one.embeddings["sd1_emb"].num_vectors == 3


# -- LyCORIS: the algorithms Pivotal applies are read (applied exactly: test_lora_algorithms.py);
# the others are refused by name ------------------------------------------------------------------
KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
LYCORIS = {
    # LyCORIS weight_list per algorithm (modules/loha.py, lokr.py, locon.py with use_tucker, dora_wd)
    "loha": {"hada_w1_a": (32, 4), "hada_w1_b": (4, 32), "hada_w2_a": (32, 4), "hada_w2_b": (4, 32), "alpha": ()},
    "lokr": {"lokr_w1": (4, 4), "lokr_w2": (8, 8), "alpha": ()},
    "lora+dora": {"lora_down.weight": (4, 32), "lora_up.weight": (32, 4), "alpha": (), "dora_scale": (1, 32)},
    "lora": {"lora_down.weight": (4, 32, 1, 1), "lora_mid.weight": (4, 4, 3, 3), "lora_up.weight": (32, 4, 1, 1),
             "alpha": ()},
}
UNSUPPORTED = {
    # (IA)^3: modules/ia3.py (weight, on_input); GLoRA: modules/glora.py; OFT: modules/oft.py
    "(IA)^3 (on_input …)": {"weight": (32,), "on_input": ()},
    "GLoRA (a1.weight …)": {"a1.weight": (4, 32), "a2.weight": (32, 4), "b1.weight": (4, 32), "b2.weight": (32, 4),
                            "alpha": ()},
    "OFT/BOFT (oft_blocks …)": {"oft_blocks": (4, 8, 8), "alpha": ()},
}


def _lycoris_file(tmp_path: Path, weights: dict[str, tuple[int, ...]]) -> Path:
    file = {f"{KEY}.{w}": _rand(*shape, seed=i) if shape else torch.tensor(4.0)
            for i, (w, shape) in enumerate(weights.items())}
    file.update({k.replace("to_q", "to_k"): v.clone() for k, v in file.items()})
    path = tmp_path / "lyco.safetensors"
    save_file(file, str(path), {"ss_network_module": "lycoris.kohya"})
    return path


@pytest.mark.parametrize("label", sorted(LYCORIS))
def test_lycoris_algorithms_pivotal_applies_are_read(label: str, tmp_path: Path, capsys: Any) -> None:
    path = _lycoris_file(tmp_path, LYCORIS[label])
    bundle = read_bundle(path)
    assert len(bundle.lora_modules()) == 2 and not bundle.unknown_keys
    assert main(["inspect", "--json", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["lora"]["unet"]["algorithms"] == [label]


@pytest.mark.parametrize("label", sorted(UNSUPPORTED))
def test_other_lycoris_algorithms_are_refused_by_name(label: str, tmp_path: Path, capsys: Any) -> None:
    path = _lycoris_file(tmp_path, UNSUPPORTED[label])
    pattern = re.escape(f"{label} in 2 module(s), e.g. {KEY.replace('to_q', 'to_k')}: not supported yet")
    with pytest.raises(BundleError, match=pattern):
        read_bundle(path)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lacks lora_down" not in err and "shape" not in err
