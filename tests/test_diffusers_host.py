"""The standalone diffusers host on the tiny demo models: the TrainingHost contract, gradients,
exact restoration after a training session, previews, the folder loader and its errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the standalone diffusers host is not used in the webui "
                                        "environment, which has no diffusers")

from pivotal.adapters.network import LoraNetwork  # noqa: E402
from pivotal.demo import model as demo_model  # noqa: E402
from pivotal.demo.basics import SCHEDULER_CONFIG  # noqa: E402
from pivotal.demo.host import build_demo_host, load_host  # noqa: E402
from pivotal.errors import ConfigError, ModelLayoutError  # noqa: E402
from pivotal.host_api import SizeInfo  # noqa: E402
from pivotal.hosts.diffusers import clip_tokenizer  # noqa: E402
from pivotal.hosts.diffusers.host import DiffusersHost, load_diffusers_folder  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402

BASES = ["sd1", "sdxl"]
CONTEXT = {"sd1": 64, "sdxl": 96}  # sd1: the pre-trained tiny-world model's 64-wide clip_l
CLIP_L_WIDTH = {"sd1": 64, "sdxl": 32}
PROMPTS = ["a photo of mychar in a garden", "mychar"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pivotal-cache")


@pytest.fixture(scope="module")
def hosts(cache_dir: Path) -> dict[str, DiffusersHost]:
    return {b: build_demo_host(b, seed=0, device="cpu", cache_dir=cache_dir) for b in BASES}


def make_embeddings(host: DiffusersHost, seed: int = 3) -> EmbeddingSet:
    embs = EmbeddingSet()
    embs.add_new("mychar", 2, {k: host.vocabulary(k) for k in host.encoder_keys()},
                 generator=torch.Generator().manual_seed(seed))
    return embs


def random_lora(targets: list, seed: int = 0, scale: float = 0.3) -> LoraNetwork:
    net = LoraNetwork(targets, rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


def state_hash(host: DiffusersHost) -> str:
    h = hashlib.sha256()
    for m in host._modules():
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def module_flags(host: DiffusersHost) -> dict:
    flags = {}
    for i, root in enumerate(host._modules()):
        for name, m in root.named_modules():
            hooks = sum(len(d) for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks))
            ckpt = {a: m.__dict__.get(a, "absent") for a in ("gradient_checkpointing", "_gradient_checkpointing_func")}
            flags[(i, name)] = (m.training, hooks, repr(ckpt), "forward" in m.__dict__)
        for name, p in root.named_parameters():
            flags[(i, "param", name)] = p.requires_grad
    return flags


def test_contract_basics(hosts: dict[str, DiffusersHost]) -> None:
    for base, host in hosts.items():
        assert host.base_model == base and host.prediction_type == "epsilon"
        assert host.device == torch.device("cpu") and host.dtype == torch.float32
        assert host.encoder_keys() == (("clip_l",) if base == "sd1" else ("clip_l", "clip_g"))
        assert host.vocabulary("clip_l").shape == (49408, CLIP_L_WIDTH[base])
        assert not host.vocabulary("clip_l").requires_grad
        if base == "sdxl":
            assert host.vocabulary("clip_g").shape == (49408, 64)
            assert host.tokenizer("clip_g").pad_token_id == 0  # SDXL's tokenizer_2 pads with "!"
        assert host.tokenizer("clip_l").pad_token_id == 49407
        acp = host.alphas_cumprod()
        assert acp.shape == (1000,) and acp.dtype == torch.float32
        assert torch.all(acp[1:] < acp[:-1]) and abs(float(acp[0]) - (1 - 0.00085)) < 1e-6
        assert host.default_resolution() == 64 and host.vae_scale_factor == 8
        if base == "sdxl":
            assert "random weights" in host.label
        with pytest.raises(ModelLayoutError, match="clip_x"):
            host.vocabulary("clip_x")


@pytest.mark.parametrize("base", BASES)
def test_lora_targets(hosts: dict[str, DiffusersHost], base: str) -> None:
    host = hosts[base]
    unet_keys = [k for k, _ in host.lora_targets("unet", "attn")]
    te_keys = [k for k, _ in host.lora_targets("te", "attn-mlp")]
    assert unet_keys and all(k.startswith("lora_unet_") for k in unet_keys)
    if base == "sd1":
        assert all(k.startswith("lora_te_") for k in te_keys)
        assert any(k.startswith("lora_unet_down_blocks_0_attentions_0") for k in unet_keys)  # diffusers naming
    else:
        assert {k.split("_text_model")[0] for k in te_keys} == {"lora_te1", "lora_te2"}
        # clip_l is read at its penultimate layer: no LoRA on the last one, which gets no gradient;
        # clip_g's last layer feeds the pooled embedding and keeps its LoRA
        last = demo_model.TEXT_LAYERS - 1
        assert not any(k.startswith(f"lora_te1_text_model_encoder_layers_{last}_") for k in te_keys)
        assert any(k.startswith(f"lora_te1_text_model_encoder_layers_{last - 1}_") for k in te_keys)
        assert any(k.startswith(f"lora_te2_text_model_encoder_layers_{last}_") for k in te_keys)
        assert any(k.startswith("lora_unet_input_blocks_") for k in unet_keys)  # LDM naming
    with pytest.raises(ConfigError):
        host.lora_targets("vae", "attn")


@pytest.mark.parametrize("base", BASES)
def test_encode_prompts_shapes_and_time_ids(hosts: dict[str, DiffusersHost], base: str) -> None:
    host = hosts[base]
    embs = make_embeddings(host)
    sizes = [SizeInfo((96, 64), (8, 0), (64, 64)), SizeInfo((64, 64), (0, 0), (64, 64))]
    cond = host.encode_prompts(PROMPTS, embs, sizes)
    assert cond.context.shape == (2, 77, CONTEXT[base]) and cond.context.dtype == torch.float32
    if base == "sd1":
        assert cond.extra == {}
    else:
        assert cond.extra["text_embeds"].shape == (2, 64)
        assert cond.extra["time_ids"].tolist() == [[96, 64, 8, 0, 64, 64], [64, 64, 0, 0, 64, 64]]
    # The embedding is spliced in: other vectors give another conditioning.
    other = host.encode_prompts(PROMPTS, make_embeddings(host, seed=9), sizes)
    assert not torch.allclose(cond.context, other.context)
    with pytest.raises(ConfigError, match="sizes"):
        host.encode_prompts(PROMPTS, embs, sizes[:1])


def test_encoding_matches_diffusers_pipelines(hosts: dict[str, DiffusersHost]) -> None:
    """With no embeddings, the conditioning is exactly what diffusers' own pipelines compute."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sd1, sdxl = hosts["sd1"], hosts["sdxl"]
    prompt = "a red house by the sea, oil painting"
    sched = EulerDiscreteScheduler.from_config({k: v for k, v in SCHEDULER_CONFIG.items() if k[0] != "_"})
    pipe = StableDiffusionPipeline(vae=sd1.vae, text_encoder=sd1._encoders["clip_l"], tokenizer=sd1.tokenizer("clip_l"),
                                   unet=sd1.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        ours = sd1.encode_prompts([prompt], EmbeddingSet()).context
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    pipe = StableDiffusionXLPipeline(vae=sdxl.vae, text_encoder=sdxl._encoders["clip_l"],
                                     text_encoder_2=sdxl._encoders["clip_g"], tokenizer=sdxl.tokenizer("clip_l"),
                                     tokenizer_2=sdxl.tokenizer("clip_g"), unet=sdxl.unet, scheduler=sched)
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        cond = sdxl.encode_prompts([prompt], EmbeddingSet(), [SizeInfo((64, 64), (0, 0), (64, 64))])
    torch.testing.assert_close(cond.context, ref, rtol=0, atol=0)
    torch.testing.assert_close(cond.extra["text_embeds"], ref_pooled, rtol=0, atol=0)
    ref_ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=64)
    torch.testing.assert_close(cond.extra["time_ids"], ref_ids)


@pytest.mark.parametrize("base", BASES)
def test_gradients_reach_embeddings_and_loras_only(hosts: dict[str, DiffusersHost], base: str) -> None:
    host = hosts[base]
    embs = make_embeddings(host)
    te_net = random_lora(host.lora_targets("te", "attn-mlp"), seed=1)
    unet_net = random_lora(host.lora_targets("unet", "attn"), seed=2)
    vocab_before = {k: host.vocabulary(k).clone() for k in host.encoder_keys()}
    before = state_hash(host)
    opt = torch.optim.AdamW(embs.parameters() + list(te_net.parameters()) + list(unet_net.parameters()), lr=1e-2)
    latents = host.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    with host.training_session(gradient_checkpointing=False), te_net.attached(), unet_net.attached():
        cond = host.encode_prompts(PROMPTS, embs)
        out = host.predict(latents, torch.tensor([10, 500]), cond)
        assert out.shape == latents.shape and out.dtype == torch.float32
        loss = (out - torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).pow(2).mean()
        loss.backward()
        opt.step()
    for name, p in embs.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for part in te_net.parts:
        for m in te_net.modules_of(part):
            # SDXL conditions on clip_l's penultimate layer, so its last layer never sees a gradient
            # (in real SDXL too); clip_g's last layer still feeds the pooled embedding.
            unused = part == "te1" and m.key.startswith("lora_te1_text_model_encoder_layers_1_")
            grads = [p.grad for p in m.parameters()]
            if unused:
                assert all(g is None for g in grads), m.key
            else:
                assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, m.key
    assert set(te_net.parts) == ({"te"} if base == "sd1" else {"te1", "te2"})
    assert all(p.grad is not None for p in unet_net.parameters())
    assert state_hash(host) == before
    for k, v in vocab_before.items():
        assert torch.equal(host.vocabulary(k), v)
    assert all(p.grad is None for m in host._modules() for p in m.parameters())


@pytest.mark.parametrize("base", BASES)
def test_training_session_restores_everything(hosts: dict[str, DiffusersHost], base: str) -> None:
    host = hosts[base]
    # A non-trivial starting state: some weights trainable, some modules in train mode.
    host.unet.conv_in.weight.requires_grad_(True)
    host._encoders["clip_l"].train()
    try:
        flags, digest = module_flags(host), state_hash(host)
        net = random_lora(host.lora_targets("unet", "attn-mlp-conv"))
        embs = make_embeddings(host)
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        grads = {}
        for ckpt in (False, True):
            with host.training_session(gradient_checkpointing=ckpt), net.attached():
                assert not any(p.requires_grad for m in host._modules() for p in m.parameters())
                assert host.unet.training and not host.vae.training
                assert host.unet.is_gradient_checkpointing is ckpt
                cond = host.encode_prompts(["mychar"], embs)
                host.predict(latents, torch.tensor([300]), cond).square().mean().backward()
            grads[ckpt] = [p.grad.clone() for p in net.parameters()] + [p.grad.clone() for p in embs.parameters()]
            for p in [*net.parameters(), *embs.parameters()]:
                p.grad = None
            assert module_flags(host) == flags and state_hash(host) == digest
        # Checkpointing changes memory, not results.
        for a, b in zip(grads[False], grads[True]):
            torch.testing.assert_close(a, b)
        with pytest.raises(RuntimeError, match="boom"):
            with host.training_session(gradient_checkpointing=True):
                raise RuntimeError("boom")
        assert module_flags(host) == flags and state_hash(host) == digest
    finally:
        host.unet.conv_in.weight.requires_grad_(False)
        host._encoders["clip_l"].eval()


@pytest.mark.parametrize("base", BASES)
def test_encode_images_and_default_time_ids(hosts: dict[str, DiffusersHost], base: str) -> None:
    host = hosts[base]
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a, b = host.encode_images(images), host.encode_images(images)
    assert a.shape == (2, 4, 8, 6) and a.dtype == torch.float32 and not a.requires_grad
    assert torch.equal(a, b)  # the latent mode, no sampling
    with pytest.raises(ConfigError, match="multiple of 8"):
        host.encode_images(torch.zeros(1, 3, 60, 64))
    if base == "sdxl":
        embs = EmbeddingSet()
        implicit = host.encode_prompts(["x", "y"], embs)
        explicit = host.encode_prompts(["x", "y"], embs, [SizeInfo((64, 48), (0, 0), (64, 48))] * 2)
        t = torch.tensor([100, 900])
        with torch.no_grad():
            torch.testing.assert_close(host.predict(a, t, implicit), host.predict(a, t, explicit))


@pytest.mark.parametrize("base", BASES)
def test_generate_is_deterministic_and_follows_the_lora(hosts: dict[str, DiffusersHost], base: str) -> None:
    host = hosts[base]
    embs = make_embeddings(host)
    digest = state_hash(host)
    args = ("a photo of mychar", "", embs, 3, 7, 64, 48, 5.0)
    img = host.generate(*args)
    assert img.size == (64, 48) and img.mode == "RGB"
    assert img.tobytes() == host.generate(*args).tobytes()
    assert img.tobytes() != host.generate("a photo of mychar", "", embs, 3, 8, 64, 48, 5.0).tobytes()
    net = random_lora(host.lora_targets("unet", "attn-mlp-conv"), scale=0.5)
    with net.attached():
        with_lora = host.generate(*args)
    assert with_lora.tobytes() != img.tobytes()
    assert host.generate(*args).tobytes() == img.tobytes()
    host.sampler = "ddim"
    try:
        assert host.generate(*args).tobytes() != img.tobytes()
    finally:
        host.sampler = "euler"
    assert state_hash(host) == digest
    with pytest.raises(ConfigError, match="width"):
        host.generate("x", "", embs, 2, 0, 60, 64, 5.0)


def test_demo_build_is_deterministic(cache_dir: Path) -> None:
    rng = torch.random.get_rng_state()
    a = build_demo_host("sdxl", seed=0, device="cpu", cache_dir=cache_dir)
    b = build_demo_host("sdxl", seed=0, device="cpu", cache_dir=cache_dir)
    c = build_demo_host("sdxl", seed=1, device="cpu", cache_dir=cache_dir)
    assert state_hash(a) == state_hash(b) != state_hash(c)
    # sd1 is the shipped pre-trained model: the seed plays no part.
    sd1 = [build_demo_host("sd1", seed=s, device="cpu", cache_dir=cache_dir) for s in (0, 1)]
    assert state_hash(sd1[0]) == state_hash(sd1[1])
    # ... unless random weights are asked for.
    random_sd1 = [DiffusersHost(demo_model.build_demo_parts("sd1", s, cache_dir, pretrained=False)) for s in (0, 0, 1)]
    hashes = [state_hash(h) for h in random_sd1]
    assert hashes[0] == hashes[1] != hashes[2] and hashes[0] != state_hash(sd1[0])
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random state is untouched


def test_model_id_follows_the_vae_and_nothing_else(hosts: dict[str, DiffusersHost], cache_dir: Path) -> None:
    """The latent cache's key: two models with the same label but another VAE must not share
    latents; a change outside the VAE's encoder (the UNet) must not cost a re-encode."""
    a = hosts["sdxl"]
    b = build_demo_host("sdxl", seed=0, device="cpu", cache_dir=cache_dir)
    assert a.label == b.label and a.model_id() == b.model_id()
    assert a.model_id().startswith("diffusers-vae:") and len(a.model_id()) == len("diffusers-vae:") + 64
    with torch.no_grad():
        next(b.unet.parameters()).add_(1.0)
    assert b.model_id() == a.model_id()
    with torch.no_grad():
        next(b.vae.encoder.parameters()).view(-1)[0] += 1e-3
    assert b.model_id() != a.model_id()
    c = build_demo_host("sdxl", seed=0, device="cpu", cache_dir=cache_dir)
    c.vae.to(torch.float64)
    c._vae_dtype = torch.float64
    assert c.model_id() not in (a.model_id(), b.model_id())  # another VAE dtype gives other latents


def test_demo_tokenizer_needs_open_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_tokenizer, "find_open_clip_bpe", lambda: None)
    with pytest.raises(ConfigError, match="pip install --no-deps open_clip_torch"):
        build_demo_host("sd1", cache_dir=tmp_path / "empty")


def test_load_host_arguments() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        load_host()
    with pytest.raises(ConfigError, match="exactly one"):
        load_host(model="x", demo="sd1")
    with pytest.raises(ConfigError, match="sd3"):
        load_host(demo="sd3")


def save_as_folder(host: DiffusersHost, root: Path) -> None:
    """Write a host's parts in diffusers' pipeline layout (what save_pretrained produces)."""
    host.unet.save_pretrained(root / "unet")
    host.vae.save_pretrained(root / "vae")
    names = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")}
    for key in host.encoder_keys():
        te_dir, tok_dir = names[key]
        host._encoders[key].save_pretrained(root / te_dir)
        host.tokenizer(key).save_pretrained(root / tok_dir)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(host.scheduler_config))


@pytest.mark.parametrize("base", BASES)
def test_folder_round_trip(hosts: dict[str, DiffusersHost], base: str, tmp_path: Path) -> None:
    host = hosts[base]
    save_as_folder(host, tmp_path / "model")
    loaded = load_diffusers_folder(tmp_path / "model", device="cpu")
    assert loaded.base_model == base and loaded.label.startswith("model (")
    assert state_hash(loaded) == state_hash(host)
    # the latent cache's model id names the weights, not the folder or the label: the same on disk
    assert loaded.label != host.label and loaded.model_id() == host.model_id()
    embs = EmbeddingSet()
    a = host.encode_prompts(PROMPTS, embs).context
    b = loaded.encode_prompts(PROMPTS, embs).context
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    last = host.encoder_keys()[-1]
    assert loaded.tokenizer(last).pad_token_id == host.tokenizer(last).pad_token_id


def test_folder_errors(hosts: dict[str, DiffusersHost], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such folder"):
        load_diffusers_folder(tmp_path / "nope")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(ConfigError, match="a single-file checkpoint, not a diffusers folder"):
        load_diffusers_folder(ckpt)
    root = tmp_path / "m"
    save_as_folder(hosts["sdxl"], root)
    for sub in ("vae", "tokenizer_2"):
        (root / sub).rename(tmp_path / f"moved_{sub}")
    with pytest.raises(ModelLayoutError, match=r"missing vae/, tokenizer_2/") as err:
        load_diffusers_folder(root)
    assert str(root) in str(err.value)
    (tmp_path / "moved_vae").rename(root / "vae")
    (tmp_path / "moved_tokenizer_2").rename(root / "tokenizer_2")
    weights = root / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(root / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLayoutError, match="only pickle weights"):
        load_diffusers_folder(root)


def test_text_encoding_is_deterministic_unless_something_drops_out() -> None:
    from transformers import CLIPTextModel

    from pivotal.host_api import has_active_dropout

    host = build_demo_host("sdxl")
    assert host.text_encoding_is_deterministic()
    # HF CLIP drops attention out functionally: only its config says so
    cfg = demo_model.text_config("clip_l")
    cfg.attention_dropout = 0.1
    assert has_active_dropout([CLIPTextModel(cfg)])
    assert has_active_dropout([torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.2))])
    assert has_active_dropout([torch.nn.MultiheadAttention(8, 2, dropout=0.1)])
    assert not has_active_dropout([torch.nn.Sequential(torch.nn.Dropout(0.0)), torch.nn.MultiheadAttention(8, 2)])
    host._encoders["clip_g"].text_model.encoder.layers[0].mlp.add_module("drop", torch.nn.Dropout(0.1))
    try:
        assert not host.text_encoding_is_deterministic()
    finally:
        del host._encoders["clip_g"].text_model.encoder.layers[0].mlp.drop
