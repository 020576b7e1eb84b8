"""Held-out validation loss on the tiny demo host: held-back images never train, the number is a
pure function of the weights, training is untouched by it (also across a resume), and it is
reported in the events, the summary and the bundle metadata; bad settings are refused by name."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from pivotal.demo.data import make_demo_dataset  # noqa: E402
from pivotal.errors import ConfigError, DatasetError  # noqa: E402
from pivotal.formats.safetensors_io import read_header  # noqa: E402
from pivotal.training.batches import BatchSource  # noqa: E402
from pivotal.training.config import EmbeddingSpec, TrainConfig  # noqa: E402
from pivotal.training.progress import ProgressEvent  # noqa: E402
from pivotal.training.trainer import train  # noqa: E402
from pivotal.training.validation import fixed_timesteps  # noqa: E402

# The fixtures ``host`` (the demo sd1 host) and ``data_dir`` (4 demo images) are in conftest.py.


def config(data_dir: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data_dir=str(data_dir), out_dir=str(out), output_name="v", steps=4, resolution=64,
                bucket_step=16, embeddings=[EmbeddingSpec("mychar", 2, "person")], unet_lr=1e-3,
                embedding_lr=1e-2, save_precision="fp32", seed=7, validation_timesteps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def val_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two more demo pictures (another seed), as a validation folder."""
    folder = tmp_path_factory.mktemp("demo_val")
    make_demo_dataset(folder, ["mychar"], count=2, size=64, seed=5)
    return folder


def run(cfg: TrainConfig, host, **kw):
    events: list[ProgressEvent] = []
    result = train(cfg, host, events.append, **kw)
    return result, events


def validation_events(events: list[ProgressEvent]) -> list[tuple[int, float]]:
    return [(e.step, e.data["validation_loss"]) for e in events if e.kind == "validation"]


def test_fixed_timesteps_spread_over_the_schedule() -> None:
    assert fixed_timesteps(4, 1000).tolist() == [125, 375, 625, 875]
    assert fixed_timesteps(1, 1000).tolist() == [500]


def test_held_back_images_are_never_in_a_training_batch(host, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, tmp_path, validation_count=1, batch_size=2).validate()
    source = BatchSource(cfg, host)
    held = {item.name for item in source.validation_items}
    assert len(held) == 1
    assert len(source.dataset.items) == 3 and held.isdisjoint(i.name for i in source.dataset.items)
    seen = {item.name for i in range(40) for item in source.dataset.batch_at(i).items}
    assert seen and held.isdisjoint(seen)
    # the seed alone chooses them: the same seed holds back the same image
    assert {i.name for i in BatchSource(cfg, host).validation_items} == held


def test_same_weights_give_the_same_validation_loss(host, data_dir: Path, tmp_path: Path) -> None:
    # nothing learns (every LR 0): every evaluation sees the same weights and must agree to the bit
    cfg = config(data_dir, tmp_path, steps=2, validation_count=1, validation_every=1, unet_lr=0.0, embedding_lr=0.0,
                 embedding_norm_pull=0.0)
    result, events = run(cfg, host)
    vals = validation_events(events)
    assert [s for s, _ in vals] == [1, 2]
    assert len({v for _, v in vals}) == 1, vals
    assert result.validation_losses == vals


def test_validation_leaves_training_exactly_as_without_it(host, data_dir: Path, val_dir: Path,
                                                          tmp_path: Path) -> None:
    # LoRA dropout draws from the global generator (which the trainer does not seed: the test does):
    # an evaluation must not move it either
    torch.manual_seed(123)
    off, _ = run(config(data_dir, tmp_path / "off", steps=3, lora_dropout=0.1), host)
    torch.manual_seed(123)
    on, events = run(config(data_dir, tmp_path / "on", steps=3, lora_dropout=0.1, validation_dir=str(val_dir),
                            validation_every=1), host)
    assert len(validation_events(events)) == 3
    assert on.losses == off.losses
    assert off.validation_loss is None and on.validation_loss is not None


@pytest.mark.slow
def test_resume_with_validation_equals_the_uninterrupted_run(host, data_dir: Path, val_dir: Path,
                                                             tmp_path: Path) -> None:
    kw = dict(validation_dir=str(val_dir), validation_every=2)
    full, full_events = run(config(data_dir, tmp_path / "full", **kw), host)
    stop = threading.Event()

    def stop_after_3(e: ProgressEvent) -> None:
        if e.kind == "step" and e.step == 3:
            stop.set()

    part = train(config(data_dir, tmp_path / "part", **kw), host, stop_after_3, stop)
    assert part.status == "interrupted" and part.validation_losses[-1][0] == 3  # measured for the save
    assert float(read_header(part.bundle_path).metadata["pivotal.validation_loss"]) == part.validation_loss
    events: list[ProgressEvent] = []
    rest = train(config(data_dir, tmp_path / "part", **kw), host, events.append,
                 resume=str(tmp_path / "part" / "v-step000003.resume.safetensors"))
    assert rest.losses == full.losses
    assert part.validation_losses[0] == full.validation_losses[0]
    # the resumed run keeps the earlier points (its history goes on) and adds its own
    assert rest.validation_losses == [*part.validation_losses, (4, full.validation_losses[1][1])]
    start = next(e for e in events if e.kind == "start")
    assert start.data["history"]["validation_losses"] == [list(v) for v in part.validation_losses]
    assert start.data["history"]["losses"] == part.losses


def test_validation_loss_in_events_summary_and_bundle(host, data_dir: Path, tmp_path: Path) -> None:
    cfg = config(data_dir, tmp_path, validation_count=1, steps=3, save_every=2)  # every: auto, 3 // 10 -> 1
    result, events = run(cfg, host)
    vals = validation_events(events)
    assert [s for s, _ in vals] == [1, 2, 3]
    assert all(v > 0 for _, v in vals)
    assert result.summary()["validation_loss"] == vals[-1][1]
    assert events[-1].kind == "done" and events[-1].data["validation_loss"] == vals[-1][1]
    preflight = next(e for e in events if e.kind == "preflight")
    assert len(preflight.data["validation_images"]) == 1 and "validation: 1 image(s) held back" in preflight.message
    meta = read_header(result.bundle_path).metadata
    assert float(meta["pivotal.validation_loss"]) == vals[-1][1] and meta["pivotal.validation_step"] == "3"
    assert meta["ss_num_train_images"] == "3"
    step_meta = read_header(tmp_path / "v-step000002.safetensors").metadata
    assert float(step_meta["pivotal.validation_loss"]) == vals[1][1]


def test_end_only_and_no_validation_set(host, data_dir: Path, tmp_path: Path) -> None:
    _, events = run(config(data_dir, tmp_path / "end", steps=2, validation_count=1, validation_every=0), host)
    assert [s for s, _ in validation_events(events)] == [2]
    result, events = run(config(data_dir, tmp_path / "none", steps=1, validation_every=1), host)
    assert validation_events(events) == [] and result.summary()["validation_loss"] is None
    assert "pivotal.validation_loss" not in read_header(result.bundle_path).metadata


@pytest.mark.parametrize("kw, match", [
    ({"validation_dir": "elsewhere", "validation_count": 1}, r"validation_dir and validation_count: both are set"),
    ({"validation_every": -2}, r"validation_every: must be -1 or more"),
    ({"validation_timesteps": 0}, r"validation_timesteps: must be greater than 0"),
    ({"validation_count": -1}, r"validation_count: must be 0 or more"),
])
def test_bad_validation_settings_are_refused_by_name(data_dir: Path, tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config(data_dir, tmp_path, **kw).validate()


def test_validation_sets_that_cannot_work_are_refused_before_training(host, data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"validation_count: 4 would hold back every one of the 4 usable"):
        train(config(data_dir, tmp_path, validation_count=4), host)
    with pytest.raises(DatasetError, match=r"validation_dir: "):
        train(config(data_dir, tmp_path, validation_dir=str(tmp_path / "missing")), host)
    assert not list(tmp_path.glob("*.safetensors"))
    assert torch.is_grad_enabled()


def test_loss_chart_draws_the_validation_series() -> None:
    from pivotal.ui.loss_chart import (
        HEIGHT,
        MARGIN_B,
        MARGIN_L,
        MARGIN_R,
        MARGIN_T,
        VALIDATION_COLOUR,
        WIDTH,
        render_loss_chart,
    )

    def plot_colours(img) -> set:  # the plot area only, not the legend above it
        return {c for _, c in img.crop((MARGIN_L, MARGIN_T, WIDTH - MARGIN_R, HEIGHT - MARGIN_B)).getcolors(1 << 16)}

    losses = [1.0 / (i + 1) for i in range(20)]
    plain = render_loss_chart(losses, losses, 20)
    with_val = render_loss_chart(losses, losses, 20, validation=[(5, 0.6), (10, 0.4), (20, 0.3)])
    assert VALIDATION_COLOUR not in plot_colours(plain)
    assert VALIDATION_COLOUR in plot_colours(with_val)
