"""The textcraftor mode (reward fine-tuning of a text-encoder LoRA through the sampling chain) on
the pre-trained tiny-world model: the gradient's path, the interpolation of ``te=`` weights,
learning, the run guarantees (restore, interrupt, resume) and the reward settings' errors."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from pivotal.adapters.network import LoraNetwork
from pivotal.errors import ConfigError
from pivotal.host_api import weights_fingerprint
from pivotal.training.config import TrainConfig
from pivotal.training.reward_chain import sample_latents
from pivotal.training.rewards import build_rewards, register_reward, unregister_reward
from pivotal.training.textcraftor import RewardStepRunner

pytest.importorskip("diffusers", reason="the standalone host needs diffusers")

PROMPTS = ["a red circle on a blue background, top left", "a yellow square on a green background, bottom right"]


def tiny_settings(out: Path, **over) -> TrainConfig:
    from pivotal.demo.reward import register

    register()
    values = dict(mode="textcraftor", out_dir=str(out), output_name="tc", resolution=64, bucket_step=16,
                  reward=["tiny_world"], reward_prompts=PROMPTS, te_lr=1e-3, textcraftor_sample_steps=4,
                  textcraftor_grad_steps=2, textcraftor_guidance=4.0, steps=3, batch_size=2, save_precision="fp32")
    values.update(over)
    return TrainConfig(**values).validate()


def te_network(host, seed: int = 0) -> LoraNetwork:
    """A TE LoRA whose up weights are non-zero (a fresh one's are 0, so its down weights get no grad)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LoraNetwork(host.lora_targets("te", "attn-mlp"), 4, 4.0)
        for m in net.modules_of():
            for name, p in m.named_parameters():
                if "up" in name:
                    torch.nn.init.normal_(p, std=0.02)
    return net


class Redness:
    """A real (if simple) reward: the mean red channel minus the mean of the others."""

    name = "redness"

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        return images[:, 0].mean(dim=(1, 2)) - images[:, 1:].mean(dim=(1, 2, 3))


def test_reward_gradient_reaches_the_te_lora_through_the_chain(host, tmp_path: Path) -> None:
    cfg = tiny_settings(tmp_path)
    runner = RewardStepRunner(cfg, host, PROMPTS, [(Redness(), 1.0)], torch.Generator().manual_seed(0))
    net = te_network(host)
    with host.training_session(False), net.attached():
        prompts, noise = runner.draw(2)
        pictures = runner.images(prompts, noise)
        Redness()(pictures, prompts).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(p.grad is None for p in host.unet.parameters())  # the host's own weights stay frozen


def test_only_the_last_k_steps_carry_grad(host) -> None:
    net = te_network(host)
    calls: list[tuple[bool, bool]] = []  # (grad enabled, input needs grad) per model call
    from pivotal.text.embeddings import EmbeddingSet

    with host.training_session(False), net.attached():
        cond = host.encode_prompts(PROMPTS[:1], EmbeddingSet())

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            calls.append((torch.is_grad_enabled(), x.requires_grad))
            return host.predict(x, t, cond)

        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        out = sample_latents(model_fn, noise, host.alphas_cumprod(), 6, 2, "epsilon")
    # four steps without grad, then two with it; the first of those starts from a detached input
    assert calls == [(False, False)] * 4 + [(True, False), (True, True)]
    assert out.requires_grad
    # the latents of K=2 equal those of K=0 (the grad never changes the values)
    with host.training_session(False), net.attached(), torch.no_grad():
        again = sample_latents(lambda x, t: host.predict(x, t, cond), noise, host.alphas_cumprod(), 6, 0, "epsilon")
    assert torch.equal(out.detach(), again)


def _merged_context(host, tensors: dict[str, torch.Tensor], weight: float, prompt: str) -> torch.Tensor:
    """The conditioning with the bundle's TE LoRA merged into the encoder's weights at ``weight``,
    by kohya's documented rule W + w * (alpha / rank) * up @ down (the oracle), then restored."""
    from pivotal.text.embeddings import EmbeddingSet

    modules = dict(host.lora_targets("te", "attn-mlp-conv"))
    saved = {}
    try:
        for key, module in modules.items():
            down = tensors.get(f"{key}.lora_down.weight")
            if down is None:
                continue
            up = tensors[f"{key}.lora_up.weight"].float()
            alpha = float(tensors[f"{key}.alpha"])
            saved[key] = module.weight.detach().clone()
            with torch.no_grad():
                module.weight += weight * (alpha / down.shape[0]) * (up @ down.float())
        with torch.no_grad():
            return host.encode_prompts([prompt], EmbeddingSet()).context
    finally:
        with torch.no_grad():
            for key, w in saved.items():
                modules[key].weight.copy_(w)


def test_te_weights_interpolate_from_the_base_to_the_trained_encoder(host, tmp_path: Path) -> None:
    from pivotal.formats.safetensors_io import read_file
    from pivotal.inference.generate import generate_image
    from pivotal.text.embeddings import EmbeddingSet

    before = weights_fingerprint([host.unet, host.vae, host._encoders["clip_l"]])
    result = train(tiny_settings(tmp_path / "out", steps=2), host)
    assert result.status == "completed"
    assert weights_fingerprint([host.unet, host.vae, host._encoders["clip_l"]]) == before  # host restored
    _header, tensors = read_file(result.bundle_path)
    assert any(k.startswith("lora_te_") for k in tensors) and not any(k.startswith("lora_unet_") for k in tensors)
    prompt = PROMPTS[0]
    base_image, _ = generate_image(host, prompt, "", [tmp_path / "out"], 6, 3, 64, 64, 4.0)
    zero_image, _ = generate_image(host, f"{prompt} <lora:tc:te=0>", "", [tmp_path / "out"], 6, 3, 64, 64, 4.0)
    one_image, _ = generate_image(host, f"{prompt} <lora:tc:te=1>", "", [tmp_path / "out"], 6, 3, 64, 64, 4.0)
    assert np.array_equal(np.asarray(zero_image), np.asarray(base_image))  # te=0: exactly the base model
    assert not np.array_equal(np.asarray(one_image), np.asarray(base_image))
    # te=w is the encoder with w x the trained change merged in (w = 0, 0.5, 1)
    from pivotal.inference.bundle_load import load_bundle_for_model

    targets = host.lora_targets("te", "attn-mlp-conv") + host.lora_targets("unet", "attn-mlp-conv")
    net = load_bundle_for_model(Path(result.bundle_path), "sd1", targets, {"clip_l": 64}).network
    for w in (0.0, 0.5, 1.0):
        net.set_multiplier("te", w)
        with net.attached(), torch.no_grad():
            got = host.encode_prompts([prompt], EmbeddingSet()).context
        assert torch.allclose(got, _merged_context(host, tensors, w, prompt), atol=1e-5), w


def train(cfg: TrainConfig, host, **kw):
    from pivotal.training.trainer import train as run

    return run(cfg, host, **kw)


def test_interrupt_saves_and_resume_continues_the_same_run(host, tmp_path: Path) -> None:
    from pivotal.formats.safetensors_io import read_file

    quick = dict(steps=3, batch_size=1, textcraftor_sample_steps=3)
    straight = train(tiny_settings(tmp_path / "a", **quick), host)
    stop = threading.Event()

    def on_event(e) -> None:
        if e.kind == "step" and e.step == 2:
            stop.set()

    cut = train(tiny_settings(tmp_path / "b", **quick), host, on_event=on_event, stop=stop)
    assert (cut.status, cut.steps_done) == ("interrupted", 2)
    resumed = train(tiny_settings(tmp_path / "b", **quick), host,
                    resume=str(tmp_path / "b" / "tc-step000002.resume.safetensors"))
    assert resumed.status == "completed"
    assert resumed.losses == straight.losses
    header, a = read_file(straight.bundle_path)
    _, b = read_file(resumed.bundle_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recorded = header.metadata["pivotal.training"]  # the bundle records the mode, the reward and K
    assert all(s in recorded for s in ('"mode":"textcraftor"', '"reward":["tiny_world"]', '"textcraftor_grad_steps":2'))


def test_combined_with_a_unet_lora_in_one_bundle(host, tmp_path: Path) -> None:
    from pivotal.formats.safetensors_io import read_file

    result = train(tiny_settings(tmp_path, steps=1, textcraftor_unet=True, unet_lr=1e-3), host)
    _, tensors = read_file(result.bundle_path)
    assert any(k.startswith("lora_te_") for k in tensors) and any(k.startswith("lora_unet_") for k in tensors)


@pytest.mark.slow
def test_a_short_run_raises_the_tiny_world_reward(host, tmp_path: Path) -> None:
    from pivotal.demo.reward import TinyWorldReward, load_scorer

    cfg = tiny_settings(tmp_path, steps=30, batch_size=4, textcraftor_sample_steps=8, textcraftor_grad_steps=3)
    reward = TinyWorldReward(load_scorer())

    def mean_reward() -> float:
        runner = RewardStepRunner(cfg, host, PROMPTS, [(reward, 1.0)], torch.Generator().manual_seed(123))
        with torch.no_grad():
            prompts, noise = runner.draw(16)
            return float(reward(runner.images(prompts, noise), prompts).mean())

    before = mean_reward()
    result = train(cfg, host)
    from pivotal.inference.bundle_load import load_bundle_for_model

    targets = host.lora_targets("te", "attn-mlp-conv")
    net = load_bundle_for_model(Path(result.bundle_path), "sd1", targets, {"clip_l": 64}).network
    with net.attached():
        after = mean_reward()
    assert after > before + 0.1, (before, after)


def test_bad_reward_settings_are_typed_errors_naming_the_setting(tmp_path: Path) -> None:
    cfg = tiny_settings(tmp_path, reward=["aesthetic"], reward_clip_model=str(tmp_path / "nope"),
                        reward_aesthetic_file=str(tmp_path / "head.safetensors"))
    with pytest.raises(ConfigError, match="reward_clip_model"):
        build_rewards(cfg, torch.device("cpu"))
    cfg.reward_aesthetic_file = ""
    with pytest.raises(ConfigError, match="reward_aesthetic_file"):
        build_rewards(cfg, torch.device("cpu"))
    cfg.reward = ["no_such_reward"]
    with pytest.raises(ConfigError, match="reward: unknown reward 'no_such_reward'"):
        build_rewards(cfg, torch.device("cpu"))
    with pytest.raises(ConfigError, match="reward: 'clip:x' is not NAME"):
        tiny_settings(tmp_path, reward=["clip:x"])
    with pytest.raises(ConfigError, match="reward_prompts: the tiny_world reward reads one-object"):
        build_rewards(tiny_settings(tmp_path, reward_prompts=["a cat"]), torch.device("cpu"))
    with pytest.raises(ConfigError, match="textcraftor_grad_steps: 5 is more than textcraftor_sample_steps"):
        tiny_settings(tmp_path, textcraftor_grad_steps=5)


def test_the_tiny_world_reward_reads_colours_in_words_the_model_never_saw() -> None:
    from pivotal.demo.reward import NEW_COLOUR_WORDS, demo_prompts, in_new_words, prompt_labels
    from pivotal.demo.world import COLOURS

    said = demo_prompts(16)
    new = demo_prompts(16, new_words=True)
    assert new == [in_new_words(p) for p in said]
    assert [prompt_labels(p) for p in new] == [prompt_labels(p) for p in said]
    for prompt in new:  # the object's colour is a new word; the background keeps the model's word
        colour, rest = prompt.split(" ", 2)[1], prompt.split(" on ", 1)[1]
        assert colour in NEW_COLOUR_WORDS and colour not in COLOURS and rest in {p.split(" on ", 1)[1] for p in said}
    assert in_new_words("an orange square on a red background, in the centre") == \
        "an amber square on a red background, in the centre"
    assert prompt_labels("a crimson circle on a navy background, top left") == \
        prompt_labels("a red circle on a blue background, top left")


def test_the_rules_reward_scores_what_the_reader_reads() -> None:
    """Renders of the prompt's scene score near 0; the same scene with the object's colour or place
    or the background wrong scores lower on that term; the gradient reaches the pixels."""
    from pivotal.demo.reward import TinyWorldRulesReward, register
    from pivotal.demo.world import Scene, SceneObject, render
    from pivotal.training.rewards import reward_names

    register()
    assert "tiny_world_rules" in reward_names()

    def picture(colour: str, place: str, background: str) -> torch.Tensor:
        img = render(Scene(background, (SceneObject("circle", colour, place),)), 64, 64)
        return torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255

    reward = TinyWorldRulesReward()
    prompt = "a red circle on a blue background, top left"
    pictures = torch.stack([picture("red", "top left", "blue"), picture("yellow", "top left", "blue"),
                            picture("red", "top right", "blue"), picture("red", "top left", "white")])
    terms = reward.terms(pictures, [prompt] * 4)
    assert all(float(t[0]) > -0.05 for t in terms.values()), terms
    assert float(terms["colour"][1]) < -0.3 and float(terms["place"][2]) < -0.3, terms
    assert float(terms["background"][3]) < -0.3, terms
    # a new word for the colour means the palette's colour
    same = reward.terms(pictures[:1], ["a crimson circle on a navy background, top left"])
    assert all(torch.allclose(same[k], terms[k][:1]) for k in terms)
    pictures.requires_grad_(True)
    reward(pictures, [prompt] * 4).sum().backward()
    assert pictures.grad is not None and float(pictures.grad.abs().sum()) > 0


def test_a_plugin_reward_registers_by_name(tmp_path: Path) -> None:
    register_reward("redness", lambda config, device: Redness())
    try:
        rewards = build_rewards(tiny_settings(tmp_path, reward=["redness:0.5"]), torch.device("cpu"))
        assert [(r.name, w) for r, w in rewards] == [("redness", 0.5)]
        with pytest.raises(ConfigError, match="already registered"):
            register_reward("redness", lambda config, device: Redness())
    finally:
        unregister_reward("redness")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny transformers CLIPModel saved as a local folder (config, model.safetensors, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    from pivotal.hosts.diffusers.clip_tokenizer import clip_tokenizer

    folder = tmp_path_factory.mktemp("clip")
    cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(cfg).save_pretrained(str(folder), safe_serialization=True)
    clip_tokenizer("clip_l").save_pretrained(str(folder))
    return folder


def test_clip_and_aesthetic_rewards_from_local_files(clip_folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # an improved-aesthetic-predictor-shaped head: linear layers at indices 0, 2 (a dropout between)
    gen = torch.Generator().manual_seed(0)
    head = {"layers.0.weight": torch.randn(8, 16, generator=gen), "layers.0.bias": torch.randn(8, generator=gen),
            "layers.2.weight": torch.randn(1, 8, generator=gen), "layers.2.bias": torch.randn(1, generator=gen)}
    save_file(head, str(tmp_path / "head.safetensors"))
    cfg = tiny_settings(tmp_path, reward=["clip", "aesthetic:0.5"], reward_clip_model=str(clip_folder),
                        reward_aesthetic_file=str(tmp_path / "head.safetensors"))
    (clip, w1), (aesthetic, w2) = build_rewards(cfg, torch.device("cpu"))
    assert (clip.name, w1, aesthetic.name, w2) == ("clip", 1.0, "aesthetic", 0.5)
    images = torch.rand(2, 3, 64, 64, generator=gen, requires_grad=True)
    scores = clip(images, PROMPTS)
    assert scores.shape == (2,) and bool((scores.abs() <= 1 + 1e-5).all())
    scores.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    # the aesthetic score is the head applied in index order to the normalised image embedding
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_folder))
    x = torch.nn.functional.interpolate(images.detach(), size=(32, 32), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).reshape(1, 3, 1, 1)
    with torch.no_grad():
        out = model.get_image_features(pixel_values=(x - mean) / std)
        emb = torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
        hidden = emb @ head["layers.0.weight"].T + head["layers.0.bias"]
        want = hidden @ head["layers.2.weight"].T + head["layers.2.bias"]
        assert torch.allclose(aesthetic(images.detach(), PROMPTS), want[:, 0], atol=1e-5)
    # a head for another CLIP width, and a pickle file, are refused naming the setting
    save_file({"weight": torch.zeros(1, 768), "bias": torch.zeros(1)}, str(tmp_path / "l14.safetensors"))
    cfg.reward_aesthetic_file = str(tmp_path / "l14.safetensors")
    with pytest.raises(ConfigError, match="reward_aesthetic_file: .*expected \\(N, 16\\)"):
        build_rewards(cfg, torch.device("cpu"))
    (tmp_path / "head.pth").write_bytes(b"not read")
    cfg.reward_aesthetic_file = str(tmp_path / "head.pth")
    with pytest.raises(ConfigError, match="reward_aesthetic_file: .*not a .safetensors file"):
        build_rewards(cfg, torch.device("cpu"))


def test_the_cli_demo_in_textcraftor_mode_needs_no_dataset(tmp_path: Path) -> None:
    from pivotal.cli.main import build_parser
    from pivotal.cli.train import build_config
    from pivotal.demo.reward import DEMO_PROMPT_COUNT, DEMO_TEXTCRAFTOR, demo_prompts

    args = build_parser().parse_args(["train", "--demo", "sd1", "--mode", "textcraftor", "--out", str(tmp_path),
                                      "--te-lr", "0.01", "--textcraftor-grad-steps", "2"])
    cfg = build_config(args)
    prompts = demo_prompts(DEMO_PROMPT_COUNT, new_words=True)  # the object's colour in words the model never saw
    assert (cfg.mode, cfg.reward, cfg.reward_prompts, cfg.embeddings) == ("textcraftor", ["tiny_world_rules"],
                                                                          prompts, [])
    assert (cfg.te_lr, cfg.textcraftor_grad_steps) == (0.01, 2)  # flags win over the demo's settings
    assert cfg.textcraftor_sample_steps == DEMO_TEXTCRAFTOR["textcraftor_sample_steps"]
    assert not (tmp_path / "demo_data").exists()


def test_checkpointing_the_k_steps_gives_the_same_gradient(host, tmp_path: Path) -> None:
    grads = []
    for checkpointed in (False, True):
        cfg = tiny_settings(tmp_path, gradient_checkpointing=checkpointed, textcraftor_sample_steps=3)
        runner = RewardStepRunner(cfg, host, PROMPTS, [(Redness(), 1.0)], torch.Generator().manual_seed(0))
        net = te_network(host)
        with host.training_session(False), net.attached():
            prompts, noise = runner.draw(1)
            Redness()(runner.images(prompts, noise), prompts).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
