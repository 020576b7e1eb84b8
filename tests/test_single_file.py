"""Single-file SD 1.x / SDXL checkpoints in the standalone host: built from the original model code
(tests/tiny_checkpoints.py) and from the demo export, loaded offline, computing what the original
modules and the diffusers-folder host compute; other families refused by name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers", reason="the standalone diffusers host is not used in the webui environment")
pytest.importorskip("ldm", reason="the LDM classes come from stable-diffusion-sdkit")

from pivotal.cli.main import main  # noqa: E402
from pivotal.errors import ConfigError, ModelLayoutError  # noqa: E402
from pivotal.host_api import Conditioning  # noqa: E402
from pivotal.hosts.diffusers.host import DiffusersHost, load_diffusers_folder  # noqa: E402
from pivotal.hosts.diffusers.single_file import load_single_file  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402
from tiny_checkpoints import CLIP_G_PROJECTION, LATENT, SCALE, SDXL_DEPTH, ldm_parts, write_checkpoint  # noqa: E402
from tiny_unets import sdxl_y  # noqa: E402

BASES = ["sd1", "sdxl"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pivotal-cache")


@pytest.fixture(scope="module")
def originals() -> dict[str, dict[str, nn.Module]]:
    return {base: ldm_parts(base, seed=1) for base in BASES}


def _inputs(base: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    width = 64 if base == "sd1" else 128
    out = {"x": torch.randn(2, 4, LATENT, LATENT, generator=gen), "t": torch.tensor([10, 700]),
           "context": torch.randn(2, 77, width, generator=gen),
           "pixels": torch.rand(2, 3, 8 * LATENT // 2, 8 * LATENT // 2, generator=gen) * 2 - 1,
           "ids": torch.randint(0, 49407, (2, 77), generator=gen)}
    out["ids"][:, 20] = 49407  # an end token, where the pooled output is read
    if base == "sdxl":
        out["text_embeds"] = torch.randn(2, CLIP_G_PROJECTION, generator=gen)
        out["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 8.0, 0.0, 48.0, 80.0]])
    return out


def _check_against_originals(host: DiffusersHost, base: str, parts: dict[str, nn.Module], tol: float = 1e-5) -> None:
    """The host's UNet, VAE and text encoders compute what the original LDM / HF / open_clip modules do."""
    i = _inputs(base)
    close: dict[str, Any] = dict(rtol=tol, atol=tol)
    with torch.no_grad():
        extra = {"text_embeds": i["text_embeds"], "time_ids": i["time_ids"]} if base == "sdxl" else {}
        got = host.predict(i["x"], i["t"], Conditioning(i["context"], extra))
        if base == "sdxl":
            want = parts["unet"](i["x"], i["t"], context=[i["context"]] * SDXL_DEPTH,
                                 y=sdxl_y(i["text_embeds"], i["time_ids"]))
        else:
            want = parts["unet"](i["x"], i["t"], context=i["context"])
        torch.testing.assert_close(got, want, **close)
        torch.testing.assert_close(host.encode_images(i["pixels"]), parts["vae"].encode_mean(i["pixels"]) * SCALE[base],
                                   **close)
        torch.testing.assert_close(host.vae.decode(i["x"]).sample, parts["vae"].decode(i["x"]), **close)
        te = host._encoders["clip_l"]
        torch.testing.assert_close(te(input_ids=i["ids"]).last_hidden_state,
                                   parts["clip_l"](input_ids=i["ids"]).last_hidden_state, **close)
        if base == "sdxl":
            out = host._encoders["clip_g"](input_ids=i["ids"])
            pooled, tokens = parts["clip_g"](i["ids"])
            torch.testing.assert_close(out.last_hidden_state, tokens, **close)
            torch.testing.assert_close(out.text_embeds, pooled, **close)


@pytest.mark.parametrize("base", BASES)
def test_fp32_checkpoint_computes_what_the_original_modules_compute(
        base: str, originals: dict[str, dict[str, nn.Module]], tmp_path: Path, cache_dir: Path) -> None:
    ckpt = write_checkpoint(tmp_path / f"tiny-{base}.safetensors", base, originals[base])
    host = load_single_file(ckpt, device="cpu", cache_dir=cache_dir)
    assert host.base_model == base and host.label == f"tiny-{base}.safetensors ({base}, single file)"
    assert host.dtype == torch.float32 and host.scaling_factor == pytest.approx(SCALE[base])
    assert host.force_zeros_for_empty_prompt == (base == "sdxl")
    assert host.tokenizer(host.encoder_keys()[-1]).pad_token_id == (0 if base == "sdxl" else 49407)
    _check_against_originals(host, base, originals[base])
    # The whole prompt path runs too (tokenizer, splicing, SDXL's penultimate states and pooled output).
    cond = host.encode_prompts(["a photo of a cat"], EmbeddingSet())
    assert cond.context.shape == (1, 77, 64 if base == "sd1" else 128)


@pytest.mark.slow
@pytest.mark.parametrize("base", BASES)
def test_fp16_checkpoint_loads_as_fp32_of_the_rounded_weights(
        base: str, originals: dict[str, dict[str, nn.Module]], tmp_path: Path, cache_dir: Path) -> None:
    ckpt = write_checkpoint(tmp_path / "half.safetensors", base, originals[base], dtype=torch.float16)
    host = load_single_file(ckpt, device="cpu", cache_dir=cache_dir)
    assert host.dtype == torch.float32
    rounded = ldm_parts(base, seed=1)
    for m in rounded.values():
        m.half().float()
    _check_against_originals(host, base, rounded)


@pytest.mark.slow
def test_no_baked_vae_takes_the_sibling_vae_file(originals: dict[str, dict[str, nn.Module]], tmp_path: Path,
                                                cache_dir: Path) -> None:
    from safetensors.torch import save_file

    parts = originals["sd1"]
    ckpt = write_checkpoint(tmp_path / "novae.safetensors", "sd1", parts, vae=False)
    with pytest.raises(ModelLayoutError, match=r"no VAE \(first_stage_model\.\* keys\).*novae\.vae\.safetensors"):
        load_single_file(ckpt, device="cpu", cache_dir=cache_dir)
    # LDM names, as a webui's VAE files have them
    sibling = str(tmp_path / "novae.vae.safetensors")
    save_file({k: v.contiguous() for k, v in parts["vae"].state_dict().items()}, sibling)
    host = load_single_file(ckpt, device="cpu", cache_dir=cache_dir)
    _check_against_originals(host, "sd1", parts)
    # diffusers names (a diffusers AutoencoderKL's own state dict)
    save_file({k: v.contiguous() for k, v in host.vae.state_dict().items()}, sibling)
    _check_against_originals(load_single_file(ckpt, device="cpu", cache_dir=cache_dir), "sd1", parts)


@pytest.mark.slow
def test_demo_export_equals_the_diffusers_folder_host(tmp_path: Path, cache_dir: Path) -> None:
    """``pivotal export-checkpoint --demo sd1`` (with its same-named yaml giving the tiny model's head
    counts) loads as a single file and computes bit-for-bit what the diffusers folder of the same
    weights computes."""
    from pivotal.demo.checkpoint import export_checkpoint
    from pivotal.demo.host import build_demo_host
    from test_diffusers_host import save_as_folder

    ckpt = export_checkpoint(tmp_path / "tiny-world.safetensors")[0]
    single = load_single_file(ckpt, device="cpu", cache_dir=cache_dir)
    save_as_folder(build_demo_host("sd1", device="cpu", cache_dir=cache_dir), tmp_path / "folder")
    folder = load_diffusers_folder(tmp_path / "folder", device="cpu")
    assert single.default_resolution() == folder.default_resolution() == 64
    embs = EmbeddingSet()
    a, b = single.encode_prompts(["a red circle"], embs), folder.encode_prompts(["a red circle"], embs)
    assert torch.equal(a.context, b.context)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500])
    assert torch.equal(single.predict(x, t, a), folder.predict(x, t, b))
    pixels = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    assert torch.equal(single.encode_images(pixels), folder.encode_images(pixels))
    image_a = single.generate("a red circle", "", embs, steps=2, seed=1, width=64, height=64, guidance=4.0)
    image_b = folder.generate("a red circle", "", embs, steps=2, seed=1, width=64, height=64, guidance=4.0)
    assert image_a.tobytes() == image_b.tobytes()
    # The yaml is what gives the tiny model its head counts (2 in the UNet, 4 in the text encoder;
    # the weights cannot tell): without it the family rules (8, and 64 channels per head) apply.
    ckpt.with_suffix(".yaml").unlink()
    ruled = load_single_file(ckpt, device="cpu", cache_dir=cache_dir)
    assert ruled.unet.config.attention_head_dim == 8 and single.unet.config.attention_head_dim == 2
    assert not torch.equal(ruled.encode_prompts(["a red circle"], embs).context, a.context)


def _fake(path: Path, keys: dict[str, tuple[int, ...]]) -> Path:
    """A safetensors file with these keys (zeros): what a detector sees of a real file."""
    from safetensors.torch import save_file

    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    return path


SD1_UNET = {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}
SD1_TEXT = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (10, 8)}


@pytest.mark.parametrize("keys, match", [
    ({**SD1_UNET, "cond_stage_model.model.token_embedding.weight": (10, 8)}, "Stable Diffusion 2.x"),
    ({**SD1_UNET, "conditioner.embedders.0.model.text_projection": (8, 8)}, "SDXL refiner"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (8,)}, "Stable Diffusion 3"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (8,)}, "Flux"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 9, 3, 3), **SD1_TEXT}, "inpainting"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 8)}, "LoRA / bundle"),
    ({"conv_in.weight": (8, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (8, 8, 3, 3)}, "lone diffusers UNet"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}, "has no text encoder"),
    ({"weird.weight": (3,)}, "not a Stable Diffusion checkpoint"),
])
def test_other_families_are_refused_by_name(tmp_path: Path, keys: dict[str, tuple[int, ...]], match: str) -> None:
    path = _fake(tmp_path / "model.safetensors", keys)
    with pytest.raises(ModelLayoutError, match=match) as err:
        load_single_file(path, device="cpu")
    assert str(path) in str(err.value)


def test_stray_weights_and_bad_files_are_refused(originals: dict[str, dict[str, nn.Module]], tmp_path: Path,
                                                 cache_dir: Path) -> None:
    from safetensors.torch import save_file

    from tiny_checkpoints import checkpoint_state

    state = checkpoint_state("sd1", originals["sd1"])
    save_file({**state, "embedding_manager.embedder.weight": torch.zeros(2)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(ModelLayoutError, match="1 weights belong to no SD part.*embedding_manager"):
        load_single_file(tmp_path / "stray.safetensors", device="cpu", cache_dir=cache_dir)
    del state["model.diffusion_model.output_blocks.2.1.conv.weight"]  # an upsampler
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelLayoutError, match="output_blocks.2.1.conv.weight is missing"):
        load_single_file(tmp_path / "missing.safetensors", device="cpu", cache_dir=cache_dir)
    (tmp_path / "old.ckpt").write_bytes(b"PK\x03\x04")
    with pytest.raises(ConfigError, match="only .safetensors checkpoints load"):
        load_single_file(tmp_path / "old.ckpt", device="cpu")
    with pytest.raises(ConfigError, match="no such file"):
        load_single_file(tmp_path / "absent.safetensors", device="cpu")


@pytest.mark.slow
def test_cli_generate_and_train_take_a_single_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pivotal.demo.checkpoint import export_checkpoint
    from pivotal.demo.data import make_demo_dataset

    ckpt = export_checkpoint(tmp_path / "tw.safetensors")[0]
    out = tmp_path / "a.png"
    assert main(["generate", "--model", str(ckpt), "--prompt", "a red circle", "--steps", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert out.is_file()
    data = tmp_path / "data"
    data.mkdir()
    make_demo_dataset(data, ["mychar"], count=4, size=64, seed=0)
    code = main(["train", "--model", str(ckpt), "--data", str(data), "--embedding", "mychar:1", "--steps", "2",
                 "--resolution", "64", "--batch-size", "1", "--device", "cpu", "--out", str(tmp_path / "out"),
                 "--json"])
    assert code == 0
    assert (tmp_path / "out" / "pivotal.safetensors").is_file()
