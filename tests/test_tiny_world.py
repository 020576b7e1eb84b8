"""The pre-trained tiny-world SD1 demo model: its shipped weight file, loading it with either
transformers layout, reproducible pre-training, and proof that it follows its prompts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pivotal.demo import tiny_world
from pivotal.errors import BundleError

# Thresholds of the prompt-following checks, below what the shipped model measures (README: loss
# gap and sampling accuracy) and far above what a model ignoring its prompt gets. At the sampling
# test's settings (32 prompts, 12 steps) the shipped v2 file reads background 100 %, colour 91 %,
# place 84 %, shape 50 %; v1 (which followed colour only) read place 28 %, shape 34 %: place and
# shape hold the v2 recipe (issue 17). Shape stays low because the VAE decodes only ~56 % of clean
# renders' shapes right (bench/RESULTS.md, "Tiny world v2").
MIN_RELATIVE_LOSS_GAP = 0.5
MIN_ACCURACY = {"background": 0.8, "colour": 0.6, "place": 0.7, "shape": 0.45}


def test_shipped_file_is_small_and_sparse() -> None:
    size = tiny_world.WEIGHTS_FILE.stat().st_size
    assert 2e6 < size < 12e6, size
    tensors, meta = tiny_world.read_weight_file()
    assert meta["format"] == tiny_world.FORMAT_VERSION and meta["scaling_factor"] > 0
    ids = tensors[tiny_world.TOKEN_IDS_KEY]
    assert tensors[tiny_world.TOKEN_ROWS_KEY].shape == (ids.numel(), tiny_world.TEXT_WIDTH)
    assert 20 < ids.numel() < 100 and ids.unique().numel() == ids.numel()  # the captions' words only
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if k != tiny_world.TOKEN_IDS_KEY)


def test_shipped_file_records_the_default_settings() -> None:
    """``tools/train_base_model.py`` with no options reproduces the shipped weights only while the
    defaults are the settings they were trained with."""
    from pivotal.demo.pretrain.run import PretrainSettings

    _, meta = tiny_world.read_weight_file()
    assert meta["settings"] == PretrainSettings().to_dict()


def test_text_encoder_loads_in_this_transformers(tmp_path: Path) -> None:
    """Canonical ``text_model.*`` names load into this environment's CLIPTextModel (transformers
    4.30 nests them under text_model, 5 does not); the sparse rows are put back exactly."""
    from transformers import CLIPTextModel

    from pivotal.adapters.te_names import hf_text_model_prefix

    tensors, meta = tiny_world.read_weight_file()
    state = tiny_world.full_text_state(tensors, meta["token_seed"])
    te = CLIPTextModel(tiny_world.text_config())
    prefix = hf_text_model_prefix(te)
    result = te.load_state_dict({prefix + k[len("text_model."):]: v for k, v in state.items()}, strict=False)
    assert result.unexpected_keys == [] and all(k.endswith("position_ids") for k in result.missing_keys)
    rows = te.get_input_embeddings().weight.detach()
    ids = tensors[tiny_world.TOKEN_IDS_KEY]
    torch.testing.assert_close(rows[ids], tensors[tiny_world.TOKEN_ROWS_KEY].float(), rtol=0, atol=0)
    others = torch.ones(rows.shape[0], dtype=torch.bool)
    others[ids] = False
    torch.testing.assert_close(rows[others], tiny_world.initial_token_rows(meta["token_seed"])[others], rtol=0, atol=0)


def test_refuses_files_that_are_not_ours(tmp_path: Path) -> None:
    from pivotal.formats.safetensors_io import atomic_save

    with pytest.raises(BundleError, match="train_base_model"):
        tiny_world.read_weight_file(tmp_path / "missing.safetensors")
    atomic_save(tmp_path / "other.safetensors", {"x": torch.zeros(1)}, {"a": "b"})
    with pytest.raises(BundleError, match="not a tiny-world weight file"):
        tiny_world.read_weight_file(tmp_path / "other.safetensors")


# -- everything below builds diffusers modules ---------------------------------------------------
diffusers_only = pytest.mark.skipif(__import__("importlib").util.find_spec("diffusers") is None,
                                    reason="the demo model's UNet and VAE are diffusers modules")


@pytest.fixture(scope="module")
def host():
    from pivotal.demo.host import build_demo_host

    return build_demo_host("sd1", device="cpu")


@diffusers_only
def test_demo_sd1_is_the_pretrained_model() -> None:
    from pivotal.demo.model import build_demo_parts
    from pivotal.errors import ConfigError

    parts = build_demo_parts("sd1")
    assert "tiny-world" in parts.source
    assert parts.text_encoders["clip_l"].config.hidden_size == tiny_world.TEXT_WIDTH
    assert parts.vae.config.scaling_factor == tiny_world.read_weight_file()[1]["scaling_factor"]
    random_parts = build_demo_parts("sd1", pretrained=False)
    assert "tiny-world" not in random_parts.source
    with pytest.raises(ConfigError, match="only the sd1 demo model"):
        build_demo_parts("sdxl", pretrained=True)


@pytest.mark.slow
@diffusers_only
def test_follows_prompts_loss_gap(host) -> None:
    from pivotal.demo.pretrain.check import loss_gap

    gap = loss_gap(host, count=64)
    assert gap["right"] < gap["shuffled"] and gap["right"] < gap["empty"]
    assert gap["relative_gap"] > MIN_RELATIVE_LOSS_GAP, gap


@pytest.mark.slow
@diffusers_only
def test_follows_prompts_when_sampling(host) -> None:
    from pivotal.demo.pretrain.check import sampling_accuracy

    result = sampling_accuracy(host, count=32, steps=12)
    for attribute, floor in MIN_ACCURACY.items():
        assert result["accuracy"][attribute] >= floor, result["accuracy"]
        assert result["accuracy"][attribute] > result["chance"][attribute], result


@pytest.mark.slow
@diffusers_only
def test_pretraining_is_reproducible(tmp_path: Path) -> None:
    """The same settings give the same file, byte for byte (a few steps only, on one thread)."""
    from pivotal.demo.pretrain.run import QUICK, pretrain

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = pretrain(QUICK, tmp_path / "a.safetensors", log=lambda m: None)
        pretrain(QUICK, tmp_path / "b.safetensors", log=lambda m: None)
        other = dataclasses.replace(QUICK, diffusion=dataclasses.replace(QUICK.diffusion, seed=99))
        pretrain(other, tmp_path / "c.safetensors", log=lambda m: None)
    finally:
        torch.set_num_threads(threads)
    data = [(tmp_path / f"{n}.safetensors").read_bytes() for n in "abc"]
    assert data[0] == data[1] != data[2]
    assert a["trained_tokens"] == tiny_world.read_weight_file(tmp_path / "a.safetensors")[0][
        tiny_world.TOKEN_IDS_KEY].numel()
    unet, vae, te, meta = tiny_world.load_modules(tmp_path / "a.safetensors")
    assert meta["settings"] == QUICK.to_dict() and not any(p.requires_grad for p in unet.parameters())


def test_train_base_model_overrides_any_settings_field() -> None:
    """``tools/train_base_model.py --set a.b=JSON`` changes that one field, nested or not, and
    refuses a field that does not exist or a value that is not JSON; a changed field added after
    the first shipped file is recorded, an unchanged one is not (so old recipes record as before)."""
    import importlib.util

    from pivotal.demo.pretrain.run import ADDED_FIELDS, PretrainSettings

    spec = importlib.util.spec_from_file_location(
        "train_base_model", Path(__file__).resolve().parent.parent / "tools" / "train_base_model.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    base = PretrainSettings()
    s = tool.with_field(tool.with_field(base, "diffusion.timestep_power=2"), "images=64")
    s = tool.with_field(s, "diffusion.coarse_noise=[0.1, 0.2]")
    assert (s.diffusion.timestep_power, s.images, s.diffusion.coarse_noise) == (2, 64, (0.1, 0.2))
    assert s.vae == base.vae and s.diffusion.steps == base.diffusion.steps
    for bad in ("diffusion.nope=1", "nope=1", "diffusion.steps", "diffusion.steps=many"):
        with pytest.raises(SystemExit):
            tool.with_field(base, bad)
    recorded = s.to_dict()["diffusion"]
    assert recorded["timestep_power"] == 2
    assert "cross_attention_lr_scale" not in recorded and "cross_attention_lr_scale" in ADDED_FIELDS["diffusion"]
