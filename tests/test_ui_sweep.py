"""The Train tab's Sweep section (the app and the webui tab share it): values checked as the CLI
checks them (the error names the setting), the sweep follows in the tab's progress block with one
bar for the queue and a table of its runs (ranked by validation loss at the end), and the sweep
grid renders variants x parts. The job's trainer is a small fake that writes a real bundle for
the tiny host of test_generate (the real sweep is in tests/test_sweep.py)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

import pytest

gr = pytest.importorskip("gradio")
pytest.importorskip("torch")

from pivotal.errors import ConfigError  # noqa: E402
from pivotal.training.config import TrainConfig  # noqa: E402
from pivotal.training.job import TrainingJob  # noqa: E402
from pivotal.training.progress import ProgressEvent, TrainResult  # noqa: E402
from pivotal.ui.queue_view import ranked_rows  # noqa: E402
from pivotal.ui.sweep_section import grid_numbers, sweepable_settings, varies_from_form  # noqa: E402
from pivotal.ui.train_tab import build_train_tab  # noqa: E402
from test_generate import FakeHost, write_test_bundle  # noqa: E402
from test_ui_build import base_config, form_values  # noqa: E402


class BundleTrainer:
    """Steps, then writes a real bundle for ``host``; the validation loss grows with te_lr (so the
    ranked table is the reverse of the runs' name order)."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host
        self.names: list[str] = []

    def __call__(self, cfg: TrainConfig, host: Any, on_event: Any, stop: threading.Event, resume: Any = None,
                 **kw: Any) -> TrainResult:
        self.names.append(cfg.output_name)
        for step in range(1, cfg.steps + 1):
            on_event(ProgressEvent("step", step=step, total=cfg.steps, loss=1.0 / step, smoothed_loss=1.0 / step))
        val = 0.5 + cfg.te_lr * 1e4
        on_event(ProgressEvent("validation", step=cfg.steps, total=cfg.steps, data={"validation_loss": val}))
        path = Path(cfg.out_dir) / f"{cfg.output_name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_test_bundle(path, self.host.lora_targets("unet", "attn"), {"clip_l": self.host.vocabulary("clip_l")})
        return TrainResult("completed", cfg.steps, cfg.steps, str(path), validation_losses=[(cfg.steps, val)])


def build(job: TrainingJob, host: Any, tmp_path: Path) -> Any:
    with gr.Blocks():
        return build_train_tab(job, lambda: host, data_dir="/data", out_dir=str(tmp_path), base=base_config())


def sweep_from_tab(tmp_path: Path, values: str) -> tuple[TrainingJob, Any, BundleTrainer, list[Any]]:
    host = FakeHost()
    trainer = BundleTrainer(host)
    job = TrainingJob(trainer=trainer)
    tab = build(job, host, tmp_path)
    form = form_values(base_config(out_dir=str(tmp_path))) + ["te_lr", values, "", ""]
    list(tab.handlers["sweep"](*form))
    assert job.wait(10)
    return job, tab, trainer, form


def test_a_sweep_from_the_tab_shows_one_bar_and_a_ranked_table_and_resumes(tmp_path: Path) -> None:
    job, tab, trainer, form = sweep_from_tab(tmp_path, "1e-6, 1e-5, 1e-4")
    # gradio 4+ lists (label, value) pairs, gradio 3.41 (A1111) the values
    assert tab.sweep["name0"].value == "te_lr" and any(c in (("te_lr", "te_lr"), "te_lr")
                                                       for c in tab.sweep["name0"].choices)
    from pivotal.ui.progress_view import progress_html

    progress = progress_html(job.status())
    assert 'data-state="finished"' in progress and "sweep" in progress and "step 12/12 overall" in progress
    table = progress[progress.index('id="pivotal-queue-table"'):]
    assert re.findall(r'data-run="([^"]+)"', table) == [  # ranked: best validation loss first
        "pivotal-te_lr1e-06", "pivotal-te_lr1e-05", "pivotal-te_lr0p0001"]
    assert "ranked by validation loss" in table and "te_lr=1e-05" in table
    # started again, the sweep trains nothing: its runs are done
    list(tab.handlers["sweep"](*form))
    assert job.wait(10) and len(trainer.names) == 3
    assert [r["skipped"] for r in job.status()["queue"]["runs"]] == [True, True, True]


@pytest.mark.slow
def test_the_sweep_grid_from_the_tab(tmp_path: Path) -> None:
    job, tab, trainer, form = sweep_from_tab(tmp_path, "1e-6, 1e-5")
    image, info = tab.handlers["sweep_grid"]("mychar on the moon", 4, 2, 96)
    assert "sweep-grid-done" in info, info
    (png,) = (tmp_path / "sweeps").glob("*/sweep-grid.png")
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["row_bundles"] == ["pivotal-te_lr1e-06", "pivotal-te_lr1e-05"]
    assert len(record["cells"]) == 10 and {c["seed"] for c in record["cells"]} == {4}
    assert image.size[1] > 2 * 64 and {tuple(c["size"]) for c in record["cells"]} == {(96, 96)}
    # the grid record next to the configs is no config: the sweep, started again, still skips all
    list(tab.handlers["sweep"](*form))
    assert job.wait(10) and len(trainer.names) == 2


def test_bad_sweep_values_name_the_setting(tmp_path: Path) -> None:
    job = TrainingJob(trainer=BundleTrainer(FakeHost()))
    tab = build(job, None, tmp_path)
    form = form_values(base_config(out_dir=str(tmp_path)))
    (progress, *_), = list(tab.handlers["sweep"](*form, "te_lr", "1e-6, fast", "", ""))
    assert "te_lr" in progress and "&#x27;fast&#x27; is not a float" in progress
    (progress, *_), = list(tab.handlers["sweep"](*form, "te_lr", "1e-6", "unet_rank", ""))
    assert "sweep unet_rank: enter its values" in progress
    assert not (tmp_path / "sweeps").exists() and job.status()["state"] == "idle"
    _, info = tab.handlers["sweep_grid"]("", 0)
    assert "no sweep yet" in info
    assert grid_numbers("4", 0) == (4, 0) and grid_numbers(None, 96.0) == (20, 96)
    for steps, size, named in ((0, 0, "grid steps"), (2.5, 0, "grid steps"), (4, 60, "grid size"),
                               (4, 100, "grid size"), ("many", 0, "grid steps"), ("inf", 0, "grid steps"),
                               (4, float("nan"), "grid size"), (4, "", None)):
        if named is None:  # an empty size box is 0: the variants' own resolution
            assert grid_numbers(steps, size) == (4, 0)
            continue
        with pytest.raises(ConfigError, match=named):
            grid_numbers(steps, size)


def test_the_section_offers_numbers_switches_and_choices_only() -> None:
    names = sweepable_settings()
    assert {"te_lr", "embedding_lr", "unet_rank", "steps", "phase_plan", "te_lora"} <= set(names)
    assert not {"data_dir", "output_name", "embeddings", "sweep", "preview_prompts"} & set(names)
    assert varies_from_form([("te_lr", " 1e-6,1e-5 "), ("", "ignored")]) == ["te_lr=1e-6,1e-5"]
    rows = [{"name": "a", "validation_loss": None}, {"name": "b", "validation_loss": 0.2}, {"name": "c",
                                                                                           "validation_loss": 0.1}]
    assert [r["name"] for r in ranked_rows(rows)] == ["c", "b", "a"]
