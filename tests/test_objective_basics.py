"""Gradient clipping (max_grad_norm), the zero-terminal-SNR schedule, per-image loss weights and
the masked loss, as one training step on the demo host computes them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from diffusers import DDPMScheduler  # noqa: E402
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr  # noqa: E402

from pivotal.adapters.network import LoraNetwork  # noqa: E402
from pivotal.errors import ConfigError  # noqa: E402
from pivotal.formats.bundle import read_bundle  # noqa: E402
from pivotal.text.embeddings import EmbeddingSet  # noqa: E402
from pivotal.training.batches import BatchSource  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.losses import add_noise, min_snr_weights, training_target, zero_terminal_snr  # noqa: E402
from pivotal.training.step import StepRunner  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402


def config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), output_name="t", steps=2, resolution=64,
                bucket_step=16, embeddings=[EmbeddingSpec("mychar", 2, "person")], unet_lr=1e-3,
                embedding_lr=1e-2, save_precision="fp32", seed=7, batch_size=2)
    base.update(kw)
    return TrainConfig(**base).validate()


def runner_for(host, cfg: TrainConfig, lr: float = 0.0) -> tuple[StepRunner, LoraNetwork, torch.optim.Optimizer]:
    """A step runner on a UNet LoRA whose up-weights start non-zero (so every LoRA tensor has a
    gradient), with plain SGD: the update is exactly -lr x the gradient that reached the step."""
    torch.manual_seed(0)
    net = LoraNetwork(host.lora_targets("unet", "attn"), rank=2, alpha=2.0).to(host.device)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "up" in name:
                p.normal_(0, 0.5)
    runner = StepRunner(cfg, host, net, EmbeddingSet(), BatchSource(cfg, host), torch.Generator().manual_seed(0))
    return runner, net, torch.optim.SGD(net.parameters(), lr=lr)


def grad_norm(net: LoraNetwork) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters()
                                                      if p.grad is not None])))


# -- gradient clipping ---------------------------------------------------------------------------
def test_clipping_bounds_the_update_and_off_leaves_it(host, data_dir: Path, tmp_path: Path) -> None:
    limit = 1e-4
    # off: the gradient that reaches the optimizer is the raw one, far above the limit
    runner, net, opt = runner_for(host, config(data_dir, tmp_path, max_grad_norm=0.0))
    with host.training_session(False), net.attached():
        runner.run(0, opt)
    raw = grad_norm(net)
    assert runner.grad_norm is None and raw > 100 * limit
    # on: the same step, a huge learning rate, and the update is still at most lr x limit
    runner, net, opt = runner_for(host, config(data_dir, tmp_path, max_grad_norm=limit), lr=1e3)
    before = [p.detach().clone() for p in net.parameters()]
    with host.training_session(False), net.attached():
        runner.run(0, opt)
    applied = grad_norm(net)
    step = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(net.parameters(), before)))
    assert runner.grad_norm == pytest.approx(raw, rel=1e-4)    # reported: the norm before clipping
    assert applied <= limit * (1 + 1e-4) and applied == pytest.approx(limit, rel=1e-3)
    assert step <= 1e3 * limit * (1 + 1e-3)


def test_grad_norm_reaches_the_step_events(host, data_dir: Path, tmp_path: Path) -> None:
    events = []
    result = train(config(data_dir, tmp_path, max_grad_norm=0.5), host, events.append)
    norms = [e.data.get("grad_norm") for e in events if e.kind == "step"]
    assert len(norms) == 2 and all(isinstance(n, float) and n > 0 for n in norms)
    assert [e.to_json()["data"]["grad_norm"] for e in events if e.kind == "step"] == norms
    meta = read_bundle(result.bundle_path).metadata
    assert meta["ss_max_grad_norm"] == "0.5" and meta["ss_zero_terminal_snr"] == "False"


# -- zero terminal SNR ---------------------------------------------------------------------------
SD_SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def test_zero_terminal_snr_equals_diffusers() -> None:
    """diffusers' rescale_zero_terminal_snr (on the betas) is the oracle, and so is a DDPMScheduler
    built with rescale_betas_zero_snr=True."""
    betas = DDPMScheduler(**SD_SCHEDULE).betas.double()
    oracle = torch.cumprod(1.0 - rescale_zero_terminal_snr(betas), dim=0)
    ours = zero_terminal_snr(torch.cumprod(1.0 - betas, dim=0))
    torch.testing.assert_close(ours, oracle, rtol=1e-9, atol=1e-12)
    assert float(ours[-1]) == 0.0 and float(ours[0]) == pytest.approx(float(1 - betas[0]))
    scheduler = DDPMScheduler(**SD_SCHEDULE, rescale_betas_zero_snr=True)
    torch.testing.assert_close(zero_terminal_snr(DDPMScheduler(**SD_SCHEDULE).alphas_cumprod),
                               scheduler.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_the_training_step_uses_the_rescaled_schedule(host, data_dir: Path, tmp_path: Path) -> None:
    plain, _, _ = runner_for(host, config(data_dir, tmp_path, prediction_type="v_prediction"))
    rescaled, _, _ = runner_for(host, config(data_dir, tmp_path, prediction_type="v_prediction",
                                             zero_terminal_snr=True))
    torch.testing.assert_close(plain.alphas, host.alphas_cumprod().float())
    oracle = DDPMScheduler.from_config({**{k: v for k, v in host.scheduler_config.items() if not k.startswith("_")},
                                        "rescale_betas_zero_snr": True}).alphas_cumprod
    torch.testing.assert_close(rescaled.alphas.cpu(), oracle.float(), rtol=1e-5, atol=1e-7)
    assert float(rescaled.alphas[-1]) == 0.0 and float(plain.alphas[-1]) > 0


def test_the_terminal_step_gives_finite_weights_and_targets() -> None:
    alphas = zero_terminal_snr(DDPMScheduler(**SD_SCHEDULE).alphas_cumprod)
    t = torch.tensor([0, 500, 999])
    for prediction in ("v_prediction", "epsilon"):
        w = min_snr_weights(t, alphas, 5.0, prediction)
        assert torch.isfinite(w).all(), prediction
    assert float(min_snr_weights(t, alphas, 5.0, "v_prediction")[-1]) == 0.0
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    noisy = add_noise(x0, noise, t, alphas)
    torch.testing.assert_close(noisy[-1], noise[-1])   # SNR 0: nothing of the image is left
    torch.testing.assert_close(training_target("v_prediction", x0, noise, t, alphas)[-1], -x0[-1])


def test_zero_terminal_snr_refuses_epsilon_naming_both_settings(host, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zero_terminal_snr: needs prediction_type v_prediction.*set "
                                          "prediction_type to v_prediction or zero_terminal_snr to false"):
        config(data_dir, tmp_path, zero_terminal_snr=True, prediction_type="epsilon")
    assert host.prediction_type == "epsilon"   # "auto" means the model's own: refused before any work
    events = []
    with pytest.raises(ConfigError, match="zero_terminal_snr: needs v-prediction, but prediction_type 'auto' "
                                          "means 'epsilon'.*set prediction_type to v_prediction"):
        train(config(data_dir, tmp_path / "auto", zero_terminal_snr=True), host, events.append)
    assert events == []


def test_a_zero_terminal_snr_run_trains_and_says_so(host, data_dir: Path, tmp_path: Path) -> None:
    result = train(config(data_dir, tmp_path, zero_terminal_snr=True, prediction_type="v_prediction"), host)
    assert result.status == "completed" and all(math.isfinite(x) for x in result.losses)
    meta = read_bundle(result.bundle_path).metadata
    assert meta["ss_zero_terminal_snr"] == "True" and meta["ss_v_parameterization"] == "True"
    assert meta["pivotal.noise_schedule"] == "zero_terminal_snr"


# -- per-image weights and masks in the step -------------------------------------------------------
def _bars(folder: Path, count: int = 2) -> None:
    """``count`` 64 px pictures (random noise, so every latent pixel has a loss), captioned."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text("mychar", encoding="utf-8")


def _left_masks(folder: Path, count: int = 2, grey: int = 255) -> None:
    """Masks whose left 32 px (4 of 8 latent columns) are ``grey``, the rest black."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = np.zeros((64, 64), np.uint8)
        arr[:, :32] = grey
        Image.fromarray(arr, "L").save(folder / f"p{i}.png")


def _prediction_grad(host, cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[float, torch.Tensor]:
    """The step's loss and d loss / d prediction (B, C, h, w) of step 0."""
    runner, net, opt = runner_for(host, cfg)
    seen: list[torch.Tensor] = []
    original = host.predict

    def predict(noisy, t, cond):
        out = original(noisy, t, cond)
        out.retain_grad()
        seen.append(out)
        return out

    monkeypatch.setattr(host, "predict", predict)
    with host.training_session(False), net.attached():
        loss = runner.run(0, opt)
    monkeypatch.setattr(host, "predict", original)
    assert loss is not None and seen[0].grad is not None
    return loss, seen[0].grad


def test_masked_loss_ignores_the_area_outside_the_mask(host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data, masks = tmp_path / "data", tmp_path / "masks"
    _bars(data)
    _left_masks(masks)
    kw = dict(min_snr_gamma=0.0, batch_size=2)
    _, grad = _prediction_grad(host, config(data, tmp_path / "m", masked_loss=True, mask_dir=str(masks), **kw),
                               monkeypatch)
    assert float(grad[..., 4:].abs().max()) == 0.0            # right half: no gradient at all
    assert float(grad[..., :4].abs().min()) > 0.0             # left half: every pixel counts
    # a soft outside weight: the right half counts that much (per pixel, against the left)
    _, soft = _prediction_grad(host, config(data, tmp_path / "s", masked_loss=True, mask_dir=str(masks),
                                            unmasked_weight=0.25, **kw), monkeypatch)
    assert float(soft[..., 4:].abs().min()) > 0.0
    # switched off, the whole picture counts
    _, plain = _prediction_grad(host, config(data, tmp_path / "p", **kw), monkeypatch)
    assert float(plain[..., 4:].abs().min()) > 0.0


def test_loss_scale_multiplies_the_images_loss(host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    _bars(data)
    plain, _ = _prediction_grad(host, config(data, tmp_path / "a", batch_size=2), monkeypatch)
    (data / "loss_scale.txt").write_text("0.5", encoding="utf-8")
    half, _ = _prediction_grad(host, config(data, tmp_path / "b", batch_size=2), monkeypatch)
    assert half == pytest.approx(0.5 * plain, rel=1e-5)
    ignored, _ = _prediction_grad(host, config(data, tmp_path / "c", batch_size=2, folder_repeats=False), monkeypatch)
    assert ignored == pytest.approx(plain, rel=1e-6)


def test_a_masked_run_records_its_masks(host, tmp_path: Path) -> None:
    data, masks = tmp_path / "data", tmp_path / "masks"
    _bars(data)
    _left_masks(masks, count=1, grey=200)   # p1 has no mask: trained on the whole picture
    result = train(config(data, tmp_path / "o", masked_loss=True, mask_dir=str(masks)), host)
    assert result.status == "completed" and any("have no mask" in w for w in result.warnings)
    meta = read_bundle(result.bundle_path).metadata
    assert meta["ss_masked_loss"] == "True"
    assert '"masks":{"found":1,"missing":1,"source":"folder","unmasked_weight":0.0}' in meta["pivotal.dataset"]


def test_the_bundle_counts_repeated_images_as_kohya_does(host, tmp_path: Path) -> None:
    """ss_num_train_images is images per epoch: a ``3_name`` folder's pictures count three times
    (kohya: num_repeats x images per subset); ss_num_reg_images is 0 without class images."""
    data = tmp_path / "data"
    _bars(data / "3_mychar")
    _bars(data / "plain", count=1)
    result = train(config(data, tmp_path / "o"), host)
    meta = read_bundle(result.bundle_path).metadata
    assert meta["ss_num_train_images"] == "7" and meta["ss_num_reg_images"] == "0"
    assert '"repeats":{"3_mychar":3}' in meta["pivotal.dataset"]
