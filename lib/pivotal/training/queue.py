"""A queue of training runs: every config file of a folder, one after another, on one loaded model.

``run_queue(folder, host, build)`` trains each ``*.toml`` / ``*.json`` config of ``folder`` (name
order; ``queue-summary.json`` is the queue's own record and ``sweep-grid.json`` a sweep's grid's, not
configs) and records each outcome in
``folder/queue-summary.json`` after every run, atomically. Run again, it picks up where it stopped:

* a run recorded as completed, whose config file is unchanged (sha256) and whose bundle is still
  there, is skipped;
* a run that was interrupted (Ctrl-C, or a killed process with ``save_every``) resumes from its
  newest ``NAME-stepNNNNNN.resume.safetensors``: the same batches, noise and timesteps as an
  uninterrupted run;
* a failed run (bad settings, dataset refused, diverged) is retried; the queue goes on to the next
  run after a failure, and stops at an interrupt.

The model is loaded once by the caller; each run restores it on exit (the trainer's training
session), so the runs do not see each other's LoRA.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pivotal.errors import ConfigError, PivotalError
from pivotal.formats.png import write_json
from pivotal.host_api import TrainingHost
from pivotal.training.config import TrainConfig
from pivotal.training.config_file import load_config_file
from pivotal.training.progress import EventSink, ProgressEvent, TrainResult
from pivotal.training.trainer import train

SUMMARY_FILE = "queue-summary.json"
#: a sweep's grid record, written next to its configs (:mod:`pivotal.inference.sweep_grid`); not a config
SWEEP_GRID_RECORD = "sweep-grid.json"
CONFIG_SUFFIXES = (".toml", ".json")
FORMAT = 1
_STEP_FILE = re.compile(r"-step(\d{6,})\.resume\.safetensors$")


@dataclass
class QueueRun:
    """One config's outcome. ``status``: pending, completed, interrupted, stopped, failed;
    ``loss``: mean loss of the run's last window of steps; ``validation_loss`` when the run
    reports one; ``skipped``: completed in an earlier call, not trained again."""

    config: str
    sha256: str = ""
    status: str = "pending"
    steps: int = 0
    total: int = 0
    loss: float | None = None
    validation_loss: float | None = None
    #: the last validation drift in % (loss on plain prompts against the base model's; None: not measured)
    validation_drift: float | None = None
    #: what a sweep varied for this run, NAME=VALUE (empty for a plain queue's run)
    values: list[str] = field(default_factory=list)
    bundle: str = ""
    resumed_from: str = ""
    seconds: float = 0.0
    message: str = ""
    skipped: bool = False
    warnings: list[str] = field(default_factory=list)


def find_configs(folder: str | os.PathLike) -> list[Path]:
    """The config files of a queue folder, in name order; ConfigError when the folder is missing."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such queue folder; put one settings file (.toml or .json) per run in it")
    return sorted(p for p in root.iterdir()
                  if p.is_file() and p.suffix.lower() in CONFIG_SUFFIXES
                  and p.name not in (SUMMARY_FILE, SWEEP_GRID_RECORD)
                  and not p.name.startswith("."))


def queue_config(path: Path, base: dict[str, Any] | None = None) -> TrainConfig:
    """The settings of one queued config file over ``base`` (e.g. the demo's defaults).

    Relative ``data_dir`` / ``out_dir`` / ``validation_dir`` are taken relative to the config's
    folder (so a queue folder can be moved whole); ``output_name`` defaults to the file's stem and
    ``out_dir`` to ``output/`` next to the config, so runs never overwrite each other by default.
    """
    values: dict[str, Any] = dict(base or {})
    values.update(load_config_file(path))
    values.setdefault("output_name", path.stem)
    values.setdefault("out_dir", "output")
    for key in ("data_dir", "out_dir", "validation_dir"):
        if values.get(key) and not Path(str(values[key])).expanduser().is_absolute():
            values[key] = str(path.parent / str(values[key]))
    return TrainConfig.from_dict(values)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def newest_resume_file(cfg: TrainConfig) -> Path | None:
    """The ``NAME-stepNNNNNN.resume.safetensors`` of ``cfg`` with the highest step below the end."""
    best: tuple[int, Path] | None = None
    out = Path(cfg.out_dir)
    if not out.is_dir():
        return None
    for p in out.glob(f"{glob_escape(cfg.output_name)}-step*.resume.safetensors"):
        m = _STEP_FILE.search(p.name)
        if m and p.name == f"{cfg.output_name}-step{m.group(1)}.resume.safetensors":
            step = int(m.group(1))
            if step < cfg.steps and (best is None or step > best[0]):
                best = (step, p)
    return best[1] if best else None


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def load_summary(folder: Path) -> dict[str, QueueRun]:
    """The runs recorded in ``folder/queue-summary.json`` by config name ({} when there is none)."""
    path = folder / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        fields = set(QueueRun.__dataclass_fields__)
        return {r["config"]: QueueRun(**{k: v for k, v in r.items() if k in fields}) for r in doc["runs"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PivotalError(f"{path}: the queue's record is unreadable ({e}); delete it to start the queue over") from e


def write_summary(folder: Path, runs: list[QueueRun], model: str) -> Path:
    """Write ``queue-summary.json`` atomically (temp file, fsync, rename; SaveError on failure)."""
    path = folder / SUMMARY_FILE
    doc = {"format": FORMAT, "model": model, "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "runs": [asdict(r) for r in runs]}
    write_json(path, doc)
    return path


def _is_done(rec: QueueRun | None, sha: str) -> bool:
    return rec is not None and rec.status == "completed" and rec.sha256 == sha and bool(rec.bundle) \
        and Path(rec.bundle).is_file()


def run_queue(folder: str | os.PathLike, host: TrainingHost, build: Callable[[Path], TrainConfig],
              on_event: Callable[[str, ProgressEvent], None] | None = None,
              stop: threading.Event | None = None,
              on_run: Callable[[QueueRun], None] | None = None,
              train_fn: Callable[..., TrainResult] | None = None) -> list[QueueRun]:
    """Train every config of ``folder`` not yet done (see the module docstring); returns the runs.

    ``build(path)``: the TrainConfig of a config file (:func:`queue_config` plus what the caller
    adds). ``on_event(config name, event)``: every trainer event. ``stop``: set it to interrupt the
    current run at its next step (it is saved, and the queue stops). ``on_run``: each finished run.
    ``train_fn``: the trainer (default :func:`pivotal.training.trainer.train`; the webui's runs go
    through its queue and publish their bundles), called as ``train`` is.
    """
    root = Path(folder)
    configs = find_configs(root)
    if not configs:
        raise ConfigError(f"{root}: no config files (.toml / .json) to run")
    stop = stop or threading.Event()
    recorded = load_summary(root)
    runs = [QueueRun(config=p.name, sha256=file_sha256(p)) for p in configs]
    model = str(getattr(host, "label", "") or host.base_model)
    names = _output_names(configs, build)
    for i, (path, run) in enumerate(zip(configs, runs)):
        old = recorded.get(run.config)
        if _is_done(old, run.sha256):
            runs[i] = run = QueueRun(**{**asdict(old), "skipped": True})  # type: ignore[arg-type]
            if on_run:
                on_run(run)
            continue
        if stop.is_set():
            break
        _run_one(path, run, host, build, on_event, stop, names, train_fn or train)
        write_summary(root, runs, model)
        if on_run:
            on_run(run)
        if run.status == "interrupted":
            break
    write_summary(root, runs, model)
    return runs


def _output_names(configs: list[Path], build: Callable[[Path], TrainConfig]) -> list[str]:
    """The bundle names the queue's configs write (a config that does not build has none here;
    its run reports why)."""
    names = []
    for path in configs:
        try:
            names.append(build(path).output_name)
        except PivotalError:
            continue
    return names


def _run_one(path: Path, run: QueueRun, host: TrainingHost, build: Callable[[Path], TrainConfig],
             on_event: Callable[[str, ProgressEvent], None] | None, stop: threading.Event,
             queue_names: Sequence[str] = (), train_fn: Callable[..., TrainResult] = train) -> None:
    started = time.perf_counter()
    sink: EventSink = (lambda e: on_event(run.config, e)) if on_event else (lambda e: None)
    try:
        cfg = build(path).validate()
        run.values = list(cfg.sweep)
        resume = newest_resume_file(cfg)
        run.resumed_from = str(resume) if resume else ""
        run.total = cfg.steps
        # The queue's runs are variants of one concept: they may share embedding names.
        variants = [n for n in queue_names if n != cfg.output_name]
        result = train_fn(cfg, host, on_event=sink, stop=stop, resume=str(resume) if resume else None,
                          variants=variants)
    except PivotalError as e:
        run.status, run.message = "failed", str(e)
    else:
        summary = result.summary()
        run.status, run.steps, run.total = result.status, result.steps_done, result.total_steps
        run.loss, run.bundle, run.message = result.last_smoothed_loss, result.bundle_path, result.message
        run.validation_loss = summary.get("validation_loss", summary.get("last_validation_loss"))
        run.validation_drift = summary.get("validation_drift")
        run.warnings = list(result.warnings)
    run.seconds = round(time.perf_counter() - started, 3)


def format_table(runs: list[QueueRun]) -> str:
    """The queue as a plain-text table: config, status, steps, loss, validation loss, bundle."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    rows = [["config", "status", "steps", "loss", "val loss", "bundle"]]
    for r in runs:
        status = r.status + (" (earlier)" if r.skipped else "") + (" (resumed)" if r.resumed_from and not r.skipped
                                                                     else "")
        rows.append([r.config, status, f"{r.steps}/{r.total}" if r.total else "-", num(r.loss),
                     num(r.validation_loss), r.bundle or (r.message[:60] if r.message else "-")])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
