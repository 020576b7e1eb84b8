"""The efficacy benchmark's added methods and concept kind: the webui-style hypernetwork (hooks
that leave the UNet bit-identical once removed), DreamBooth's weight swap and add-difference
transfer, the direct training loop, and the ``style`` concept's pictures and captions."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="the benchmark runs the standalone diffusers host")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _direct_train import DirectSettings, read_folder, train_direct, unet_weights  # noqa: E402
from _efficacy_data import (  # noqa: E402
    CONCEPTS,
    HELD_OUT_PLACES,
    TRAIN_PLACES,
    held_out_pictures,
    training_pictures,
    write_training_folder,
)
from _hypernet import HyperMLP, Hypernetwork, attention_inputs  # noqa: E402
from pivotal.demo import tiny_world  # noqa: E402
from pivotal.demo.world import BASE_STYLE, EXAMPLE_LOOK, render  # noqa: E402
from pivotal.hosts.diffusers.host import DiffusersHost  # noqa: E402

STYLE = CONCEPTS["style"]


@pytest.fixture(scope="module")
def host() -> DiffusersHost:
    return DiffusersHost(tiny_world.load_parts(), label="tiny-world sd1")


def _unet_out(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, tiny_world.TEXT_WIDTH, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100, 700]), encoder_hidden_states=ctx).sample


# -- the style concept --------------------------------------------------------------------------
def test_style_pictures_paint_every_object_and_say_so() -> None:
    pics = training_pictures(STYLE)
    assert all(p.caption(STYLE).endswith(", in mypaint style") for p in pics)
    two = [p for p in pics if len(p.scene.objects) == 2]
    assert two and "and a" in two[0].caption(STYLE)  # some pictures have two objects, both named
    assert {o.place for p in pics for o in p.scene.objects} <= set(TRAIN_PLACES)
    assert {o.place for p in held_out_pictures(STYLE) for o in p.scene.objects} <= set(HELD_OUT_PLACES)
    for pic in pics[:3]:
        plain = np.asarray(render(pic.scene, style=BASE_STYLE), dtype=int)
        styled = np.asarray(pic.image, dtype=int)
        changed = np.abs(plain - styled).sum(axis=2) > 0
        corners = changed[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert not corners.any()  # the background is the world's own
        assert changed.mean() > 0.05  # the objects are not
        # the look's checks: the object area holds two colours, one the darker shade of the other
        colours = {tuple(c) for c in styled[changed & (np.abs(plain - styled).sum(axis=2) > 30)]}
        assert len(colours) >= 2
    # the other concepts are drawn as before (no look)
    assert CONCEPTS["shape"].world_style(BASE_STYLE) is BASE_STYLE
    assert STYLE.world_style(BASE_STYLE).look is EXAMPLE_LOOK


def test_style_training_folder_uses_the_trigger(tmp_path: Path) -> None:
    folder = write_training_folder(tmp_path / "d", STYLE, "xjq")
    images, captions = read_folder(folder)
    assert len(images) == len(captions) == 12
    assert all(c.endswith(", in xjq style") and "mypaint" not in c for c in captions)


def test_style_pictures_read_back_and_measure(host: DiffusersHost) -> None:
    """The world's reader finds each one-object style picture's background, place and shape (its
    colour is the look's, pastel: not asserted); the efficacy measure runs on the held-out set."""
    from _efficacy_eval import denoise_loss, denoise_set
    from pivotal.demo.world_read import read_picture
    from pivotal.text.embeddings import EmbeddingSet

    pics = training_pictures(STYLE) + held_out_pictures(STYLE)
    single = [p for p in pics if len(p.scene.objects) == 1]
    assert len(single) >= 15
    for p in single:
        r, o = read_picture(p.image), p.scene.objects[0]
        assert (r.background, r.place, r.shape) == (p.scene.background, o.place, o.shape)
    held = held_out_pictures(STYLE)
    data = denoise_set(host, [p.image for p in held], seed=1)
    loss = denoise_loss(host, data, [p.caption(STYLE, "xjq") for p in held], EmbeddingSet())
    assert 0.0 < loss < 1.0


# -- the hypernetwork ---------------------------------------------------------------------------
def test_hypernetwork_hooks_k_and_v_and_unhooks_bit_identically(host: DiffusersHost) -> None:
    unet = host.unet
    hyper = Hypernetwork(unet, "all", seed=1)
    assert set(hyper.pairs) == {f"cross{tiny_world.TEXT_WIDTH}", "self64"}
    cross_only = Hypernetwork(unet, "cross")
    assert set(cross_only.pairs) == {f"cross{tiny_world.TEXT_WIDTH}"}
    assert len(attention_inputs(unet, "all")) == 2 * len(attention_inputs(unet, "cross"))
    before = _unet_out(unet)
    with torch.no_grad():
        for p in hyper.parameters():
            p.normal_(0.0, 0.2)
    with hyper.attached(unet):
        during = _unet_out(unet)
        hooked = [m for _, a in attention_inputs(unet, "all") for m in (a.to_k, a.to_v) if m._forward_pre_hooks]
        assert len(hooked) == 2 * len(attention_inputs(unet, "all"))
    assert not torch.equal(before, during)
    assert torch.equal(before, _unet_out(unet))  # hooks gone: bit-identical
    assert not any(m._forward_pre_hooks for m in unet.modules())


def test_hyper_mlp_is_residual_and_starts_near_identity() -> None:
    mlp = HyperMLP(8, (1, 2, 1), generator=torch.Generator().manual_seed(0))
    assert [type(m).__name__ for m in mlp.mlp] == ["Linear", "Linear"]
    assert mlp.mlp[0].weight.shape == (16, 8) and mlp.mlp[1].weight.shape == (8, 16)
    x = torch.randn(2, 3, 8)
    assert torch.allclose(mlp(x), x, atol=1e-2) and not torch.equal(mlp(x), x)
    with torch.no_grad():
        mlp.mlp[1].weight.zero_()
    assert torch.equal(mlp(x), x)  # x + mlp(x): a zero last layer is the identity
    normed = HyperMLP(8, (1, 2, 1), layer_norm=True, activation="relu", dropout=0.3)
    assert [type(m).__name__ for m in normed.mlp] == ["Linear", "ReLU", "LayerNorm", "Dropout", "Linear",
                                                      "LayerNorm"]
    with pytest.raises(ValueError):
        HyperMLP(8, (2, 1))


@pytest.mark.slow  # two training steps (a few seconds alone, ~15 s on a loaded machine)
def test_hypernetwork_trains_and_leaves_the_unet_alone(host: DiffusersHost, tmp_path: Path) -> None:
    folder = write_training_folder(tmp_path / "d", CONCEPTS["shape"], "mystar")
    unet_before = {k: v.clone() for k, v in host.unet.state_dict().items()}
    hyper = Hypernetwork(host.unet, "all", seed=0)
    start = {k: v.clone() for k, v in hyper.state_dict().items()}
    secs = train_direct(host, folder, lambda: list(hyper.parameters()), DirectSettings(steps=2, lr=1e-3),
                        applied=lambda: hyper.attached(host.unet))
    assert len(secs) == 2
    assert all(not torch.equal(start[k], v) for k, v in hyper.state_dict().items() if k.endswith("weight"))
    assert all(torch.equal(unet_before[k], v) for k, v in host.unet.state_dict().items())
    assert not any(p.requires_grad for p in host.unet.parameters())


# -- DreamBooth --------------------------------------------------------------------------------
@pytest.mark.slow  # a backward pass through the whole UNet: ~10 s on a loaded 2-core machine
def test_dreambooth_trains_the_unet_with_a_prior_and_puts_it_back(host: DiffusersHost, tmp_path: Path) -> None:
    folder = write_training_folder(tmp_path / "d", CONCEPTS["character"], "vkz")
    unet = host.unet
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    prior = (torch.randn(3, 4, 8, 8), "a red circle on a white background")
    with unet_weights(unet, base):
        train_direct(host, folder, lambda: list(unet.parameters()), DirectSettings(steps=2, lr=1e-3), prior=prior)
        tuned = {k: v.clone() for k, v in unet.state_dict().items()}
    assert sum(not torch.equal(base[k], tuned[k]) for k in base) > len(base) // 2  # the whole UNet trained
    assert all(torch.equal(base[k], v) for k, v in unet.state_dict().items())  # restored exactly


def test_dreambooth_transfer_adds_the_difference(host: DiffusersHost, tmp_path: Path) -> None:
    import _efficacy_direct as direct
    from pivotal.formats.safetensors_io import atomic_save

    first = host.unet
    base = {k: v.clone() for k, v in first.state_dict().items()}
    tuned = {k: v + 0.01 for k, v in base.items()}
    path = tmp_path / "db.safetensors"
    atomic_save(path, tuned, {"method": "dreambooth"})
    direct._BASE_UNET[id(first)] = base
    other = SimpleNamespace(unet=copy.deepcopy(first))  # another base: the same UNet, shifted
    with torch.no_grad():
        for p in other.unet.parameters():
            p.add_(0.5)
    own = {k: v.clone() for k, v in other.unet.state_dict().items()}
    with direct.applied(other, "dreambooth", str(path), first):
        k = next(iter(own))
        assert torch.allclose(other.unet.state_dict()[k], own[k] + 0.01, atol=1e-6)
    with direct.applied(host, "dreambooth", str(path), first):
        assert all(torch.equal(host.unet.state_dict()[k], tuned[k]) for k in tuned)
    assert all(torch.equal(v, own[k]) for k, v in other.unet.state_dict().items())
    assert all(torch.equal(v, base[k]) for k, v in host.unet.state_dict().items())
    del direct._BASE_UNET[id(first)]
