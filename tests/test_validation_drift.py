"""Drift in validation (``validation_drift``), as bench/efficacy.py measures it: the loss on the
validation captions without the trigger, trained model against the base model (LoRA at strength
0, no embedding), at the same timesteps and noise, in %. On the tiny demo host: 0 exactly while
the LoRA is still zero, measured without touching training, and reported in the events, the
summary, the bundle metadata, the job snapshot and the loss chart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the standalone host needs diffusers (not part of the webui environment)")

from pivotal.formats.safetensors_io import read_header  # noqa: E402
from pivotal.training.validation import plain_caption, strength_zero  # noqa: E402
from test_validation import config, run  # noqa: E402

# The fixtures ``host`` (the demo sd1 host) and ``data_dir`` (4 demo images) are in conftest.py.


def drifts(events) -> list[tuple[int, float]]:
    return [(e.step, e.data["validation_drift"]) for e in events if e.kind == "validation"
            and "validation_drift" in e.data]


def test_plain_captions_lose_the_trigger_words_only() -> None:
    names = ["mychar", "Pvt-Star"]
    assert plain_caption("mychar, a red circle on a blue background", names) == "a red circle on a blue background"
    assert plain_caption("a photo of MyChar and pvt-star, top left", names) == "a photo of and, top left"
    assert plain_caption("a mychars and mychar-like star", names) == "a mychars and mychar-like star"
    assert plain_caption("red, mychar, blue", names) == "red, blue"


def test_strength_zero_is_the_base_model_and_is_undone(host) -> None:
    from pivotal.adapters.network import LoraNetwork

    net = LoraNetwork(host.lora_targets("unet", "attn"), rank=2, alpha=2.0)
    for m in net.modules_of():
        m.multiplier = 0.5
    with strength_zero(net):
        assert {m.multiplier for m in net.modules_of()} == {0.0}
    assert {m.multiplier for m in net.modules_of()} == {0.5}


def test_drift_is_zero_while_the_lora_is_zero(host, data_dir: Path, tmp_path: Path) -> None:
    # every LR 0: the LoRA's up weights stay zero, so the trained model is the base model exactly
    still = config(data_dir, tmp_path / "still", steps=2, validation_count=1, validation_every=1, unet_lr=0.0,
                   embedding_lr=0.0, embedding_norm_pull=0.0, validation_drift=True)
    _, events = run(still, host)
    assert drifts(events) == [(1, 0.0), (2, 0.0)]


@pytest.mark.slow
def test_drift_of_a_learned_lora_in_summary_and_bundle_training_untouched(host, data_dir: Path,
                                                                          tmp_path: Path) -> None:
    # learning moves it; the last number is in the summary and the bundle, and training is untouched
    torch.manual_seed(3)
    learned, events = run(config(data_dir, tmp_path / "on", steps=3, validation_count=1, unet_lr=3e-2,
                                 validation_drift=True), host)
    torch.manual_seed(3)
    plain, _ = run(config(data_dir, tmp_path / "off", steps=3, validation_count=1, unet_lr=3e-2), host)
    assert learned.losses == plain.losses and plain.validation_drift is None
    measured = drifts(events)
    assert [s for s, _ in measured] == [1, 2, 3] and measured[-1][1] != 0.0
    assert learned.summary()["validation_drift"] == measured[-1][1] == learned.validation_drift
    assert "drift" in next(e.message for e in events if e.kind == "validation")
    meta = read_header(learned.bundle_path).metadata
    assert float(meta["pivotal.validation_drift"]) == measured[-1][1]
    assert "pivotal.validation_drift" not in read_header(plain.bundle_path).metadata


def test_the_job_and_the_chart_show_drift() -> None:
    from pivotal.training.job import TrainingJob
    from pivotal.training.progress import ProgressEvent
    from pivotal.ui.loss_chart import (
        DRIFT_COLOUR,
        HEIGHT,
        MARGIN_B,
        MARGIN_L,
        MARGIN_R,
        MARGIN_T,
        WIDTH,
        render_loss_chart,
    )
    from pivotal.ui.progress_view import progress_html

    job = TrainingJob()
    run_state = __import__("pivotal.training.job_state", fromlist=["RunState"]).RunState(run_id=1)
    job._run = run_state
    job._on_event(run_state, ProgressEvent("validation", step=2, data={"validation_loss": 0.5,
                                                                       "validation_drift": 1.25}))
    snap = job.status()
    assert snap["validation_drift"] == 1.25 and snap["validation_drifts"] == [[2, 1.25]]
    assert "drift +1.25%" in progress_html(snap)

    def plot_colours(img) -> set:
        return {c for _, c in img.crop((MARGIN_L, MARGIN_T, WIDTH - MARGIN_R, HEIGHT - MARGIN_B)).getcolors(1 << 16)}

    losses = [1.0 / (i + 1) for i in range(10)]
    assert DRIFT_COLOUR not in plot_colours(render_loss_chart(losses, losses, 10, validation=[(5, 0.4)]))
    assert DRIFT_COLOUR in plot_colours(render_loss_chart(losses, losses, 10, drift=[(5, 1.0), (10, 3.0)]))
