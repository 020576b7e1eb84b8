"""The single-file LDM export of the tiny-world model: the webui's own LDM classes (the ``ldm``
package, stable-diffusion-sdkit) built from the exported yaml load the exported weights with
strict=True and compute what the diffusers modules compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from pivotal.adapters.te_names import hf_text_model_prefix
from pivotal.cli.main import main
from pivotal.demo import tiny_world
from pivotal.demo.checkpoint import TEXT_KEY, UNET_KEY, VAE_KEY, export_checkpoint
from pivotal.errors import ConfigError, ModelLayoutError, SaveError
from pivotal.formats.safetensors_io import load_tensors, read_header
from pivotal.formats.vae_names import vae_name_to_ldm, vae_state_to_ldm
from tiny_checkpoints import LdmAutoencoder

pytest.importorskip("omegaconf", reason="reading the exported yaml needs omegaconf")
pytest.importorskip("ldm", reason="the LDM classes come from stable-diffusion-sdkit")


def _part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from omegaconf import OmegaConf

    out = tmp_path_factory.mktemp("ckpt") / "tiny-world.safetensors"
    ckpt, yaml_path, clip = export_checkpoint(out)
    state = load_tensors(read_header(ckpt))
    return {"ckpt": ckpt, "yaml": yaml_path, "clip": clip, "state": state,
            "config": OmegaConf.load(yaml_path).model.params}


@pytest.fixture(scope="module")
def ldm_models(exported: dict[str, Any]) -> dict[str, nn.Module]:
    """The LDM UNet, VAE and HF text model built from the exported yaml + clip folder, loaded."""
    from ldm.util import instantiate_from_config
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg, state = exported["config"], exported["state"]
    unet = instantiate_from_config(cfg.unet_config).eval()
    unet.load_state_dict(_part(state, UNET_KEY), strict=True)
    vae_params = cfg.first_stage_config.params
    vae = LdmAutoencoder(dict(vae_params.ddconfig), int(vae_params.embed_dim)).eval()
    vae.load_state_dict(_part(state, VAE_KEY), strict=True)
    te = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg.cond_stage_config.params.version)).eval()
    # The checkpoint holds transformers 4.x names (the webui's); transformers 5 drops "text_model.".
    prefix = hf_text_model_prefix(te)
    text = {prefix + k[len("text_model."):]: v for k, v in _part(state, TEXT_KEY).items()}
    result = te.load_state_dict(text, strict=False)
    # transformers 4.30 keeps position_ids as a saved buffer (as SD1.5 checkpoints hold it); 5 does not.
    assert result.missing_keys == [] and all(k.endswith("position_ids") for k in result.unexpected_keys)
    return {"unet": unet, "vae": vae, "te": te}


def test_files_and_config(exported: dict[str, Any]) -> None:
    cfg, clip = exported["config"], exported["clip"]
    assert exported["yaml"].name == "tiny-world.yaml" and clip.name == "tiny-world-clip"
    assert {p.name for p in clip.iterdir()} == {"config.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                                                "special_tokens_map.json"}
    assert cfg.cond_stage_config.target == "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
    assert Path(cfg.cond_stage_config.params.version) == clip.resolve()
    _, meta = tiny_world.read_weight_file()
    assert cfg.scale_factor == pytest.approx(meta["scaling_factor"])
    assert (cfg.linear_start, cfg.linear_end, cfg.timesteps) == (0.00085, 0.012, 1000)
    state = exported["state"]
    assert all(k.startswith((UNET_KEY, VAE_KEY, TEXT_KEY)) for k in state)
    assert state[TEXT_KEY + "text_model.embeddings.token_embedding.weight"].shape == (49408, tiny_world.TEXT_WIDTH)
    assert all(v.dtype == torch.float32 for k, v in state.items() if not k.endswith("position_ids"))


def test_the_clip_folder_gives_the_demo_tokenizer(exported: dict[str, Any]) -> None:
    from transformers import CLIPTokenizer

    from pivotal.demo.basics import demo_tokenizer

    ours = CLIPTokenizer.from_pretrained(str(exported["clip"]))
    demo = demo_tokenizer("clip_l")
    for text in ("a red circle on a blue background, top left", "mychar, a striped star"):
        kwargs = dict(padding="max_length", max_length=77, truncation=True)
        assert ours(text, **kwargs)["input_ids"] == demo(text, **kwargs)["input_ids"]
    assert ours.model_max_length == 77


def test_ldm_modules_compute_what_the_demo_model_computes(ldm_models: dict[str, nn.Module]) -> None:
    pytest.importorskip("diffusers", reason="the comparison needs the diffusers modules")
    unet, vae, te, _ = tiny_world.load_modules()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, tiny_world.TEXT_WIDTH, generator=gen)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=context).sample
        got = ldm_models["unet"](x, t, context=context)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        pixels = torch.rand(2, 3, 64, 64, generator=gen) * 2 - 1
        torch.testing.assert_close(ldm_models["vae"].encode_mean(pixels), vae.encode(pixels).latent_dist.mean,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ldm_models["vae"].decode(x), vae.decode(x).sample, rtol=1e-4, atol=1e-4)
        ids = torch.randint(0, 49408, (2, 77), generator=gen)
        torch.testing.assert_close(ldm_models["te"](input_ids=ids).last_hidden_state,
                                   te(input_ids=ids).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_vae_names_on_a_deeper_vae() -> None:
    """resnets, shortcuts and channel changes (which the tiny-world VAE has none of) map too."""
    pytest.importorskip("diffusers", reason="the comparison needs diffusers' AutoencoderKL")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    diff = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=16).eval()
    ddconfig = dict(double_z=True, z_channels=4, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    ldm = LdmAutoencoder(ddconfig, 4).eval()
    ldm.load_state_dict(vae_state_to_ldm(diff.state_dict(), 2), strict=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(ldm.encode_mean(x), diff.encode(x).latent_dist.mean, rtol=1e-4, atol=1e-4)
        z = torch.randn(1, 4, 8, 8)
        torch.testing.assert_close(ldm.decode(z), diff.decode(z).sample, rtol=1e-4, atol=1e-4)
    for bad in ("encoder.down_blocks.5.resnets.0.conv1.weight", "decoder.mid_block.attentions.0.to_x.weight",
                "encoder.down_blocks.0.upsamplers.0.conv.weight", "vae.conv_in.weight"):
        with pytest.raises(ModelLayoutError):
            vae_name_to_ldm(bad, 2)


def test_export_refusals_and_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=".safetensors"):
        export_checkpoint(tmp_path / "model.ckpt")
    out = tmp_path / "m.safetensors"
    assert main(["export-checkpoint", "--demo", "sd1", str(out), "--half"]) == 0
    assert capsys.readouterr().out.split() == [str(out), str(out.with_suffix(".yaml")), str(tmp_path / "m-clip")]
    header = read_header(out)
    assert {t.dtype for k, t in header.tensors.items() if not k.endswith("position_ids")} == {"F16"}
    assert main(["export-checkpoint", "--demo", "sd1", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err
    with pytest.raises(SaveError):
        export_checkpoint(out)
    assert main(["export-checkpoint", "--demo", "sd1", str(out), "--force"]) == 0
    assert {t.dtype for k, t in read_header(out).tensors.items() if not k.endswith("position_ids")} == {"F32"}
