"""Runs Pivotal's trainer inside the webui: through its queue, on its progress state, into its Lora folder.

One :class:`pivotal.training.job.TrainingJob` per webui process (:func:`webui_job`), whose trainer is
:func:`run_in_webui`. That function

* holds the webui's ``queue_lock`` for the whole run, so txt2img/img2img/API generations requested
  meanwhile wait in the webui's queue (and a run waits for a generation in progress);
* begins a webui job on ``shared.state`` (``job_count`` = steps, ``job_no`` = step, ``textinfo``,
  previews via ``assign_current_image``) and registers a task id for ``/internal/progress``
  (unique per run; :func:`current_task_id`), which the tab's script (``javascript/pivotal.js``)
  follows with the webui's own progress bar and live preview;
* maps the webui's Interrupt (``state.interrupted``, also ``POST /sdapi/v1/interrupt``) to the
  trainer's stop event;
* refuses embedding names the webui already has (embeddings folder, other bundles) up front;
* publishes the saved bundle into the Lora folder (``cmd_opts.lora_dir``) and refreshes the Lora
  list, so ``<lora:NAME:1>`` and the cards find it without a restart. Training files (resume
  states, periodic saves, previews) stay in the run's output folder: the Lora folder would list
  every ``.safetensors`` in it as a LoRA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pivotal.errors import ConfigError, PivotalError
from pivotal.hosts.a1111.webui import optional_webui_module, webui_paths  # noqa: F401 (webui_paths: glue API)
from pivotal.training.config import TrainConfig
from pivotal.training.job import TrainingJob
from pivotal.training.progress import ProgressEvent, TrainResult

#: the prefix of the task ids Pivotal runs register with the webui's progress API
TASK_PREFIX = "task(pivotal-"
_job_lock = threading.Lock()
_job: list[TrainingJob] = []


def webui_job() -> TrainingJob:
    """The process's one training job (created on first use), whose runs go through the webui."""
    with _job_lock:
        if not _job:
            _job.append(TrainingJob(trainer=run_in_webui))
        return _job[0]


_task_lock = threading.Lock()
_current_task: list[str] = [""]


def task_id(config: TrainConfig, run: str = "") -> str:
    """The ``id_task`` a run reports under in ``/internal/progress``. ``run`` makes it unique: the
    webui remembers finished ids, and a page following a re-used id would see "completed" at once."""
    return f"{TASK_PREFIX}{config.output_name}{'-' + run if run else ''})"


def current_task_id() -> str:
    """The ``id_task`` of the run going now ("" when none): the tab's script follows it with the
    webui's own progress bar and live preview."""
    with _task_lock:
        return _current_task[0]


def taken_embedding_names(webui: Any) -> dict[str, str]:
    """{lower-cased name: where} of the embeddings the webui knows (loaded or skipped). One a LoRA
    file registered (``filename`` = ``BUNDLE.safetensors/NAME``, as the webuis' loaders name bundled
    embeddings) is another bundle's: shared, not refused (see :mod:`pivotal.formats.name_registry`)."""
    from pivotal.formats.name_registry import BUNDLE_SOURCE

    db = webui.embedding_db
    taken: dict[str, str] = {}
    for table in (db.word_embeddings, db.skipped_embeddings):
        for name, emb in table.items():
            where = str(getattr(emb, "filename", "") or "the webui's embeddings")
            parent = os.path.dirname(where)
            shorthash = getattr(emb, "shorthash", None)
            if parent.lower().endswith(".safetensors"):
                where = f"{BUNDLE_SOURCE}{parent}"
            elif not getattr(emb, "filename", "") and type(shorthash).__name__ == "BundledTIHash":
                # A1111's built-in Lora registers a bundle's embeddings without a filename (it passes
                # ``filename=``, which create_embedding_from_data does not keep); its BundledTIHash
                # carries the LoRA's name, and the entry stays after the tagged generation.
                where = f"{BUNDLE_SOURCE}{getattr(shorthash, 'hash', '') or shorthash} (loaded by the webui's Lora)"
            taken.setdefault(str(name).lower(), where)
    return taken


def taken_names(webui: Any, config: TrainConfig, lora_dir: str, variants: Sequence[str] = ()) -> dict[str, str]:
    """Every name a new embedding must not take in the webui (checklist 18): its embeddings (loaded or
    skipped, and the files of its embeddings folder) and the bundles and LoRA aliases of its Lora folder."""
    from pivotal.formats.name_registry import taken_names_for_run

    cmd_opts = getattr(getattr(webui, "shared", None), "cmd_opts", None)
    embeddings_dir = getattr(cmd_opts, "embeddings_dir", "") or ""
    scanned, _ = taken_names_for_run(config.output_name, [lora_dir], [embeddings_dir] if embeddings_dir else [],
                                     variants=variants)
    own = [str(Path(lora_dir) / f"{name}.safetensors") for name in (config.output_name, *variants)]
    # the webui keeps a bundle's embeddings registered after a generation: retraining it (or a
    # variant of the same sweep) is no clash
    known = {k: v for k, v in taken_embedding_names(webui).items() if not any(o in v for o in own)}
    return {**scanned, **known}


def published_path(config: TrainConfig, lora_dir: str) -> Path:
    """Where a run's bundle is published for the webui's Lora loader."""
    return Path(lora_dir) / f"{config.output_name}.safetensors"


def check_publishable(config: TrainConfig, lora_dir: str) -> None:
    """Refuse a bundle name that would overwrite a LoRA Pivotal did not write."""
    target = published_path(config, lora_dir)
    if target.exists() and not _made_by_pivotal(target):
        raise ConfigError(f"{target} already exists and was not written by Pivotal; choose another bundle name "
                          "(setting: output_name)")


def _made_by_pivotal(path: Path) -> bool:
    from pivotal.formats.safetensors_io import read_header

    try:
        return "pivotal.format" in read_header(path).metadata
    except (PivotalError, OSError):
        return False


def publish(bundle_path: str, target: Path) -> str:
    """Copy the bundle into the Lora folder (via a temporary name, so the loader never sees half a file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    shutil.copyfile(bundle_path, tmp)
    os.replace(tmp, target)
    return str(target)


def refresh_lora_list(webui: Any) -> None:
    """Have the Lora extension rescan its folder (no-op without it)."""
    if webui.networks is not None and hasattr(webui.networks, "list_available_networks"):
        webui.networks.list_available_networks()


def _progress_api() -> Any:
    return optional_webui_module("progress")


def run_in_webui(config: TrainConfig, host: Any, on_event: Callable[[ProgressEvent], None],
                 stop: threading.Event, resume: Optional[str] = None,
                 train_fn: Optional[Callable[..., TrainResult]] = None,
                 lora_dir: Optional[str] = None, variants: Sequence[str] = ()) -> TrainResult:
    """The trainer, run through the webui's queue and progress state (see the module docstring).
    ``variants``: the other runs of a sweep or queue, whose published bundles may share this
    run's embedding names."""
    if train_fn is None:
        from pivotal.training.trainer import train as train_fn
    webui = host.webui
    lora_dir = lora_dir if lora_dir is not None else webui_paths()["lora_dir"]
    check_publishable(config, lora_dir)
    lock = getattr(webui.call_queue, "queue_lock", None) if webui.call_queue is not None else None
    progress = _progress_api()
    tid = task_id(config, uuid.uuid4().hex[:8])
    if progress is not None:
        progress.add_task_to_queue(tid)
    with _task_lock:
        _current_task[0] = tid
    try:
        with lock if lock is not None else contextlib.nullcontext():
            state = webui.shared.state
            state.begin(job=tid)
            if progress is not None:
                progress.start_task(tid)
            state.job_count = config.steps
            try:
                result = train_fn(config, host, on_event=_StateBridge(state, on_event, stop, config.steps),
                                  stop=stop, resume=resume, taken_names=taken_names(webui, config, lora_dir, variants),
                                  variants=variants)
                result = _published(result, lora_dir, on_event)
                notify = getattr(host, "published", None)  # Forge: a rewritten LoRA must be re-read
                if result.bundle_path and callable(notify):
                    notify(result.bundle_path)
                return result
            finally:
                refresh_lora_list(webui)
                if progress is not None:
                    progress.finish_task(tid)
                state.end()
    finally:
        with _task_lock:
            _current_task[0] = ""


def _published(result: TrainResult, lora_dir: str, on_event: Callable[[ProgressEvent], None]) -> TrainResult:
    """``result`` with its bundle copied into the Lora folder under the same file name (a run cut
    short keeps its ``-stepNNNNNN`` name, so it never replaces the last complete bundle); the
    result then points at the published copy. A foreign file of that name is left alone."""
    if not result.bundle_path:
        return result
    target = Path(lora_dir) / Path(result.bundle_path).name
    if target.exists() and not _made_by_pivotal(target):
        warning = f"not published: {target} exists and was not written by Pivotal; the bundle is {result.bundle_path}"
        on_event(ProgressEvent("warning", step=result.steps_done, total=result.total_steps, message=warning))
        return dataclasses.replace(result, warnings=[*result.warnings, warning])
    return dataclasses.replace(result, bundle_path=publish(result.bundle_path, target))


class _StateBridge:
    """Forwards trainer events to the job and mirrors them on the webui's ``shared.state``."""

    def __init__(self, state: Any, forward: Callable[[ProgressEvent], None], stop: threading.Event, steps: int) -> None:
        self.state, self.forward, self.stop, self.steps = state, forward, stop, steps

    def __call__(self, ev: ProgressEvent) -> None:
        self.forward(ev)
        state = self.state
        if ev.kind == "step":
            state.job_no = ev.step
            state.job_count = ev.total or self.steps
            loss = "" if ev.loss is None else f"loss {ev.loss:.4f}"
            state.textinfo = f"Pivotal: step {ev.step}/{ev.total} {loss}".strip()
        elif ev.kind == "validation" and "validation_loss" in ev.data:
            state.textinfo = f"Pivotal: step {ev.step}/{ev.total} validation loss {ev.data['validation_loss']:.4f}"
        elif ev.kind == "preview" and ev.image is not None:
            state.assign_current_image(ev.image)
        if getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False):
            self.stop.set()
