"""End to end on tiny real models: LoRA + embeddings → bundle → inspect / plain safetensors /
load back onto the model / export → diffusers' ``load_textual_inversion``.

The bundles are written from the models as the webui holds them (LDM UNet; for SDXL the open_clip
clip_g with packed attention), so these tests run in the A1111-pinned environment too; the
diffusers checks skip there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tiny_text
import tiny_unets
from pivotal.adapters.network import LoraNetwork
from pivotal.adapters.te_names import openclip_to_hf_state_dict, text_encoder_lora_targets, token_embedding_of
from pivotal.adapters.unet_targets import unet_lora_targets
from pivotal.cli.main import main
from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.formats.export import export_embeddings
from pivotal.inference.bundle_load import load_bundle_for_model
from pivotal.text.embeddings import EmbeddingSet
from pivotal.text.inject import encode_plain

EMBEDDINGS = {"mychar": (2, "woman"), "my-style": (1, "")}


def randomize(net: LoraNetwork, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def make_embeddings(encoders: dict[str, torch.nn.Module]) -> EmbeddingSet:
    tok = tiny_text.clip_tokenizer()
    embs = EmbeddingSet()
    g = torch.Generator().manual_seed(5)
    for name, (n, init) in EMBEDDINGS.items():
        vocab = {k: token_embedding_of(te).weight for k, te in encoders.items()}
        ids = {k: encode_plain(tok, init) for k in encoders} if init else None
        embs.add_new(name, n, vocab, init_ids=ids, generator=g)
    return embs


def bundle_embeddings(embs: EmbeddingSet) -> list[BundleEmbedding]:
    return [BundleEmbedding(n, v, EMBEDDINGS[n][1]) for n, v in embs.tensors().items()]


class SD1:
    """Tiny SD1 as the webui holds it: LDM UNet + HF CLIPTextModel."""

    def __init__(self) -> None:
        self.unet = tiny_unets.ldm_unet("sd1")
        self.te = tiny_text.hf_text_model("clip_l")

    def targets(self) -> list:
        return (unet_lora_targets(self.unet, "sd1", "attn-mlp-conv")
                + text_encoder_lora_targets(self.te, "te", "attn-mlp"))


class SDXL:
    """Tiny SDXL as the webui holds it: LDM UNet + HF clip_l + open_clip clip_g (packed attention)."""

    def __init__(self) -> None:
        self.unet = tiny_unets.ldm_unet("sdxl")
        self.te1 = tiny_text.hf_text_model("clip_l")
        self.te2 = tiny_text.openclip_text_tower("clip_g")

    def targets(self) -> list:
        return (unet_lora_targets(self.unet, "sdxl", "attn-mlp")
                + text_encoder_lora_targets(self.te1, "te1", "attn")
                + text_encoder_lora_targets(self.te2, "te2", "attn-mlp"))


def write(model, base: str, path: Path) -> tuple[LoraNetwork, EmbeddingSet]:
    net = LoraNetwork(model.targets(), rank=4, alpha=2)
    randomize(net)
    encoders = {"clip_l": model.te} if base == "sd1" else {"clip_l": model.te1, "clip_g": model.te2}
    embs = make_embeddings(encoders)
    write_bundle(path, base, net.kohya_state_dict(), bundle_embeddings(embs),
                 TrainingInfo(path.stem, resolution=(64, 64), num_train_images=3, settings={"rank": 4}))
    return net, embs


CANONICAL = {
    "sd1": re.compile(r"^(lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)"
                      r"|bundle_emb\.[A-Za-z0-9_-]+\.string_to_param\.\*)$"),
    "sdxl": re.compile(r"^(lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)"
                       r"|bundle_emb\.[A-Za-z0-9_-]+\.clip_[lg])$"),
}


@pytest.mark.parametrize("base", ["sd1", "sdxl"])
def test_bundle_from_tiny_model_inspects_and_has_only_canonical_keys(
        base: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = SD1() if base == "sd1" else SDXL()
    p = tmp_path / f"tiny_{base}.safetensors"
    net, embs = write(model, base, p)
    with safe_open(str(p), "pt") as f:
        keys = list(f.keys())
    assert keys and all(CANONICAL[base].match(k) for k in keys), [k for k in keys if not CANONICAL[base].match(k)]
    if base == "sdxl":
        # clip_g's packed attention is saved as separate q/k/v/out modules
        assert "lora_te2_text_model_encoder_layers_0_self_attn_k_proj.lora_down.weight" in keys
        assert not [k for k in keys if "in_proj" in k or "self_attn." in k]
        assert [k for k in keys if k.startswith("lora_unet_input_blocks_")]
    else:
        assert [k for k in keys if k.startswith("lora_unet_down_blocks_")]
    assert main(["inspect", str(p), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["base_model"] == base and r["warnings"] == []
    expected_parts: dict[str, int] = {}
    for k in net.kohya_state_dict():
        if k.endswith(".lora_down.weight"):
            part = k.split("_")[1]
            expected_parts[part] = expected_parts.get(part, 0) + 1
    assert r["lora_modules"] == expected_parts
    encs = ["clip_l"] if base == "sd1" else ["clip_g", "clip_l"]
    assert [(e["name"], e["vectors"], sorted(e["norms"])) for e in sorted(r["embeddings"], key=lambda e: e["name"])] \
        == [("my-style", 1, encs), ("mychar", 2, encs)]


@pytest.mark.parametrize("base", ["sd1", "sdxl"])
def test_bundle_loads_back_onto_a_fresh_model_with_same_outputs(base: str, tmp_path: Path) -> None:
    model = SD1() if base == "sd1" else SDXL()
    p = tmp_path / "b.safetensors"
    net, embs = write(model, base, p)
    inputs = tiny_unets.sample_inputs(base)
    with net.attached():
        want = tiny_unets.run_ldm(model.unet, base, inputs)
    plain = tiny_unets.run_ldm(model.unet, base, inputs)
    dims = {"clip_l": 32} if base == "sd1" else {"clip_l": 32, "clip_g": 64}
    loaded = load_bundle_for_model(p, base, model.targets(), dims)
    assert not loaded.warnings and not loaded.report.unmatched and not loaded.report.missing
    with loaded.network.attached():
        got = tiny_unets.run_ldm(model.unet, base, inputs)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)
    for name, per_key in embs.tensors().items():
        for k, t in per_key.items():
            assert torch.equal(loaded.embeddings[name].vectors[k], t)


def test_sdxl_te2_lora_from_open_clip_matches_on_hf_encoder(tmp_path: Path) -> None:
    """The q/k/v split written from open_clip's packed attention means the same on HF's CLIP."""
    transformers = pytest.importorskip("transformers")
    model = SDXL()
    p = tmp_path / "b.safetensors"
    net, _ = write(model, "sdxl", p)
    hf = transformers.CLIPTextModelWithProjection(tiny_text.hf_text_config("clip_g")).eval()
    converted = openclip_to_hf_state_dict(model.te2.state_dict(), prefix="text_model.")
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    tok = tiny_text.clip_tokenizer()
    ids = torch.tensor([tok("a photo of a cat", padding="max_length", max_length=77)["input_ids"]])
    with net.attached():
        want = tiny_text.encode_openclip(model.te2, ids)
    hf_targets = text_encoder_lora_targets(hf, "te2", "attn-mlp")
    loaded = load_bundle_for_model(p, "sdxl", hf_targets, {"clip_l": 32, "clip_g": 64})
    assert loaded.report.unmatched == [k for k in loaded.report.unmatched if not k.startswith("lora_te2_")]
    with loaded.network.attached():
        got = hf(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32)


def test_sd1_exported_embeddings_load_in_diffusers(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not part of the webui environment")
    model = SD1()
    p = tmp_path / "b.safetensors"
    _, embs = write(model, "sd1", p)
    out = tmp_path / "embeddings"
    out.mkdir()
    export_embeddings(p, out)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=tiny_text.hf_text_model("clip_l"), tokenizer=tiny_text.new_clip_tokenizer(),
        unet=tiny_unets.diffusers_unet("sd1"), scheduler=diffusers.DDIMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for name in EMBEDDINGS:
        pipe.load_textual_inversion(str(out / f"{name}.safetensors"), token=name)
    rows = pipe.text_encoder.get_input_embeddings().weight
    # diffusers adds one token per vector: name, name_1, ...
    for name, per_key in embs.tensors().items():
        vecs = per_key["clip_l"]
        tokens = [name] + [f"{name}_{i}" for i in range(1, vecs.shape[0])]
        ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
        torch.testing.assert_close(rows[ids].detach(), vecs)
    image = pipe("a photo of mychar in my-style", num_inference_steps=1, height=8, width=8,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 8, 8, 3)


def test_sdxl_exported_embeddings_load_in_diffusers(tmp_path: Path) -> None:
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not part of the webui environment")
    transformers = pytest.importorskip("transformers")
    model = SDXL()
    p = tmp_path / "b.safetensors"
    _, embs = write(model, "sdxl", p)
    out = tmp_path / "embeddings"
    out.mkdir()
    export_embeddings(p, out)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_tiny_vae(), text_encoder=tiny_text.hf_text_model("clip_l"),
        text_encoder_2=transformers.CLIPTextModelWithProjection(tiny_text.hf_text_config("clip_g")),
        tokenizer=tiny_text.new_clip_tokenizer(), tokenizer_2=tiny_text.new_clip_tokenizer(),
        unet=tiny_unets.diffusers_unet("sdxl"), scheduler=diffusers.EulerDiscreteScheduler())
    # diffusers' documented way for SDXL files: each key into its own encoder
    for name in EMBEDDINGS:
        sd = load_file(str(out / f"{name}.safetensors"))
        pipe.load_textual_inversion(sd["clip_l"], token=name, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(sd["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    for name, per_key in embs.tensors().items():
        for key, te, tk in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                            ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
            vecs = per_key[key]
            ids = tk.convert_tokens_to_ids([name] + [f"{name}_{i}" for i in range(1, vecs.shape[0])])
            torch.testing.assert_close(te.get_input_embeddings().weight[ids].detach(), vecs)
