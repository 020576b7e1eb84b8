"""One training run at a time, in a background thread, watched through snapshots.

Every front end (the standalone app, the webui tab, an HTTP API) shares one :class:`TrainingJob`
per process. It owns the rule that only one run may go at once: a second ``start`` while a run is
going (a double click, a second browser tab, the API and the UI together) is refused with
:class:`JobBusyError`. The page polls :meth:`TrainingJob.status`, a JSON-able snapshot, instead of
being called back, so a page that reloads, or a second tab, can follow a run it did not start.

The job never imports a host or the trainer at import time: the trainer is looked up when the
first run starts (or injected, for tests), the host is handed in by the caller.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from pivotal.errors import ConfigError, PivotalError, TrainingError
from pivotal.training.config import TrainConfig
from pivotal.training.job_state import FAILED, FINISHED, IDLE, RUNNING, Preview, RunState
from pivotal.training.progress import ProgressEvent, TrainResult
from pivotal.training.queue_job import QUEUE, QueueProgress, outcome

if TYPE_CHECKING:  # host_api imports torch; the job itself never touches a tensor
    from pivotal.host_api import TrainingHost

log = logging.getLogger(__name__)

#: states of a job, as :meth:`TrainingJob.status` reports them
JOB_STATES = (IDLE, RUNNING, FINISHED, FAILED)

#: signature of :func:`pivotal.training.trainer.train`
TrainFn = Callable[..., TrainResult]
HostProvider = Callable[[], "TrainingHost"]

#: previews kept for the gallery (the oldest drop out; a long run may make hundreds)
MAX_PREVIEWS = 12
#: warnings kept (a run that warns every step must not grow without bound)
MAX_WARNINGS = 50


class JobBusyError(TrainingError):
    """A run is already going; only one may run at a time."""


class TrainingJob:
    """Runs :func:`pivotal.training.trainer.train` in a background thread, one run at a time.

    ``trainer``: the train function; ``None`` imports :func:`pivotal.training.trainer.train` when the first
    run starts (tests inject a fake one).
    """

    def __init__(self, trainer: Optional[TrainFn] = None) -> None:
        self._trainer = trainer
        self._lock = threading.Lock()
        self._run: Optional[RunState] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._next_id = 1
        #: callers using the host outside a run (generating an image); a run may not start meanwhile
        self._host_users = 0

    # -- control ------------------------------------------------------------------------------
    def start(self, config: TrainConfig, host: Optional[TrainingHost] = None, *,
              host_provider: Optional[HostProvider] = None, resume: Optional[str] = None) -> int:
        """Validate ``config`` and start a run; return its run id.

        Give the host itself, or ``host_provider`` to load it in the background thread (loading a
        model takes a while; the page shows "loading model" meanwhile and the one-run rule already
        holds). Raises ConfigError for a bad setting and JobBusyError while a run is going.
        """
        if (host is None) == (host_provider is None):
            raise TrainingError("give either a host or a host provider to start a run")
        config.validate()  # a bad setting is reported to the caller at once, not as a failed run
        with self._lock:
            self._check_free()
            trainer = self._trainer or _default_trainer()
            run = RunState(run_id=self._next_id, config=config.to_dict(), total=config.steps,
                            phase="loading model" if host is None else "starting",
                            message="loading the model" if host is None else "starting")
            self._next_id += 1
            self._run = run
            self._stop = threading.Event()
            thread = threading.Thread(target=self._worker, name=f"pivotal-train-{run.run_id}", daemon=True,
                                      args=(run, trainer, config, host, host_provider, resume, self._stop))
            self._thread = thread
            thread.start()
        return run.run_id

    def start_queue(self, folder: str | Path, build: Callable[[Path], TrainConfig], *,
                    host_provider: HostProvider, kind: str = QUEUE, name: str = "",
                    base: Optional[TrainConfig] = None) -> int:
        """Train the configs of queue folder ``folder`` one after another as one job (see
        :mod:`pivotal.training.queue_job`); return its run id. ``build(path)``: a config file's
        TrainConfig; ``kind``: "queue" or "sweep"; ``base``: the settings shown for the job.
        ConfigError when the folder holds no config, JobBusyError while a run is going. Interrupt
        stops the run going (it saves per its ``on_interrupt``) and the queue; starting the same
        folder again skips the finished runs and resumes the interrupted one."""
        queue = QueueProgress.plan(folder, build, kind, name)
        if not queue.rows:
            raise ConfigError(f"{folder}: no config files (.toml / .json) to run")
        with self._lock:
            self._check_free()
            trainer = self._trainer or _default_trainer()
            run = RunState(run_id=self._next_id, config=base.to_dict() if base else {}, phase="loading model",
                            message="loading the model", queue=queue)
            self._next_id += 1
            self._run = run
            self._stop = threading.Event()
            thread = threading.Thread(target=self._queue_worker, name=f"pivotal-{kind}-{run.run_id}", daemon=True,
                                      args=(run, queue, trainer, Path(folder), build, host_provider, self._stop))
            self._thread = thread
            thread.start()
        return run.run_id

    def _check_free(self) -> None:
        """JobBusyError while a run is going or the host is lent out (call under the lock)."""
        if self._run is not None and self._run.state == RUNNING:
            raise JobBusyError(self._busy_message(self._run))
        if self._host_users:
            raise JobBusyError("the model is generating an image; start the run when it is done")

    def interrupt(self) -> bool:
        """Ask the running run to stop at the next step boundary; the trainer then saves or
        discards per ``config.on_interrupt``. Returns False when no run is going."""
        with self._lock:
            run = self._run
            if run is None or run.state != RUNNING:
                return False
            run.stop_requested = True
            run.message = "interrupt requested: stopping at the next step"
            self._stop.set()
        return True

    @contextlib.contextmanager
    def using_host(self) -> Iterator[None]:
        """Hold the host for work outside a run (generating an image) — one user at a time, never
        during a run: a run reshapes the host's modules and attaches its LoRA, and two users
        attaching LoRA to the same modules would clash. Raises JobBusyError when the host is taken;
        while it is held, :meth:`start` is refused."""
        with self._lock:
            if self._run is not None and self._run.state == RUNNING:
                raise JobBusyError("a training run is going; generate after it ends (or interrupt it)")
            if self._host_users:
                raise JobBusyError("the model is generating another image; try again in a moment")
            self._host_users += 1
        try:
            yield
        finally:
            with self._lock:
                self._host_users -= 1

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the current run's thread ends; True when it has (or none was started)."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._run is not None and self._run.state == RUNNING

    # -- snapshots ----------------------------------------------------------------------------
    def status(self, preview_png: bool = False) -> dict[str, Any]:
        """A JSON-able snapshot of the current (or last) run.

        Keys: ``state`` (idle/running/finished/failed), ``result_status`` (the trainer's:
        completed/interrupted/stopped/failed), ``run_id``, ``step``/``total``, ``loss``,
        ``smoothed_loss``, ``losses``/``smoothed_losses`` (this run's history), ``validation_loss``
        (the last held-out validation loss, or None) and ``validation_losses`` ([step, loss] each),
        ``lrs``, ``grad_norm`` (the last step's, before clipping; None with max_grad_norm 0), ``eta_s``,
        ``elapsed_s``, ``phase``, ``message``, ``warnings``, ``bundle_path`` (the latest save),
        ``saved_paths``, ``preflight`` (the dataset report), ``preview_count``, ``preview_path``,
        ``stop_requested``, ``settings`` (the run's config), ``validation_drift`` /
        ``validation_drifts`` (drift in %, with ``validation_drift`` on), ``queue`` (a queue's or
        sweep's progress and runs, :mod:`pivotal.training.queue_job`; None for a single run). The
        same keys when idle.

        ``preview_png``: also give the latest preview as base64 PNG (``preview_png_base64``); the
        image itself is :meth:`latest_preview`.
        """
        with self._lock:
            run = self._run
            if run is None:
                return {"state": IDLE, "run_id": 0, "step": 0, "total": 0, "loss": None, "smoothed_loss": None,
                        "losses": [], "smoothed_losses": [], "validation_loss": None, "validation_losses": [],
                        "lrs": {}, "grad_norm": None, "eta_s": None, "phase": "",
                        "message": "", "warnings": [], "bundle_path": "", "saved_paths": [], "preflight": {},
                        "result_status": "", "preview_count": 0, "elapsed_s": 0.0, "stop_requested": False,
                        "preview_path": "", "settings": {}, "validation_drift": None, "validation_drifts": [],
                        "queue": None}
            end = run.ended_at if run.ended_at is not None else time.time()
            snap = {"state": run.state, "run_id": run.run_id, "step": run.step, "total": run.total,
                    "loss": run.loss, "smoothed_loss": run.smoothed_loss, "losses": list(run.losses),
                    "smoothed_losses": list(run.smoothed_losses), "lrs": dict(run.lrs), "eta_s": run.eta_s,
                    "grad_norm": run.grad_norm,
                    "validation_loss": run.validation_losses[-1][1] if run.validation_losses else None,
                    "validation_losses": [list(v) for v in run.validation_losses],
                    "phase": run.phase, "message": run.message, "warnings": list(run.warnings),
                    "bundle_path": run.bundle_path, "saved_paths": list(run.saved_paths),
                    "preflight": dict(run.preflight), "result_status": run.result_status,
                    "preview_count": run.preview_count, "elapsed_s": round(end - run.started_at, 3),
                    "preview_path": run.previews[-1].path if run.previews else "", "settings": run.config,
                    "stop_requested": run.stop_requested,
                    "validation_drift": run.validation_drifts[-1][1] if run.validation_drifts else None,
                    "validation_drifts": [list(v) for v in run.validation_drifts],
                    "queue": run.queue.snapshot() if run.queue is not None else None}
            latest = run.previews[-1].image if run.previews else None
        if preview_png and latest is not None:
            snap["preview_png_base64"] = _png_base64(latest)
        return snap

    def previews(self) -> list[Preview]:
        """The kept previews of the current (or last) run, oldest first."""
        with self._lock:
            return list(self._run.previews) if self._run is not None else []

    def latest_preview(self) -> Any:
        """The newest preview image (PIL) or None."""
        with self._lock:
            if self._run is None or not self._run.previews:
                return None
            return self._run.previews[-1].image

    # -- the background thread ----------------------------------------------------------------
    def _worker(self, run: RunState, trainer: TrainFn, config: TrainConfig, host: Optional[TrainingHost],
                host_provider: Optional[HostProvider], resume: Optional[str], stop: threading.Event) -> None:
        try:
            if host is None and host_provider is not None:
                host = host_provider()
                self._update(run, phase="starting", message="model loaded")
            result = trainer(config, host, on_event=lambda ev: self._on_event(run, ev), stop=stop, resume=resume)
        except PivotalError as e:  # refusals the user can act on: the message says what to fix
            self._finish(run, FAILED, "failed", str(e))
            return
        except Exception as e:  # anything else is a bug: keep the traceback in the log, the gist on the page
            log.exception("training run %d failed", run.run_id)
            self._finish(run, FAILED, "failed", f"{type(e).__name__}: {e}")
            return
        self._finish_result(run, result)

    def _queue_worker(self, run: RunState, queue: QueueProgress, trainer: TrainFn, folder: Path,
                      build: Callable[[Path], TrainConfig], host_provider: HostProvider, stop: threading.Event) -> None:
        from pivotal.training.queue import run_queue

        try:
            host = host_provider()
            self._update(run, phase="starting", message="model loaded")
            runs = run_queue(folder, host, build, stop=stop, train_fn=trainer,
                             on_event=lambda config, ev: self._on_queue_event(run, queue, config, ev),
                             on_run=lambda r: self._on_queue_run(queue, r))
        except PivotalError as e:
            with self._lock:
                queue.stopped()
            self._finish(run, FAILED, "failed", str(e))
            return
        except Exception as e:  # a bug: the traceback in the log, the gist on the page
            log.exception("%s %d failed", queue.kind, run.run_id)
            with self._lock:
                queue.stopped()
            self._finish(run, FAILED, "failed", f"{type(e).__name__}: {e}")
            return
        state, result = outcome(runs)
        counts = {s: sum(r.status == s for r in runs) for s in ("completed", "interrupted", "failed", "pending")}
        message = f"{queue.kind} {result}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        self._finish(run, FAILED if state == FAILED else FINISHED, result, message)

    def _on_queue_event(self, run: RunState, queue: QueueProgress, config: str, ev: ProgressEvent) -> None:
        with self._lock:
            if queue.begin(config):
                run.reset_for_next_run()
            if ev.kind == "step":
                queue.step(config, ev.step, ev.total, ev.smoothed_loss)
            elif ev.kind == "validation":
                queue.validation(config, ev.data)
        self._on_event(run, ev)

    def _on_queue_run(self, queue: QueueProgress, queue_run: Any) -> None:
        with self._lock:
            queue.finished(queue_run)

    def _on_event(self, run: RunState, ev: ProgressEvent) -> None:
        with self._lock:
            if ev.total:
                run.total = ev.total
            if ev.step:
                run.step = ev.step
            if ev.phase:
                run.phase = ev.phase
            if ev.kind == "step":
                if ev.loss is not None:
                    run.loss = ev.loss
                    run.losses.append(float(ev.loss))
                if ev.smoothed_loss is not None:
                    run.smoothed_loss = ev.smoothed_loss
                    run.smoothed_losses.append(float(ev.smoothed_loss))
                run.lrs = dict(ev.lrs)
                run.eta_s = ev.eta_s
                run.grad_norm = ev.data.get("grad_norm")
            elif ev.kind == "validation" and "validation_loss" in ev.data:
                run.validation_losses.append([ev.step, float(ev.data["validation_loss"])])
                if ev.data.get("validation_drift") is not None:
                    run.validation_drifts.append([ev.step, float(ev.data["validation_drift"])])
            elif ev.kind == "preflight":
                run.preflight = dict(ev.data)
            elif ev.kind == "start" and ev.data.get("history"):
                run.resume_history(ev.data["history"])
            elif ev.kind == "save" and ev.path:
                run.bundle_path = ev.path
                run.saved_paths.append(ev.path)
            elif ev.kind == "preview" and ev.image is not None:
                run.previews.append(Preview(ev.image, ev.step, ev.message, ev.path))
                del run.previews[:-MAX_PREVIEWS]
                run.preview_count += 1
            elif ev.kind == "warning" and ev.message:
                run.warnings.append(ev.message)
                del run.warnings[:-MAX_WARNINGS]
            elif ev.kind == "done" and ev.path:
                run.bundle_path = ev.path
            # a warning goes to the list and a preview's message is its prompt: neither is the run's news
            if ev.message and ev.kind not in ("warning", "preview") and not (run.stop_requested and ev.kind == "step"):
                run.message = ev.message

    def _update(self, run: RunState, **values: Any) -> None:
        with self._lock:
            for k, v in values.items():
                setattr(run, k, v)

    def _finish_result(self, run: RunState, result: TrainResult) -> None:
        # "stopped" (diverged) is a failure to the user even though a periodic save may be kept
        state = FAILED if result.status in ("failed", "stopped") else FINISHED
        message = result.message or {"completed": "run completed", "interrupted": "run interrupted",
                                     "stopped": "run stopped"}.get(result.status, result.status)
        with self._lock:
            run.step = result.steps_done or run.step
            run.total = result.total_steps or run.total
            if result.bundle_path:
                run.bundle_path = result.bundle_path
            for w in result.warnings:
                if w not in run.warnings:
                    run.warnings.append(w)
            if not run.losses and result.losses:
                run.losses = [float(x) for x in result.losses]
            if result.last_smoothed_loss is not None:
                run.smoothed_loss = result.last_smoothed_loss
        self._finish(run, state, result.status, message)

    def _finish(self, run: RunState, state: str, result_status: str, message: str) -> None:
        with self._lock:
            run.state = state
            run.result_status = result_status
            run.message = message
            run.eta_s = 0.0 if state == FINISHED else None
            run.ended_at = time.time()

    @staticmethod
    def _busy_message(run: RunState) -> str:
        where = f"step {run.step}/{run.total}" if run.total else run.phase or "starting"
        return (f"a training run is already going (run {run.run_id}, {where}); only one run at a time: "
                "wait for it to end or interrupt it first")


def _default_trainer() -> TrainFn:
    """The real trainer, imported on first use (it pulls in torch and the training loop)."""
    try:
        from pivotal.training.trainer import train
    except ImportError as e:
        raise TrainingError(f"the trainer cannot be loaded: {e}") from e
    return train


def _png_base64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
