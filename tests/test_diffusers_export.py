"""Bundles in real diffusers pipelines: ``pivotal export-diffusers`` and the one-call helper give a
pipeline whose text encoding and UNet output equal Pivotal's own with the same bundle (SD1 and SDXL
demo models), through diffusers' own ``load_lora_weights`` / ``load_textual_inversion``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is not part of the webui environment")
pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")

from safetensors.torch import load_file  # noqa: E402

from pivotal.adapters.network import LoraNetwork  # noqa: E402
from pivotal.cli.main import main  # noqa: E402
from pivotal.demo.host import build_demo_host  # noqa: E402
from pivotal.errors import ConfigError, SaveError  # noqa: E402
from pivotal.formats.bundle import BundleEmbedding, write_bundle  # noqa: E402
from pivotal.formats.bundle_metadata import TrainingInfo  # noqa: E402
from pivotal.formats.diffusers_export import export_for_diffusers  # noqa: E402
from pivotal.hosts.diffusers.clip_tokenizer import clip_tokenizer  # noqa: E402
from pivotal.hosts.diffusers.host import DiffusersHost  # noqa: E402
from pivotal.hosts.diffusers.ldm_configs import shipped_config  # noqa: E402
from pivotal.inference.bundle_load import load_bundle_for_model  # noqa: E402
from pivotal.inference.diffusers_pipeline import load_bundle_into_pipeline  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402

BASES = ["sd1", "sdxl"]
PROMPT = "a photo of mychar on a blue background, in my-style"
EMBEDDINGS = {"mychar": 2, "my-style": 1}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, DiffusersHost]:
    cache = tmp_path_factory.mktemp("cache")
    return {b: build_demo_host(b, seed=0, device="cpu", cache_dir=cache) for b in BASES}


def make_bundle(host: DiffusersHost, path: Path) -> Path:
    """A bundle with a UNet + text-encoder LoRA (random, not small) and two embeddings."""
    targets = host.lora_targets("unet", "attn-mlp") + host.lora_targets("te", "attn-mlp")
    net = LoraNetwork(targets, rank=4, alpha=2.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    embs = [BundleEmbedding(name, {k: torch.randn(n, host.vocabulary(k).shape[1], generator=gen) * 0.02
                                   for k in host.encoder_keys()})
            for name, n in EMBEDDINGS.items()]
    write_bundle(path, host.base_model, net.kohya_state_dict(), embs,
                 TrainingInfo(path.stem, resolution=(64, 64), num_train_images=1, settings={}))
    return path


def pivotal_outputs(host: DiffusersHost, bundle: Path, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What Pivotal computes with the bundle applied (as ``pivotal generate`` applies it)."""
    targets = host.lora_targets("unet", "attn-mlp-conv") + host.lora_targets("te", "attn-mlp-conv")
    dims = {k: int(host.vocabulary(k).shape[1]) for k in host.encoder_keys()}
    loaded = load_bundle_for_model(bundle, host.base_model, targets, dims)
    assert loaded.report is not None and not loaded.report.unmatched
    embs = EmbeddingSet()
    for name, emb in loaded.embeddings.items():
        embs.add(name, dict(emb.vectors))
    with torch.no_grad(), loaded.network.attached():
        cond = host.encode_prompts([PROMPT], embs)
        eps = host.predict(inputs["x"], inputs["t"], cond)
    out = {"context": cond.context, "eps": eps}
    if host.base_model == "sdxl":
        out["pooled"] = cond.extra["text_embeds"]
    return out


def make_pipe(host: DiffusersHost) -> Any:
    """A real diffusers pipeline over copies of the host's modules and fresh tokenizers (the
    loaders change both)."""
    common = dict(vae=copy.deepcopy(host.vae), unet=copy.deepcopy(host.unet),
                  text_encoder=copy.deepcopy(host._encoders["clip_l"]), tokenizer=clip_tokenizer("clip_l"),
                  scheduler=diffusers.EulerDiscreteScheduler.from_config(shipped_config("scheduler")))
    if host.base_model == "sd1":
        return diffusers.StableDiffusionPipeline(**common, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    return diffusers.StableDiffusionXLPipeline(**common, text_encoder_2=copy.deepcopy(host._encoders["clip_g"]),
                                               tokenizer_2=clip_tokenizer("clip_g"))


def pipe_outputs(pipe: Any, base: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' own prompt encoding and UNet call."""
    with torch.no_grad():
        encoded = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
        context = encoded[0]
        kwargs: dict[str, Any] = {}
        out: dict[str, torch.Tensor] = {"context": context}
        if base == "sdxl":
            out["pooled"] = encoded[2]
            h, w = inputs["x"].shape[-2] * 8, inputs["x"].shape[-1] * 8
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
            kwargs["added_cond_kwargs"] = {"text_embeds": encoded[2], "time_ids": time_ids}
        out["eps"] = pipe.unet(inputs["x"], inputs["t"], encoder_hidden_states=context, **kwargs).sample
    return out


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"x": torch.randn(1, 4, 8, 8, generator=gen), "t": torch.tensor([400])}


def assert_equal_outputs(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        # the same arithmetic in the same order: equal to the last bit
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("base", BASES)
def test_exported_folder_loads_in_diffusers_with_equal_outputs(
        base: str, hosts: dict[str, DiffusersHost], tmp_path: Path) -> None:
    host = hosts[base]
    bundle = make_bundle(host, tmp_path / "mine.safetensors")
    inputs = _inputs()
    want = pivotal_outputs(host, bundle, inputs)
    # the bundle as it is: diffusers refuses it (the bundle_emb.* keys), which is why the export exists
    pipe = make_pipe(host)
    with pytest.raises(ValueError, match="(?i)invalid lora checkpoint"):
        pipe.load_lora_weights(str(bundle))
    out = tmp_path / "export"
    assert main(["export-diffusers", str(bundle), str(out)]) == 0
    manifest = json.loads((out / "pivotal_bundle.json").read_text())
    assert manifest["base_model"] == base and sorted(manifest["embeddings"]) == sorted(EMBEDDINGS)
    assert not any(k.startswith("bundle_emb.") for k in load_file(str(out / "pytorch_lora_weights.safetensors")))
    # exactly what README.md tells a diffusers user to do
    pipe = make_pipe(host)
    pipe.load_lora_weights(str(out))
    for name in EMBEDDINGS:
        path = str(out / "embeddings" / f"{name}.safetensors")
        if base == "sd1":
            pipe.load_textual_inversion(path, token=name)
        else:
            state = load_file(path)
            pipe.load_textual_inversion(state["clip_l"], token=name, text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token=name, text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    assert_equal_outputs(pipe_outputs(pipe, base, inputs), want)
    # the LoRA changes the outputs at all (else the equality above would prove nothing about it)
    bare = pipe_outputs(make_pipe(host), base, inputs)
    assert not torch.equal(bare["eps"], want["eps"])


@pytest.mark.slow
@pytest.mark.parametrize("base", BASES)
def test_one_call_helper_from_bundle_and_from_folder(base: str, hosts: dict[str, DiffusersHost],
                                                     tmp_path: Path) -> None:
    host = hosts[base]
    bundle = make_bundle(host, tmp_path / "mine.safetensors")
    inputs = _inputs()
    want = pivotal_outputs(host, bundle, inputs)
    export_for_diffusers(bundle, tmp_path / "export")
    for source in (bundle, tmp_path / "export"):
        pipe = make_pipe(host)
        info = load_bundle_into_pipeline(pipe, source)
        assert info["base_model"] == base and info["embeddings"] == sorted(EMBEDDINGS)
        assert_equal_outputs(pipe_outputs(pipe, base, inputs), want)
    other = "sdxl" if base == "sd1" else "sd1"
    with pytest.raises(ConfigError, match=f"a {base} bundle cannot load into this {other} pipeline"):
        load_bundle_into_pipeline(make_pipe(hosts[other]), bundle)


def test_export_refuses_to_overwrite_and_removes_a_stale_lora(hosts: dict[str, DiffusersHost], tmp_path: Path) -> None:
    bundle = make_bundle(hosts["sd1"], tmp_path / "mine.safetensors")
    out = tmp_path / "export"
    export_for_diffusers(bundle, out)
    with pytest.raises(SaveError, match="already holds an export.*--force"):
        export_for_diffusers(bundle, out)
    written = export_for_diffusers(bundle, out, force=True)
    assert {p.name for p in written} == {"pytorch_lora_weights.safetensors", "mychar.safetensors",
                                         "my-style.safetensors", "pivotal_bundle.json", "README.md"}
    with pytest.raises(SaveError, match="parent .* does not exist"):
        export_for_diffusers(bundle, tmp_path / "no" / "such")
