"""TrainingJob: one run at a time, interrupt at a step boundary, snapshots, failures shown.

The trainer is a small fake injected into the job (the real one is tested on its own); it emits
the same events and honours ``stop`` the way the trainer's contract says.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Optional

import pytest

from pivotal.errors import ConfigError, TrainingError
from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.job import FAILED, FINISHED, IDLE, MAX_PREVIEWS, RUNNING, JobBusyError, TrainingJob
from pivotal.training.progress import LossSmoother, ProgressEvent, TrainResult

HOST = object()


def config(**kw: Any) -> TrainConfig:
    base = dict(data_dir="/data", embeddings=[EmbeddingSpec("mychar")], steps=5)
    base.update(kw)
    return TrainConfig(**base)


class FakeTrainer:
    """Steps when told to (``gate``), or freely; emits the trainer's events; honours ``stop``."""

    def __init__(self, gated: bool = False, fail: Optional[BaseException] = None,
                 previews: bool = False, warn: bool = False, validate: bool = False) -> None:
        self.gate = threading.Semaphore(0) if gated else None
        self.fail = fail
        self.previews = previews
        self.warn = warn
        self.validate = validate
        self.calls: list[dict[str, Any]] = []
        self.at_step = threading.Event()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def __call__(self, cfg: TrainConfig, host: Any, on_event: Callable[[ProgressEvent], None],
                 stop: threading.Event, resume: Optional[str] = None) -> TrainResult:
        self.calls.append({"config": cfg, "host": host, "resume": resume})
        emit = on_event
        emit(ProgressEvent("preflight", total=cfg.steps, data={"images": 8}, message="8 images"))
        emit(ProgressEvent("start", total=cfg.steps, phase="together", message="training"))
        smoother = LossSmoother()
        losses: list[float] = []
        for step in range(1, cfg.steps + 1):
            if self.gate is not None:
                self.at_step.set()
                self.gate.acquire(timeout=10)
            if stop.is_set():  # the step boundary: save or discard per on_interrupt
                path = "/out/partial.safetensors" if cfg.on_interrupt == "save" else ""
                if path:
                    emit(ProgressEvent("save", step=step - 1, total=cfg.steps, path=path))
                emit(ProgressEvent("done", step=step - 1, total=cfg.steps, message="interrupted"))
                return TrainResult("interrupted", step - 1, cfg.steps, bundle_path=path, losses=losses)
            if self.fail is not None and step == 2:
                raise self.fail
            loss = 1.0 / step
            losses.append(loss)
            emit(ProgressEvent("step", step=step, total=cfg.steps, loss=loss, smoothed_loss=smoother.update(loss),
                               lrs={"unet": 1e-4}, eta_s=float(cfg.steps - step), phase="together",
                               data={"grad_norm": 10.0 * step}))
            if self.warn:
                emit(ProgressEvent("warning", step=step, message=f"warn {step}"))
            if self.validate and step % 2 == 0:
                emit(ProgressEvent("validation", step=step, total=cfg.steps, message="validation loss",
                                   data={"validation_loss": 2.0 / step}))
            if self.previews:
                emit(ProgressEvent("preview", step=step, image=_image(step), message=f"a photo of mychar {step}",
                                   path=f"/out/previews/{step}.png"))
        path = "/out/pivotal.safetensors"
        emit(ProgressEvent("save", step=cfg.steps, total=cfg.steps, path=path))
        emit(ProgressEvent("done", step=cfg.steps, total=cfg.steps, message="completed", path=path))
        return TrainResult("completed", cfg.steps, cfg.steps, bundle_path=path, losses=losses,
                           last_smoothed_loss=smoother.value(), message="completed")


def _image(step: int) -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8), (step * 10 % 256, 0, 0))


def wait_for(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def test_idle_snapshot_is_json_able() -> None:
    snap = TrainingJob(trainer=FakeTrainer()).status()
    assert snap["state"] == IDLE and snap["step"] == 0 and snap["losses"] == []
    json.dumps(snap)
    job = TrainingJob(trainer=FakeTrainer())
    job.start(config(), HOST)
    assert job.wait(10)
    assert set(job.status()) == set(snap)  # a poller reads the same keys in every state


def test_completed_run_snapshot() -> None:
    fake = FakeTrainer(previews=True, warn=True)
    job = TrainingJob(trainer=fake)
    run_id = job.start(config(), HOST, resume="/out/state")
    assert job.wait(10)
    snap = job.status(preview_png=True)
    json.dumps(snap)
    assert snap["run_id"] == run_id
    assert snap["state"] == FINISHED and snap["result_status"] == "completed"
    assert (snap["step"], snap["total"]) == (5, 5)
    assert snap["losses"] == pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert len(snap["smoothed_losses"]) == 5 and snap["smoothed_loss"] == pytest.approx(snap["smoothed_losses"][-1])
    assert snap["loss"] == pytest.approx(0.2)
    assert snap["bundle_path"] == "/out/pivotal.safetensors"
    assert snap["saved_paths"] == ["/out/pivotal.safetensors"]
    assert snap["preflight"] == {"images": 8}
    assert snap["warnings"] == [f"warn {i}" for i in range(1, 6)]
    assert snap["preview_count"] == 5 and snap["preview_png_base64"] and snap["preview_path"] == "/out/previews/5.png"
    assert snap["phase"] == "together" and snap["eta_s"] == 0.0 and snap["message"] == "completed"
    assert snap["grad_norm"] == 50.0  # the last step's
    assert [p.step for p in job.previews()] == [1, 2, 3, 4, 5]
    assert job.latest_preview().getpixel((0, 0)) == (50, 0, 0)
    assert fake.calls[0]["host"] is HOST and fake.calls[0]["resume"] == "/out/state"


def test_previews_are_capped() -> None:
    job = TrainingJob(trainer=FakeTrainer(previews=True))
    job.start(config(steps=MAX_PREVIEWS + 5), HOST)
    assert job.wait(10)
    assert len(job.previews()) == MAX_PREVIEWS and job.status()["preview_count"] == MAX_PREVIEWS + 5


def test_second_start_refused_while_running_then_allowed_after() -> None:
    fake = FakeTrainer(gated=True)
    job = TrainingJob(trainer=fake)
    job.start(config(), HOST)
    assert fake.at_step.wait(5)
    assert job.running and job.status()["state"] == RUNNING
    with pytest.raises(JobBusyError, match="already going.*only one run at a time"):
        job.start(config(), HOST)
    fake.release(10)
    assert job.wait(10)
    assert job.status()["state"] == FINISHED and not job.running
    second = job.start(config(steps=2), HOST)  # the buttons work again after a run ends
    fake.release(10)
    assert job.wait(10)
    snap = job.status()
    assert snap["run_id"] == second and snap["state"] == FINISHED and snap["losses"] == pytest.approx([1.0, 0.5])
    assert len(fake.calls) == 2


def test_concurrent_starts_only_one_wins() -> None:
    """Many threads (tabs, API) press Start at once: exactly one run starts."""
    fake = FakeTrainer(gated=True)
    job = TrainingJob(trainer=fake)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def press() -> None:
        barrier.wait()
        try:
            job.start(config(), HOST)
            outcomes.append("started")
        except JobBusyError:
            outcomes.append("refused")

    threads = [threading.Thread(target=press) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(outcomes) == ["refused"] * 7 + ["started"]
    fake.release(10)
    assert job.wait(10) and len(fake.calls) == 1


@pytest.mark.parametrize("on_interrupt, bundle", [("save", "/out/partial.safetensors"), ("discard", "")])
def test_interrupt_stops_at_next_step(on_interrupt: str, bundle: str) -> None:
    fake = FakeTrainer(gated=True)
    job = TrainingJob(trainer=fake)
    job.start(config(steps=100, on_interrupt=on_interrupt), HOST)
    fake.release(3)
    wait_for(lambda: job.status()["step"] == 3)
    assert job.interrupt() is True
    snap = job.status()
    assert snap["stop_requested"] and "interrupt requested" in snap["message"]
    fake.release(1)
    assert job.wait(10)
    snap = job.status()
    assert snap["state"] == FINISHED and snap["result_status"] == "interrupted"
    assert snap["step"] == 3 and snap["bundle_path"] == bundle
    assert job.interrupt() is False  # nothing running any more


def test_interrupt_when_idle_is_harmless() -> None:
    job = TrainingJob(trainer=FakeTrainer())
    assert job.interrupt() is False
    assert job.status()["state"] == IDLE


def test_bad_config_refused_before_any_thread() -> None:
    fake = FakeTrainer()
    job = TrainingJob(trainer=fake)
    with pytest.raises(ConfigError, match="steps"):
        job.start(config(steps=0), HOST)
    with pytest.raises(ConfigError, match="embeddings"):
        job.start(config(embeddings=[]), HOST)
    assert job.status()["state"] == IDLE and fake.calls == []


def test_host_or_provider_exactly_one() -> None:
    job = TrainingJob(trainer=FakeTrainer())
    with pytest.raises(TrainingError, match="either a host or a host provider"):
        job.start(config())
    with pytest.raises(TrainingError, match="either a host or a host provider"):
        job.start(config(), HOST, host_provider=lambda: HOST)


def test_host_provider_runs_in_background() -> None:
    fake = FakeTrainer()
    loaded = threading.Event()
    release = threading.Event()

    def provider() -> Any:
        loaded.set()
        release.wait(5)
        return HOST

    job = TrainingJob(trainer=fake)
    job.start(config(), host_provider=provider)
    assert loaded.wait(5)
    snap = job.status()
    assert snap["state"] == RUNNING and snap["phase"] == "loading model"
    with pytest.raises(JobBusyError):  # the one-run rule holds while the model loads
        job.start(config(), HOST)
    release.set()
    assert job.wait(10)
    assert job.status()["state"] == FINISHED and fake.calls[0]["host"] is HOST


def test_pivotal_error_surfaces_its_message() -> None:
    job = TrainingJob(trainer=FakeTrainer(fail=TrainingError("loss is not finite for 5 steps; lower the LR")))
    job.start(config(), HOST)
    assert job.wait(10)
    snap = job.status()
    assert snap["state"] == FAILED and snap["result_status"] == "failed"
    assert snap["message"] == "loss is not finite for 5 steps; lower the LR"
    assert snap["losses"] == [1.0]  # what happened before the failure stays visible
    job.start(config(steps=1), HOST)  # and a new run may start
    assert job.wait(10) and job.status()["state"] == FINISHED


def test_unexpected_error_surfaces_type_and_message(caplog: pytest.LogCaptureFixture) -> None:
    job = TrainingJob(trainer=FakeTrainer(fail=RuntimeError("CUDA out of memory")))
    with caplog.at_level("ERROR"):
        job.start(config(), HOST)
        assert job.wait(10)
    snap = job.status()
    assert snap["state"] == FAILED and snap["message"] == "RuntimeError: CUDA out of memory"
    assert "Traceback" in caplog.text  # the full traceback goes to the log, not the page


def test_host_provider_failure_surfaces() -> None:
    def provider() -> Any:
        raise TrainingError("model file /m.safetensors not found")

    job = TrainingJob(trainer=FakeTrainer())
    job.start(config(), host_provider=provider)
    assert job.wait(10)
    snap = job.status()
    assert snap["state"] == FAILED and snap["message"] == "model file /m.safetensors not found"


def test_trainer_reported_failure_status() -> None:
    def trainer(cfg: TrainConfig, host: Any, on_event: Any, stop: Any, resume: Any = None) -> TrainResult:
        on_event(ProgressEvent("warning", message="dataset has 1 image"))
        return TrainResult("failed", 0, cfg.steps, message="no usable images in /data",
                           warnings=["dataset has 1 image"])

    job = TrainingJob(trainer=trainer)
    job.start(config(), HOST)
    assert job.wait(10)
    snap = job.status()
    assert snap["state"] == FAILED and snap["message"] == "no usable images in /data"
    assert snap["warnings"] == ["dataset has 1 image"]


def test_snapshots_while_running_are_consistent() -> None:
    """Polling from another thread while the trainer writes never sees a torn snapshot."""
    fake = FakeTrainer()
    job = TrainingJob(trainer=fake)
    job.start(config(steps=2000), HOST)
    seen = 0
    while job.running or seen == 0:
        snap = job.status()
        assert len(snap["losses"]) == len(snap["smoothed_losses"])
        assert snap["step"] >= len(snap["losses"]) or snap["state"] != RUNNING
        seen += 1
    assert job.wait(10) and job.status()["step"] == 2000


def test_stopped_run_is_failed_with_message() -> None:
    def trainer(cfg: TrainConfig, host: Any, on_event: Any, stop: Any, resume: Any = None) -> TrainResult:
        return TrainResult("stopped", 3, cfg.steps, message="stopped: 5 non-finite losses in a row")

    job = TrainingJob(trainer=trainer)
    job.start(config(), HOST)
    assert job.wait(10)
    snap = job.status()
    assert (snap["state"], snap["result_status"], snap["step"]) == (FAILED, "stopped", 3)
    assert snap["message"] == "stopped: 5 non-finite losses in a row"


def test_host_use_and_runs_exclude_each_other() -> None:
    fake = FakeTrainer(gated=True)
    job = TrainingJob(trainer=fake)
    with job.using_host():
        with pytest.raises(JobBusyError, match="generating an image"):
            job.start(config(), HOST)
        with pytest.raises(JobBusyError, match="generating another image"):
            with job.using_host():
                pass
    job.start(config(), HOST)  # released: a run may start
    with pytest.raises(JobBusyError, match="training run is going"):
        with job.using_host():
            pass
    fake.release(10)
    assert job.wait(10)
    with job.using_host():  # and after the run, the host is free again
        pass


def test_validation_losses_in_the_snapshot() -> None:
    job = TrainingJob(trainer=FakeTrainer(validate=True))
    assert job.status()["validation_loss"] is None and job.status()["validation_losses"] == []
    job.start(config(), HOST)
    assert job.wait(10)
    snap = job.status()
    json.dumps(snap)
    assert snap["validation_losses"] == [[2, 1.0], [4, 0.5]] and snap["validation_loss"] == 0.5
