"""Glue tests of the A1111 host adapter against fakes of the webui's objects (real behaviour is
proven against a real webui in tests/integration). The UNet is the real ldm UNet (tiny)."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from torch import nn

from pivotal.adapters.network import LoraNetwork
from pivotal.errors import ConfigError, ModelLayoutError
from pivotal.hosts.a1111 import session
from pivotal.hosts.a1111.host import A1111Host, detect_base, unwrapped_token_embedding
from pivotal.hosts.a1111.webui import Webui
from pivotal.text.embeddings import EmbeddingSet
from tiny_text import hf_text_model
from tiny_unets import ldm_unet, sample_inputs


# -- fakes of the webui's objects (behaviour written from host-internals.md, not the webui's code) ------
class FakeEmbedding:
    def __init__(self, vec: Any, name: str, step: Any = None) -> None:
        self.vec, self.name, self.step = vec, name, step
        self.shape, self.vectors, self.filename, self.shorthash = None, 0, None, None


class FakeDb:
    """Registration by name, keyed by the first token id; None unregisters."""

    def __init__(self) -> None:
        self.ids_lookup: dict[int, list] = {}
        self.word_embeddings: dict[str, Any] = {}
        self.skipped_embeddings: dict[str, Any] = {}
        self.expected_shape = 32

    def register_embedding_by_name(self, emb: Any, model: Any, name: str) -> None:
        ids = model.cond_stage_model.tokenize([name])[0]
        entries = [e for e in self.ids_lookup.get(ids[0], []) if e[1].name != name]
        if emb is None:
            self.word_embeddings.pop(name, None)
        else:
            entries.append((ids, emb))
            self.word_embeddings[name] = emb
        if entries:
            self.ids_lookup[ids[0]] = entries
        else:
            self.ids_lookup.pop(ids[0], None)


def _embeddings(hf_model: nn.Module) -> nn.Module:
    """``embeddings`` of an HF CLIP text model (transformers 4 nests it under text_model, 5 does not)."""
    return getattr(hf_model, "text_model", hf_model).embeddings


class Optimization:
    def __init__(self, name: str) -> None:
        self.name = name

    def title(self) -> str:
        return self.name


class FakeCond(nn.Module):
    """Stands in for FrozenCLIPEmbedderWithCustomWords: wrapped.transformer is an HF CLIP whose
    token embedding is wrapped; forward looks embeddings up in the db and splices their vec."""

    def __init__(self, db: FakeDb) -> None:
        super().__init__()
        self.wrapped = nn.Module()
        self.wrapped.transformer = hf_text_model("clip_l")
        emb = _embeddings(self.wrapped.transformer)
        wrapper = nn.Module()
        wrapper.wrapped = emb.token_embedding
        wrapper.forward = lambda ids: wrapper.wrapped(ids)  # type: ignore[method-assign]
        emb.token_embedding = wrapper
        self.wrapped.tokenizer = None
        self.db = db

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[sum(map(ord, t)) % 1000 + 1] for t in texts]

    def forward(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            vec = torch.zeros(77, 32)
            for name, e in self.db.word_embeddings.items():
                if name in t:
                    vec = torch.cat([vec[:1], e.vec, vec[1 + e.vec.shape[0]:]])
            rows.append(vec)
        return torch.stack(rows)


def fake_vae(seed: int = 0) -> nn.Module:
    """The webui's AutoencoderKL as far as the latent cache's model id reads it: ``encoder`` and
    ``quant_conv`` (tiny convolutions, seeded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = nn.Module()
        vae.encoder = nn.Conv2d(3, 8, 3, padding=1)
        vae.quant_conv = nn.Conv2d(8, 8, 1)
    return vae


def make_webui(optimizer: str = "InvokeAI") -> Webui:
    db = FakeDb()
    hijack = types.SimpleNamespace(embedding_db=db, fixes=None, comments=[], extra_generation_params={},
                                   optimization_method=optimizer, applied=[])
    optimizers = [Optimization(n) for n in ("sdp-no-mem", "sdp", "InvokeAI")]
    sd_hijack = types.SimpleNamespace(model_hijack=hijack, optimizers=optimizers,
                                      current_optimizer=next(o for o in optimizers if o.name == optimizer))

    def apply(title: str) -> None:
        hijack.applied.append(title)
        sd_hijack.current_optimizer = next((o for o in optimizers if o.title() == title), None)
        hijack.optimization_method = sd_hijack.current_optimizer.name if sd_hijack.current_optimizer else ""

    hijack.apply_optimizations = apply
    model = nn.Module()
    model.model = nn.Module()
    model.model.diffusion_model = ldm_unet("sd1")
    model.cond_stage_model = FakeCond(db)
    model.parameterization = "eps"
    model.alphas_cumprod_original = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    model.is_sd1 = True
    model.first_stage_model = fake_vae()
    model.scale_factor = 0.18215
    proc = types.SimpleNamespace(StableDiffusionProcessing=type("P", (), {"cached_c": [1, 2], "cached_uc": [3, 4]}))
    shared = types.SimpleNamespace(sd_model=model, state=types.SimpleNamespace())
    return Webui(shared=shared, devices=types.SimpleNamespace(dtype_vae=torch.float32), sd_hijack=sd_hijack,
                 processing=proc, textual_inversion=types.SimpleNamespace(Embedding=FakeEmbedding))


# -- tests ------------------------------------------------------------------------------------------
def test_unsupported_checkpoints_are_refused_by_name() -> None:
    for flag, word in (("is_sd2", "SD2"), ("is_ssd", "SSD-1B"), ("is_sdxl_inpaint", "inpainting")):
        with pytest.raises(ModelLayoutError, match=word):
            detect_base(types.SimpleNamespace(**{flag: True}))
    with pytest.raises(ModelLayoutError, match="diffusion_model"):
        detect_base(types.SimpleNamespace())
    with pytest.raises(ModelLayoutError, match="lowvram"):
        detect_base(types.SimpleNamespace(lowvram=True))


def test_protocol_basics_read_off_the_loaded_model() -> None:
    host = A1111Host(make_webui())
    assert (host.base_model, host.prediction_type, host.encoder_keys()) == ("sd1", "epsilon", ("clip_l",))
    ac = host.alphas_cumprod()
    assert ac.dtype == torch.float32 and ac.shape == (1000,)
    vocab = host.vocabulary("clip_l")
    plain = _embeddings(host.cond_model.wrapped.transformer).token_embedding.wrapped
    assert vocab.shape[1] == 32 and vocab.data_ptr() == plain.weight.data_ptr()
    with pytest.raises(ModelLayoutError):
        host.vocabulary("clip_g")
    assert host.text_encoding_is_deterministic()  # SD's CLIP has no dropout
    assert host.label == "webui model" and host.default_resolution() == 512


def test_model_id_names_the_loaded_vae() -> None:
    """The latent cache's key follows the VAE the webui has loaded (Settings › VAE swaps its
    weights in place), its dtype setting and scale factor, and nothing else (not the label)."""
    webui = make_webui()
    host = A1111Host(webui)
    first = host.model_id()
    assert first is not None and first.startswith("a1111-vae:") and A1111Host(make_webui()).model_id() == first
    host.sd_model.model.diffusion_model.time_embed[0].bias.data += 1  # the UNet is not the VAE
    assert host.model_id() == first
    host.sd_model.first_stage_model.load_state_dict(fake_vae(seed=1).state_dict())  # another VAE selected
    second = host.model_id()
    assert second != first
    webui.devices.dtype_vae = torch.float16  # --no-half-vae off: latents come from an fp16 VAE
    assert host.model_id() not in (first, second)
    host.sd_model.scale_factor = 0.13025
    webui.devices.dtype_vae = torch.float32
    assert host.model_id() not in (first, second)
    del host.sd_model.first_stage_model  # no LDM-style VAE: the host says it cannot tell
    assert host.model_id() is None


class LdmDecoderVae(nn.Module):
    """The decoding half of the webui's AutoencoderKL: ``post_quant_conv`` then ldm's real
    ``Decoder`` (tiny); ``decode`` as ldm's, which the model's ``decode_first_stage`` wraps in
    ``no_grad``."""

    def __init__(self) -> None:
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder

        torch.manual_seed(0)
        self.post_quant_conv = nn.Conv2d(4, 4, 1)
        self.decoder = Decoder(ch=32, out_ch=3, ch_mult=(1, 1), num_res_blocks=1, attn_resolutions=(), in_channels=3,
                               resolution=16, z_channels=4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def test_latents_decode_differentiably_through_the_webuis_vae() -> None:
    """The textcraftor mode backpropagates through the decoder: the host calls the VAE's own
    ``decode`` on latents / scale factor (the model's ``decode_first_stage`` is no_grad), and the
    VAE's weights stay untouched; on reForge its VAE patcher's module, the same way."""
    pytest.importorskip("ldm", reason="the real ldm Decoder comes from stable-diffusion-sdkit")
    webui = make_webui()
    vae = LdmDecoderVae()
    webui.sd_model.first_stage_model = vae
    host = A1111Host(webui)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    pictures = host.decode_latents(latents)
    with torch.no_grad():
        expected = vae.decode(latents / 0.18215)
    assert pictures.shape == (2, 3, 16, 16) and pictures.dtype == torch.float32
    assert torch.equal(pictures, expected)
    pictures.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    # reForge: decode_first_stage runs its VAE patcher under inference mode; the patcher's VAE module
    # decodes instead, after the model's latent format undoes the scale
    latent_format = types.SimpleNamespace(process_out=lambda x: x / 0.18215)
    unet = types.SimpleNamespace(model=types.SimpleNamespace(model_config=types.SimpleNamespace(
        latent_format=latent_format)))
    webui.sd_model.first_stage_model = None  # reForge's own stand-in: not what decodes
    webui.sd_model.forge_objects = types.SimpleNamespace(unet=unet, vae=types.SimpleNamespace(
        first_stage_model=vae, device=torch.device("cpu"), vae_dtype=torch.float32, patcher=object()))
    latents.grad = None
    pictures = host.decode_latents(latents)
    assert torch.equal(pictures, expected)
    pictures.square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    webui.sd_model.forge_objects = types.SimpleNamespace(unet=unet, vae=object())  # no VAE module: refused
    with pytest.raises(ConfigError, match="textcraftor"):
        host.decode_latents(latents)


def test_text_encoder_targets_found_behind_the_webui_wrapper_which_stays() -> None:
    host = A1111Host(make_webui())
    emb = _embeddings(host.cond_model.wrapped.transformer)
    wrapper = emb.token_embedding
    keys = [k for k, _ in host.lora_targets("te", "attn")]
    assert keys and keys[0].startswith("lora_te_text_model_encoder_layers_0_self_attn")
    assert emb.token_embedding is wrapper
    with pytest.raises(RuntimeError):
        with unwrapped_token_embedding(host.cond_model.wrapped.transformer):
            raise RuntimeError("boom")
    assert emb.token_embedding is wrapper


def test_clip_skip_leaves_the_unread_text_encoder_layers_without_lora() -> None:
    webui = make_webui()
    host = A1111Host(webui)
    layers = host.cond_model.wrapped.transformer.config.num_hidden_layers

    def layers_with_lora() -> set[int]:
        return {int(k.split("_layers_")[1].split("_")[0]) for k, _ in host.lora_targets("te", "attn")}

    assert host.clip_l_layers_used() == layers and layers_with_lora() == set(range(layers))
    key = host.text_encoding_key()
    webui.shared.opts = types.SimpleNamespace(CLIP_stop_at_last_layers=2)  # reads hidden_states[-2]
    assert host.clip_l_layers_used() == layers - 1 and layers_with_lora() == set(range(layers - 1))
    assert host.text_encoding_key() != key  # the trainer's conditioning cache sees the change


def test_live_embeddings_are_our_parameters_and_the_db_is_restored_exactly() -> None:
    webui = make_webui()
    host = A1111Host(webui)
    db = webui.embedding_db
    other = FakeEmbedding(torch.ones(1, 32), "folderemb")
    db.register_embedding_by_name(other, host.sd_model, "folderemb")
    before_words, before_lookup = dict(db.word_embeddings), {k: list(v) for k, v in db.ids_lookup.items()}
    lists = {k: v for k, v in db.ids_lookup.items()}
    embs = EmbeddingSet()
    embs.add("pvtchar", {"clip_l": torch.randn(2, 32)})
    cond = host.encode_prompts(["a pvtchar photo"], embs)
    cond.context.sum().backward()
    assert embs.vectors_for("clip_l")["pvtchar"].grad is not None  # the db held our Parameter itself
    assert db.word_embeddings == before_words and {k: list(v) for k, v in db.ids_lookup.items()} == before_lookup
    assert all(db.ids_lookup[k] is lst for k, lst in lists.items())


def test_attention_is_swapped_for_one_with_a_backward_and_put_back() -> None:
    webui = make_webui("InvokeAI")
    with session.backward_safe_attention(webui) as name:
        assert name == "sdp" and webui.sd_hijack.current_optimizer.name == "sdp"
    assert webui.sd_hijack.current_optimizer.name == "InvokeAI"
    assert webui.sd_hijack.model_hijack.optimization_method == "InvokeAI"
    webui = make_webui("sdp-no-mem")
    with session.backward_safe_attention(webui) as name:
        assert name == "sdp-no-mem"
    assert webui.sd_hijack.model_hijack.applied == []  # already safe: nothing switched


def test_session_freezes_checkpoints_and_restores_everything_even_on_error() -> None:
    webui = make_webui()
    host = A1111Host(webui)
    model, unet = host.sd_model, host.unet
    flags_before = session.module_flags(model)
    weights_before = session.weights_fingerprint(model)
    own_flags = [m for m in unet.modules() if getattr(m, "checkpoint", False) is True]
    with pytest.raises(RuntimeError, match="mid-step"):
        with host.training_session(gradient_checkpointing=True):
            assert not any(p.requires_grad for p in model.parameters())
            assert host.last_session["checkpointed"] > 0 and host.last_session["attention"] == "sdp"
            raise RuntimeError("mid-step")
    assert session.module_flags(model) == flags_before
    assert session.weights_fingerprint(model) == weights_before
    assert all(m.checkpoint is True for m in own_flags)
    assert webui.sd_hijack.current_optimizer.name == "InvokeAI"
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_unet_lora_and_embeddings_get_gradients_in_a_session(checkpointing: bool) -> None:
    host = A1111Host(make_webui())
    net = LoraNetwork(host.lora_targets("unet", "attn-mlp-conv"), rank=2, alpha=2.0)
    for m in net.modules_of():  # the up matrices start at zero; make the LoRA do something
        for name, p in m.named_parameters():
            nn.init.normal_(p, std=0.1) if "up" in name else None
    embs = EmbeddingSet()
    embs.add("pvtchar", {"clip_l": torch.randn(2, 32)})
    inputs = sample_inputs("sd1")
    grads = {}
    with host.training_session(gradient_checkpointing=checkpointing), net.attached():
        cond = host.encode_prompts(["pvtchar"] * inputs["x"].shape[0], embs)
        out = host.predict(inputs["x"], inputs["t"], cond)
        out.pow(2).mean().backward()
    first = next(net.modules_of())
    grads["lora"] = [p.grad for p in first.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads["lora"])
    assert embs.vectors_for("clip_l")["pvtchar"].grad.abs().sum() > 0
    assert not any(p.grad is not None for p in host.unet.parameters())


def test_class_images_are_keyed_by_the_cfg_they_are_drawn_at() -> None:
    """The Pivotal tab's preview CFG replaces the trainer's guidance in every picture the host draws,
    class images too: their cache key names that scale, so a run with another preview CFG does
    not reuse pictures drawn at the old one."""
    from pivotal.training.prior import CLASS_GUIDANCE, class_cache_key

    webui = make_webui()
    plain, five = A1111Host(webui), A1111Host(webui, preview_cfg=5.0)
    assert plain.generation_guidance(CLASS_GUIDANCE) == CLASS_GUIDANCE and five.generation_guidance(7.0) == 5.0
    key = class_cache_key(plain, "a photo of a person", 64, 64, 20)
    assert class_cache_key(five, "a photo of a person", 64, 64, 20) != key
    assert class_cache_key(A1111Host(webui, preview_cfg=CLASS_GUIDANCE), "a photo of a person", 64, 64, 20) == key
