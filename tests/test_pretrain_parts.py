"""Pieces of the tiny-world pre-training: data, schedules, noise, VAE helpers, the checks' scoring."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pivotal.demo.pretrain.data import render_world_set
from pivotal.demo.pretrain.diffusion import (
    DiffusionSettings,
    _groups,
    draw_timesteps,
    layout_noise,
    min_snr_weights,
    noisy_latents,
)
from pivotal.demo.pretrain.vae import colour_guide, lr_at, random_crops, salience
from pivotal.demo.world import BASE_STYLE, FULL_WORLD, SHIFTED_STYLE, world_item


def test_world_set_renders_the_world_items() -> None:
    data = render_world_set(5, 12, FULL_WORLD, ((BASE_STYLE, 0.5), (SHIFTED_STYLE, 0.5)))
    assert data.images.shape == (12, 3, 64, 64) and data.images.dtype == torch.uint8
    styles = []
    for i in range(12):
        base = world_item(5, i, FULL_WORLD)
        assert data.captions[i] == base.caption
        drawn = torch.from_numpy(np.array(base.image)).permute(2, 0, 1)
        styles.append(torch.equal(data.images[i], drawn))
    assert 3 <= sum(styles) <= 9  # both styles are used, interleaved
    px = data.pixels(torch.tensor([0, 1]))
    assert px.shape == (2, 3, 64, 64) and px.min() >= -1 and px.max() <= 1
    assert data.digest() == render_world_set(5, 12, FULL_WORLD, ((BASE_STYLE, 0.5), (SHIFTED_STYLE, 0.5))).digest()


def test_lr_schedule() -> None:
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0, 10) == pytest.approx(0.1, abs=1e-3)
    values = [lr_at(s, 100, 1.0, 10) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_layout_noise_is_unit_variance_and_spatially_correlated() -> None:
    gen = torch.Generator().manual_seed(0)
    white = layout_noise(torch.Size((512, 4, 8, 8)), (), gen)
    coarse = layout_noise(torch.Size((512, 4, 8, 8)), (0.2, 0.5, 0.5), gen)
    for n in (white, coarse):
        assert abs(float(n.std()) - 1.0) < 0.05 and abs(float(n.mean())) < 0.02

    def neighbour_correlation(n: torch.Tensor) -> float:
        return float(torch.corrcoef(torch.stack([n[..., :-1].flatten(), n[..., 1:].flatten()]))[0, 1])

    assert abs(neighbour_correlation(white)) < 0.03 and neighbour_correlation(coarse) > 0.2
    # the per-picture, per-channel mean (a flat colour) varies far more than under white noise
    assert float(coarse.mean(dim=(2, 3)).std()) > 2 * float(white.mean(dim=(2, 3)).std())


def test_noising_and_min_snr_weights() -> None:
    acp = torch.linspace(0.99, 0.01, 1000)
    x, noise = torch.ones(2, 4, 8, 8), torch.zeros(2, 4, 8, 8)
    out = noisy_latents(x, noise, torch.tensor([0, 999]), acp)
    assert torch.allclose(out[0], torch.full_like(out[0], math.sqrt(0.99)))
    w = min_snr_weights(torch.tensor([0, 999]), acp, 5.0)
    snr0 = 0.99 / 0.01
    assert w[0] == pytest.approx(5.0 / snr0) and w[1] == pytest.approx(1.0)


def test_timesteps_lean_toward_noise_with_a_power() -> None:
    gen = torch.Generator().manual_seed(0)
    uniform = draw_timesteps(20000, 1000, 1.0, gen)
    assert torch.equal(uniform, torch.randint(0, 1000, (20000,), generator=torch.Generator().manual_seed(0)))
    leaning = draw_timesteps(20000, 1000, 2.0, gen)
    assert int(leaning.min()) >= 0 and int(leaning.max()) <= 999
    # density ~ t: mean 2/3 of the range, and the top half drawn 3x as often as the bottom half
    assert abs(float(leaning.float().mean()) - 666) < 10
    assert 2.7 < float((leaning >= 500).sum()) / float((leaning < 500).sum()) < 3.3


def test_cross_attention_gets_its_own_learning_rate() -> None:
    pytest.importorskip("diffusers", reason="tiny-world modules are diffusers modules (not in the webui env)")
    from pivotal.demo import tiny_world

    unet, _vae, te = tiny_world.build_modules(0, 7)
    everything = {id(p) for m in (unet, te) for p in m.parameters()}
    cross = {id(p) for n, p in unet.named_parameters() if ".attn2." in n}
    v1 = _groups(unet, te, DiffusionSettings())
    assert len(v1) == 2 and [g["lr_scale"] for g in v1] == [1.0, 1.0]  # v1's groups, in v1's order
    groups = _groups(unet, te, DiffusionSettings(cross_attention_lr_scale=4.0))
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) == everything
    assert {id(p) for p in groups[2]["params"]} == cross and groups[2]["lr_scale"] == 4.0
    assert groups[1]["params"] == [te.get_input_embeddings().weight] and groups[1]["weight_decay"] == 0.0


def test_vae_helpers() -> None:
    px = torch.full((1, 3, 16, 16), -1.0)
    px[:, 0, :8, :8] = 1.0  # a red-ish square in the top-left cell
    guide = colour_guide(px)
    assert guide.shape == (1, 4, 2, 2)
    assert guide[0, 0, 0, 0] == 1.0 and guide[0, 0, 1, 1] == -1.0
    assert torch.allclose(guide[0, 3], torch.zeros(2, 2), atol=1e-6)
    weight = salience(px, 5.0)
    assert weight[0, 0, 0, 0] == 5.0 and weight[0, 0, 15, 15] == 1.0
    gen = torch.Generator().manual_seed(0)
    big = torch.arange(2 * 64 * 64, dtype=torch.float32).reshape(2, 1, 64, 64)
    crops = random_crops(big, 32, gen)
    assert crops.shape == (2, 1, 32, 32)
    for c, b in zip(crops, big):
        y, x = divmod(int(c[0, 0, 0] - b[0, 0, 0]), 64)
        assert y % 8 == 0 and x % 8 == 0 and torch.equal(c, b[:, y:y + 32, x:x + 32])
