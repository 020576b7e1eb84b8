"""``<lora:...>`` prompt tags, finding bundles, applying them around ``host.generate``, infotext,
and ``pivotal generate``. The host-agnostic parts run on a minimal fake host (both environments);
the image tests use the diffusers demo host and skip where diffusers is absent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import tiny_text
import tiny_unets
from pivotal.adapters.network import LoraNetwork
from pivotal.adapters.te_names import text_encoder_lora_targets, token_embedding_of
from pivotal.adapters.unet_targets import unet_lora_targets
from pivotal.errors import BundleError, ConfigError
from pivotal.formats.bundle import BundleEmbedding, write_bundle
from pivotal.formats.bundle_metadata import TrainingInfo
from pivotal.host_api import HostDefaults
from pivotal.inference.generate import find_bundle, format_infotext, generate_image
from pivotal.text.embeddings import EmbeddingSet

NEEDS_DIFFUSERS = "the standalone diffusers host is not used in the webui environment, which has no diffusers"


def test_find_bundle(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    (second / "sub").mkdir(parents=True)
    first.mkdir()
    (second / "style.safetensors").write_bytes(b"")
    (second / "sub" / "Deep.safetensors").write_bytes(b"")
    (first / "old.pt").write_bytes(b"")
    assert find_bundle("style", [first, second]) == second / "style.safetensors"
    assert find_bundle("deep", [first, second]) == second / "sub" / "Deep.safetensors"
    with pytest.raises(ConfigError, match=f"no missing.safetensors in {first}, {second}"):
        find_bundle("missing", [first, second])
    with pytest.raises(ConfigError, match="only .safetensors files are loaded.*pivotal convert"):
        find_bundle("old", [first, second])
    with pytest.raises(ConfigError, match="--lora-dir"):
        find_bundle("style", [])
    for bad in ("../style", "sub/Deep", "..", "c:x"):
        with pytest.raises(ConfigError, match="without folders"):
            find_bundle(bad, [second])
    (first / "sub").mkdir()
    (first / "sub" / "DEEP.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="several files"):
        find_bundle("deep", [first, second])


class FakeHost(HostDefaults):
    """The least a host must offer generate_image: a tiny SD1 (LDM UNet + HF clip_l); ``generate``
    records what it was given and which LoRA modules were attached at which strength."""

    base_model = "sd1"
    device = torch.device("cpu")
    dtype = torch.float32
    label = "fake sd1"

    def default_resolution(self) -> int:
        return 64

    def __init__(self) -> None:
        self.unet = tiny_unets.ldm_unet("sd1")
        self.te = tiny_text.hf_text_model("clip_l")
        self.calls: list[dict[str, Any]] = []
        self.fail = False

    def encoder_keys(self) -> tuple[str, ...]:
        return ("clip_l",)

    def vocabulary(self, key: str) -> torch.Tensor:
        return token_embedding_of(self.te).weight.detach()

    def tokenizer(self, key: str) -> Any:
        return tiny_text.clip_tokenizer()

    def lora_targets(self, part: str, preset: str) -> list:
        if part == "unet":
            return unet_lora_targets(self.unet, "sd1", preset)
        return text_encoder_lora_targets(self.te, "te", preset)

    def attached(self) -> dict[str, float]:
        mods = [m for _, m in self.lora_targets("unet", "attn-mlp-conv") + self.lora_targets("te", "attn-mlp")]
        return {m._pivotal_lora.key: m._pivotal_lora.multiplier for m in mods if hasattr(m, "_pivotal_lora")}

    def generate(self, prompt: str, negative: str, embeddings: EmbeddingSet, steps: int, seed: int,
                 width: int, height: int, guidance: float) -> Any:
        self.calls.append(dict(prompt=prompt, negative=negative, embeddings=embeddings.tensors(), size=(width, height),
                               attached=self.attached()))
        if self.fail:
            raise RuntimeError("host failed")
        return Image.new("RGB", (width, height))


def write_test_bundle(path: Path, targets: list, vocab: dict[str, torch.Tensor], base: str = "sd1",
                      emb_name: str = "mychar", scale: float = 0.1) -> LoraNetwork:
    net = LoraNetwork(targets, rank=2, alpha=1.0)
    g = torch.Generator().manual_seed(len(path.name))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    embs = EmbeddingSet()
    embs.add_new(emb_name, 2, vocab, generator=g)
    bundled = [BundleEmbedding(n, v) for n, v in embs.tensors().items()]
    write_bundle(path, base, net.kohya_state_dict(), bundled, TrainingInfo(path.stem, resolution=(64, 64)))
    return net


@pytest.fixture()
def fake(tmp_path: Path) -> FakeHost:
    host = FakeHost()
    vocab = {"clip_l": host.vocabulary("clip_l")}
    write_test_bundle(tmp_path / "mine.safetensors",
                      host.lora_targets("unet", "attn") + host.lora_targets("te", "attn"),
                      vocab)
    write_test_bundle(tmp_path / "other.safetensors", host.lora_targets("unet", "attn"), vocab, emb_name="Mychar")
    write_test_bundle(tmp_path / "te_only.safetensors", host.lora_targets("te", "attn-mlp")[4:6], vocab,
                      emb_name="tok2")
    return host


def test_generate_image_applies_and_removes_bundles(fake: FakeHost, tmp_path: Path) -> None:
    image, info = generate_image(fake, "photo of mychar <lora:mine:0.7>", "blurry <lora:other>", [tmp_path],
                                 steps=2, seed=1, width=None, height=32, guidance=5.0)
    call = fake.calls[-1]
    assert call["prompt"] == "photo of mychar" and call["negative"] == "blurry"
    assert call["size"] == (64, 32) and image.size == (64, 32)
    assert list(call["embeddings"]) == ["mychar"] and call["embeddings"]["mychar"]["clip_l"].shape == (2, 32)
    assert call["attached"] and set(call["attached"].values()) == {0.7}
    assert {k.split("_")[1] for k in call["attached"]} == {"unet", "te"}
    assert fake.attached() == {}  # detached afterwards
    assert info["embeddings"] == ["mychar"] and info["clean_prompt"] == "photo of mychar"
    (lora,) = info["loras"]
    assert lora["name"] == "mine" and lora["weight"] == 0.7 and len(lora["hash"]) == 12
    assert any("negative prompt are ignored" in w for w in info["warnings"])


def test_generate_image_two_bundles_and_name_clash(fake: FakeHost, tmp_path: Path) -> None:
    _, info = generate_image(fake, "<lora:mine:1> <lora:te_only:0.5> mychar tok2", "", [tmp_path], 2, 0, 64, 64, 7.0)
    attached = fake.calls[-1]["attached"]
    assert {v for k, v in attached.items() if k.startswith("lora_unet")} == {1.0}
    assert 0.5 in attached.values() and info["embeddings"] == ["mychar", "tok2"]
    with pytest.raises(ConfigError, match="change the same layers"):
        generate_image(fake, "<lora:mine> <lora:other>", "", [tmp_path], 2, 0, 64, 64, 7.0)
    assert fake.attached() == {}


@pytest.mark.parametrize("tag, unet, te", [("<lora:mine:te=0:unet=0.5>", 0.5, 0.0), ("<lora:mine:0.3:0>", 0.0, 0.3),
                                          ("<lora:mine:0>", 0.0, 0.0)])
def test_generate_image_applies_each_part_at_its_strength(fake: FakeHost, tmp_path: Path, tag: str, unet: float,
                                                          te: float) -> None:
    _, info = generate_image(fake, f"mychar {tag}", "", [tmp_path], 2, 0, 64, 64, 7.0)
    attached = fake.calls[-1]["attached"]
    assert {v for k, v in attached.items() if k.startswith("lora_unet")} == {unet}
    assert {v for k, v in attached.items() if k.startswith("lora_te")} == {te}
    # the embeddings come with the tag at any strength, 0 included (the grid's "embeddings only")
    assert info["embeddings"] == ["mychar"] and info["loras"][0]["unet"] == unet and info["loras"][0]["te"] == te


def test_generate_image_detaches_when_the_host_fails(fake: FakeHost, tmp_path: Path) -> None:
    fake.fail = True
    with pytest.raises(RuntimeError, match="host failed"):
        generate_image(fake, "<lora:mine>", "", [tmp_path], 2, 0, 64, 64, 7.0)
    assert fake.calls[-1]["attached"] and fake.attached() == {}


def test_generate_image_errors(fake: FakeHost, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"<lora:absent>: no absent.safetensors in {tmp_path}"):
        generate_image(fake, "<lora:mine> <lora:absent>", "", [tmp_path], 2, 0, 64, 64, 7.0)
    assert fake.attached() == {}
    sdxl_dir = tmp_path / "xl"
    sdxl_dir.mkdir()
    te2 = tiny_text.hf_text_model("clip_g")
    write_test_bundle(sdxl_dir / "xl.safetensors", text_encoder_lora_targets(te2, "te2", "attn-mlp"),
                      {"clip_l": fake.vocabulary("clip_l"), "clip_g": token_embedding_of(te2).weight}, base="sdxl")
    with pytest.raises(BundleError, match="is a sdxl bundle; the loaded model is sd1"):
        generate_image(fake, "<lora:xl>", "", [sdxl_dir], 2, 0, 64, 64, 7.0)


def test_format_infotext() -> None:
    info = {"prompt": "a <lora:x:0.5> cat", "negative": "ugly", "steps": 20, "sampler": "euler", "guidance": 7.0,
            "seed": 3, "width": 512, "height": 768, "model": "demo sd1 (tiny, random)",
            "loras": [{"name": "x", "hash": "0123456789ab"}, {"name": "y", "hash": "ba9876543210"}]}
    assert format_infotext(info) == (
        "a <lora:x:0.5> cat\nNegative prompt: ugly\n"
        'Steps: 20, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 512x768, Model: "demo sd1 (tiny, random)", '
        'Lora hashes: "x: 0123456789ab, y: ba9876543210", Version: pivotal 0.1.0')
    info.update(negative="", loras=[], model="m", guidance=4.5)
    assert format_infotext(info).splitlines()[1].startswith("Steps: 20, Sampler: Euler, CFG scale: 4.5, ")


@pytest.fixture(scope="module")
def demo_sd1(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("diffusers", reason=NEEDS_DIFFUSERS)
    from pivotal.demo.host import build_demo_host

    cache = tmp_path_factory.mktemp("pivotal-cache")
    return cache, build_demo_host("sd1", seed=0, device="cpu", cache_dir=cache)


def test_generate_image_on_the_demo_host(demo_sd1: Any, tmp_path: Path) -> None:
    _, host = demo_sd1
    vocab = {"clip_l": host.vocabulary("clip_l")}
    write_test_bundle(tmp_path / "b.safetensors", host.lora_targets("unet", "attn-mlp-conv")
                      + host.lora_targets("te", "attn"), vocab, scale=0.3)
    run = lambda prompt: generate_image(host, prompt, "", [tmp_path], 2, 5, None, None, 6.0)[0].tobytes()  # noqa: E731
    plain = run("a photo")
    assert run("a photo") == plain
    assert run("a photo <lora:b:1>") != plain
    assert run("a photo <lora:b:0>") == plain  # strength 0 switches the LoRA off
    assert run("a photo of mychar <lora:b:0>") != run("a photo of mychar")  # the embedding still applies
    assert run("a photo") == plain  # nothing left attached


def test_cli_generate_writes_png(demo_sd1: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from pivotal.cli.main import main

    cache, host = demo_sd1
    monkeypatch.setenv("PIVOTAL_CACHE_DIR", str(cache))
    loras = tmp_path / "loras"
    loras.mkdir()
    write_test_bundle(loras / "b.safetensors", host.lora_targets("unet", "attn"), {"clip_l": host.vocabulary("clip_l")})
    out = tmp_path / "img.png"
    args = ["generate", "--demo", "sd1", "--prompt", "mychar <lora:b:0.8>", "--negative", "dark", "--steps", "2",
            "--seed", "4", "--width", "48", "--guidance", "5", "--lora-dir", str(loras), "--out", str(out)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as im:
        assert im.size == (48, 64) and im.format == "PNG"
        params = im.info["parameters"]
    lines = params.splitlines()
    assert lines[:2] == ["mychar <lora:b:0.8>", "Negative prompt: dark"]
    assert lines[2].startswith("Steps: 2, Sampler: Euler, CFG scale: 5, Seed: 4, Size: 48x64, Model: ")
    assert 'Lora hashes: "b: ' in lines[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.png", "loras"]  # no temp file left
    assert main(args[:-1] + [str(tmp_path / "no" / "x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--demo", "sd1", "--prompt", "<lora:zz>", "--out", str(out)]) == 2
    assert "<lora:zz>: no LoRA folder given" in capsys.readouterr().err
