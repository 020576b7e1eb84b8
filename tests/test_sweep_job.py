"""A sweep as one training job: the runs one after another through the job's trainer, one bar for
the whole queue with a table of the runs, Interrupt stops the sweep, starting it again skips the
finished runs; bad values are refused naming the setting before anything is written.

The trainer is a small fake injected into the job (the real one is tested on its own; the real
sweep in tests/test_sweep.py); it writes a bundle file so the queue can skip a finished run.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Optional

import pytest

from pivotal.errors import ConfigError
from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.job import FINISHED, RUNNING, JobBusyError, TrainingJob
from pivotal.training.progress import ProgressEvent, TrainResult
from pivotal.training.sweep import start_sweep, sweep_folder

HOST = SimpleNamespace(label="fake model", base_model="sd1")
STEPS = 4


def base(**kw: Any) -> TrainConfig:
    values = dict(data_dir="/data", embeddings=[EmbeddingSpec("mychar")], steps=STEPS, output_name="hero")
    values.update(kw)
    return TrainConfig(**values)


class FakeTrainer:
    """Emits the trainer's events, honours ``stop`` at step boundaries, writes the bundle; blocks at
    step ``hold_at`` of the ``hold_run``-th call until released."""

    def __init__(self, hold_run: int = 0, hold_at: int = 0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.hold_run, self.hold_at = hold_run, hold_at
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, cfg: TrainConfig, host: Any, on_event: Callable[[ProgressEvent], None],
                 stop: threading.Event, resume: Optional[str] = None, **kw: Any) -> TrainResult:
        self.calls.append({"name": cfg.output_name, "te_lr": cfg.te_lr, "variants": kw.get("variants")})
        on_event(ProgressEvent("start", total=cfg.steps))
        for step in range(1, cfg.steps + 1):
            if len(self.calls) == self.hold_run and step == self.hold_at:
                self.held.set()
                self.release.wait(10)
            if stop.is_set():
                return TrainResult("interrupted", step - 1, cfg.steps)
            on_event(ProgressEvent("step", step=step, total=cfg.steps, loss=1.0 / step, smoothed_loss=1.0 / step))
        val = 0.1 + cfg.te_lr * 1e4  # a variant's validation loss grows with its TE LR here
        on_event(ProgressEvent("validation", step=cfg.steps, total=cfg.steps, data={"validation_loss": val}))
        path = Path(cfg.out_dir) / f"{cfg.output_name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"bundle")
        return TrainResult("completed", cfg.steps, cfg.steps, str(path), last_smoothed_loss=1.0 / cfg.steps,
                           validation_losses=[(cfg.steps, val)])


def test_a_sweep_runs_its_variants_as_one_job_with_one_bar(tmp_path: Path) -> None:
    fake = FakeTrainer()
    job = TrainingJob(trainer=fake)
    run_id, folder = start_sweep(job, base(), ["te_lr=1e-6,1e-5,1e-4"], tmp_path, lambda: HOST)
    assert job.wait(10)
    snap = job.status()
    assert snap["run_id"] == run_id and snap["state"] == FINISHED and snap["result_status"] == "completed"
    assert [c["name"] for c in fake.calls] == ["hero-te_lr0p0001", "hero-te_lr1e-05", "hero-te_lr1e-06"]
    assert fake.calls[0]["variants"] == ["hero-te_lr1e-05", "hero-te_lr1e-06"]  # may share embedding names
    queue = snap["queue"]
    assert queue["kind"] == "sweep" and queue["index"] == 3 and queue["count"] == 3
    assert (queue["step"], queue["total"]) == (3 * STEPS, 3 * STEPS)
    rows = {r["name"]: r for r in queue["runs"]}
    assert rows["hero-te_lr1e-05"]["values"] == ["te_lr=1e-05"] and rows["hero-te_lr1e-05"]["state"] == "completed"
    assert rows["hero-te_lr1e-05"]["validation_loss"] == pytest.approx(0.2)
    assert rows["hero-te_lr1e-06"]["bundle"] == str(folder / "output" / "hero-te_lr1e-06.safetensors")
    assert folder == sweep_folder(tmp_path, base(), ["te_lr=1e-6,1e-5,1e-4"]) and folder.parent == tmp_path / "sweeps"
    # the chart shows the run going (the last), not the sum of the runs
    assert snap["losses"] == pytest.approx([1.0 / s for s in range(1, STEPS + 1)])


def test_a_relative_dataset_folder_stays_the_one_the_form_meant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    from pivotal.training.queue import find_configs, queue_config
    from pivotal.training.sweep import write_sweep_from

    monkeypatch.chdir(tmp_path)
    folder = write_sweep_from(base(data_dir="data", validation_dir="val"), ["unet_rank=2"], tmp_path / "outputs")
    (config,) = find_configs(folder)
    cfg = queue_config(config)
    assert (cfg.data_dir, cfg.validation_dir) == (str(tmp_path / "data"), str(tmp_path / "val"))
    assert cfg.out_dir == str(folder / "output")


def test_interrupt_stops_the_sweep_and_starting_it_again_resumes(tmp_path: Path) -> None:
    fake = FakeTrainer(hold_run=2, hold_at=3)
    job = TrainingJob(trainer=fake)
    varies = ["te_lr=1e-6,1e-5,1e-4"]
    start_sweep(job, base(), varies, tmp_path, lambda: HOST)
    assert fake.held.wait(10)
    snap = job.status()
    assert snap["state"] == RUNNING and snap["queue"]["index"] == 2
    assert (snap["queue"]["step"], snap["queue"]["total"]) == (STEPS + 2, 3 * STEPS)  # run 1 whole, run 2 at 2
    with pytest.raises(JobBusyError):
        start_sweep(job, base(), varies, tmp_path, lambda: HOST)
    assert job.interrupt()
    fake.release.set()
    assert job.wait(10)
    snap = job.status()
    assert snap["state"] == FINISHED and snap["result_status"] == "interrupted"
    assert [r["state"] for r in snap["queue"]["runs"]] == ["completed", "interrupted", "pending"]
    assert len(fake.calls) == 2  # the third run was not started
    fake.hold_run = 0
    start_sweep(job, base(), varies, tmp_path, lambda: HOST)
    assert job.wait(10)
    snap = job.status()
    assert snap["result_status"] == "completed"
    assert [c["name"] for c in fake.calls[2:]] == ["hero-te_lr1e-05", "hero-te_lr1e-06"]  # the first was skipped
    assert [r["skipped"] for r in snap["queue"]["runs"]] == [True, False, False]


@pytest.mark.parametrize("varies, match", [
    (["te_lr=1e-6,fast"], r"te_lr: 'fast' is not a float"),
    (["unet_rank=0"], r"unet_rank: must be greater than 0"),
    (["te_lrr=1e-5"], r"'te_lrr' is not a setting"),
    ([], r"give 1 to 2 settings"),
])
def test_bad_values_name_the_setting_and_write_nothing(tmp_path: Path, varies: list[str], match: str) -> None:
    job = TrainingJob(trainer=FakeTrainer())
    with pytest.raises(ConfigError, match=match):
        start_sweep(job, base(), varies, tmp_path, lambda: HOST)
    assert not (tmp_path / "sweeps").exists() and job.status()["state"] == "idle"


def test_the_sweep_route_starts_refuses_and_reports_the_queue(tmp_path: Path) -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from pivotal.webui.api import add_routes

    fake = FakeTrainer(hold_run=1, hold_at=2)
    job = TrainingJob(trainer=fake)
    app = fastapi.FastAPI()
    add_routes(app, job, lambda **kw: HOST, lambda: {"outputs": str(tmp_path), "lora_dir": str(tmp_path / "Lora")})
    client = TestClient(app)
    assert "vary" in app.openapi()["components"]["schemas"]["PivotalSweepRequest"]["properties"]
    config = {"data_dir": "/data", "output_name": "hero", "steps": STEPS, "embeddings": [{"name": "mychar"}]}
    bad = client.post("/pivotal/v1/sweep", json={"config": config, "vary": ["te_lr=1e-6,fast"]})
    assert bad.status_code == 400 and "te_lr" in bad.json()["detail"]
    assert client.post("/pivotal/v1/sweep", json={"config": config}).status_code == 400
    ok = client.post("/pivotal/v1/sweep", json={"config": config, "vary": "te_lr=1e-6,1e-5"})
    assert ok.status_code == 200 and ok.json()["runs"] == ["hero-te_lr1e-05", "hero-te_lr1e-06"]
    assert fake.held.wait(10)
    busy = client.post("/pivotal/v1/sweep", json={"config": config, "vary": ["te_lr=1e-4"]})
    assert busy.status_code == 409
    assert client.post("/pivotal/v1/train", json={"config": config}).status_code == 409
    queue = client.get("/pivotal/v1/status").json()["queue"]
    assert (queue["index"], queue["count"], queue["step"], queue["total"]) == (1, 2, 1, 2 * STEPS)
    assert client.post("/pivotal/v1/interrupt").json() == {"interrupted": True}
    fake.release.set()
    assert job.wait(10)
    snap = client.get("/pivotal/v1/status").json()
    assert snap["result_status"] == "interrupted" and [r["state"] for r in snap["queue"]["runs"]] == [
        "interrupted", "pending"]
