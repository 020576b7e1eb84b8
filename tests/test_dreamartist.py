"""DreamArtist++ (pivotal.training.dreamartist): the negative embedding trains (it gets gradients),
is saved in the bundle, the step's prediction is the CFG combination of the two branches, and the
saved negative name works in the negative prompt of Pivotal's own generate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from safetensors.torch import load_file, save_file  # noqa: E402

from pivotal.adapters.network import LoraNetwork  # noqa: E402
from pivotal.formats.bundle import read_bundle  # noqa: E402
from pivotal.formats.safetensors_io import read_header  # noqa: E402
from pivotal.host_api import SizeInfo  # noqa: E402
from pivotal.inference.generate import generate_image  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402
from pivotal.training.batches import BatchSource  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.dreamartist import guided_prediction, negative_captions, negative_specs  # noqa: E402
from pivotal.training.step import StepRunner  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402

# ``host`` (the demo sd1 host) and ``data_dir`` (its dataset) are fixtures in conftest.py.


def config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), output_name="da", steps=3, resolution=64,
                bucket_step=16, embeddings=[EmbeddingSpec("mychar", 2, "person")], unet_lr=1e-3,
                embedding_lr=1e-2, save_precision="fp32", seed=3, dreamartist=True, dreamartist_cfg=3.0)
    base.update(kw)
    return TrainConfig(**base)


def test_negative_captions_replace_whole_names_only() -> None:
    pairs = {"mychar": "mychar-neg", "my": "my-neg"}
    assert negative_captions(["mychar, on a hill", "MyChar and my dog", "mycharx", "a hill"], pairs) == [
        "mychar-neg, on a hill", "mychar-neg and my-neg dog", "mycharx", "a hill"]
    cfg = TrainConfig(data_dir="d", embeddings=[EmbeddingSpec("a", 3, "dog")], dreamartist=True,
                      dreamartist_vectors=1)
    assert [(s.name, s.vectors, s.init_text) for s in negative_specs(cfg)] == [("a-neg", 1, "dog")]


def test_the_step_prediction_is_the_cfg_combination(host, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, tmp_path).validate()
    embeddings = EmbeddingSet()
    vocab = {"clip_l": host.vocabulary("clip_l").detach().float()}
    gen = torch.Generator().manual_seed(0)
    for spec in [*cfg.embeddings, *negative_specs(cfg)]:
        embeddings.add_new(spec.name, spec.vectors, vocab, generator=gen)
    net = LoraNetwork(host.lora_targets("unet", "attn"), rank=2, alpha=2.0)
    runner = StepRunner(cfg, host, net, embeddings, BatchSource(cfg, host), torch.Generator().manual_seed(0))
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([100, 700])
    captions = ["mychar, on a hill", "a red mychar"]
    sizes = [SizeInfo((64, 64), (0, 0), (64, 64))] * 2
    with torch.no_grad():
        got = runner.predict(noisy, t, captions, sizes)
        cond = host.predict(noisy, t, host.encode_prompts(captions, embeddings))
        uncond = host.predict(noisy, t, host.encode_prompts(["mychar-neg, on a hill", "a red mychar-neg"], embeddings))
        unguided = runner.predict(noisy, t, captions, sizes, guided=False)
    assert not torch.allclose(cond, uncond, atol=1e-4)  # the negative vectors change the prediction
    torch.testing.assert_close(got, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(guided_prediction(uncond, cond, 3.0), got, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unguided, cond, rtol=1e-5, atol=1e-6)


def test_negative_embedding_trains_and_is_saved(host, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, tmp_path, freeze_embeddings_at=1.0)
    result = train(cfg, host)
    assert result.status == "completed"
    bundle = read_bundle(result.bundle_path)
    assert sorted(bundle.embeddings) == ["mychar", "mychar-neg"]
    neg = bundle.embeddings["mychar-neg"]
    assert neg.num_vectors == 2
    # both started from "person": the negative moved, so it was trained (it had gradients)
    init = host.vocabulary("clip_l")[host.tokenizer("clip_l").encode("person", add_special_tokens=False)[0]]
    assert (neg.vectors["clip_l"] - init.float()).abs().max() > 1e-4
    assert not torch.allclose(neg.vectors["clip_l"], bundle.embeddings["mychar"].vectors["clip_l"])
    meta = read_header(result.bundle_path).metadata
    assert json.loads(meta["pivotal.dreamartist"]) == {"cfg": 3.0, "negatives": {"mychar": "mychar-neg"}}
    assert json.loads(meta["pivotal.training"])["dreamartist"] is True


def _with_negative_zeroed(src: str, dst: Path) -> None:
    """A copy of bundle ``src`` whose negative embedding is all zeros (keys as A1111 names them)."""
    tensors = load_file(src)
    key = "bundle_emb.mychar-neg.string_to_param.*"
    tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, str(dst), metadata=read_header(src).metadata)


def test_the_negative_name_works_in_the_negative_prompt_of_generate(host, data_dir: Path, tmp_path: Path) -> None:
    result = train(config(data_dir, tmp_path / "run", steps=2), host)
    loras = tmp_path / "loras"
    loras.mkdir()
    (loras / "da.safetensors").write_bytes(Path(result.bundle_path).read_bytes())
    other = tmp_path / "other"
    other.mkdir()
    _with_negative_zeroed(result.bundle_path, other / "da.safetensors")

    def image(folder: Path, negative: str) -> torch.Tensor:
        img, info = generate_image(host, "mychar <lora:da:1>", negative, [folder], 3, 5, 64, 64, 5.0)
        assert "mychar-neg" in info["embeddings"]
        return torch.from_numpy(np.asarray(img, dtype=np.float32))

    # the negative prompt's name means the bundle's vectors: other vectors, another picture
    assert (image(loras, "mychar-neg") - image(other, "mychar-neg")).abs().max() > 0
    # and only through the name: without it in the prompt the two bundles draw the same
    assert torch.equal(image(loras, "blurry"), image(other, "blurry"))
