"""A queue (or sweep) of runs as the training job follows it: one bar for the whole queue, a table
of the runs.

:meth:`pivotal.training.job.TrainingJob.start_queue` trains a queue folder's configs one after
another (:func:`pivotal.training.queue.run_queue`: finished runs skipped, an interrupted run
resumed) as *one* job, so the one-run-at-a-time rule, Interrupt and the status snapshot cover the
whole queue. :class:`QueueProgress` is its part of the snapshot (``status()["queue"]``): which run
is going (``index`` of ``count``, 1-based), the steps of the whole queue (``step`` / ``total``:
finished and skipped runs count whole) and one row per run: ``name``, ``values`` (what a sweep
varied), ``state`` (pending, running, completed, interrupted, failed, stopped; ``skipped`` when an
earlier call finished it), ``steps`` / ``total``, ``loss``, ``validation_loss``,
``validation_drift``, ``bundle``, ``message``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

#: the ``kind`` of a queue in the snapshot
QUEUE, SWEEP = "queue", "sweep"


@dataclass
class QueueRow:
    """One run of the queue as the table shows it."""

    config: str
    name: str
    values: list[str] = field(default_factory=list)
    state: str = "pending"
    steps: int = 0
    total: int = 0
    loss: float | None = None
    validation_loss: float | None = None
    validation_drift: float | None = None
    bundle: str = ""
    message: str = ""
    skipped: bool = False


@dataclass
class QueueProgress:
    """What the job knows of its queue (guarded by the job's lock, like the run state)."""

    kind: str
    folder: str
    name: str
    rows: list[QueueRow]
    index: int = 0  # 1-based; 0 before the first run starts

    @classmethod
    def plan(cls, folder: str | Path, build: Callable[[Path], Any], kind: str = QUEUE,
             name: str = "") -> "QueueProgress":
        """The rows of the configs in ``folder`` (:func:`pivotal.training.queue.find_configs`),
        each with its bundle name, sweep values and steps from ``build(path)``; a config that does
        not build keeps its file name and 0 steps (its run reports why)."""
        from pivotal.errors import PivotalError
        from pivotal.training.queue import find_configs

        rows = []
        for path in find_configs(folder):
            row = QueueRow(config=path.name, name=path.stem)
            try:
                cfg = build(path)
                row.name, row.values, row.total = cfg.output_name, list(cfg.sweep), int(cfg.steps)
            except PivotalError as e:
                row.message = str(e)
            rows.append(row)
        return cls(kind, str(folder), name or Path(folder).name, rows)

    def row(self, config: str) -> QueueRow | None:
        return next((r for r in self.rows if r.config == config), None)

    def begin(self, config: str) -> bool:
        """The run of ``config`` is starting (or resuming); True when it is a new current run."""
        row = self.row(config)
        if row is None or (self.index and self.rows[self.index - 1] is row and row.state == "running"):
            return False
        row.state, row.message = "running", ""
        self.index = self.rows.index(row) + 1
        return True

    def step(self, config: str, step: int, total: int, loss: float | None) -> None:
        row = self.row(config)
        if row is not None:
            row.steps, row.total = step, total or row.total
            if loss is not None:
                row.loss = loss

    def validation(self, config: str, data: dict[str, Any]) -> None:
        row = self.row(config)
        if row is not None:
            row.validation_loss = data.get("validation_loss", row.validation_loss)
            row.validation_drift = data.get("validation_drift", row.validation_drift)

    def finished(self, run: Any) -> None:
        """A :class:`pivotal.training.queue.QueueRun` ended (or was skipped)."""
        row = self.row(run.config)
        if row is None:
            return
        row.state = run.status
        row.skipped = bool(run.skipped)
        row.steps, row.total = run.steps or row.steps, run.total or row.total
        row.loss = run.loss if run.loss is not None else row.loss
        row.validation_loss, row.validation_drift = run.validation_loss, run.validation_drift
        row.values = list(run.values) or row.values
        row.bundle, row.message = run.bundle, run.message

    def stopped(self) -> None:
        """The queue ended: a row still "running" ended with it (the run raised)."""
        for row in self.rows:
            if row.state == "running":
                row.state = "failed"

    def totals(self) -> tuple[int, int]:
        """(steps done, steps in all) over the whole queue: a finished or skipped run counts whole."""
        done = total = 0
        for row in self.rows:
            total += row.total
            done += row.total if row.state == "completed" else min(row.steps, row.total)
        return done, total

    def snapshot(self) -> dict[str, Any]:
        done, total = self.totals()
        return {"kind": self.kind, "name": self.name, "folder": self.folder, "index": self.index,
                "count": len(self.rows), "step": done, "total": total,
                "runs": [asdict(r) for r in self.rows]}


def outcome(runs: list[Any]) -> tuple[str, str]:
    """(job state, result status) of a finished queue: interrupted when a run was; failed when a
    run failed or stopped; else completed."""
    statuses = {r.status for r in runs}
    if "interrupted" in statuses:
        return "finished", "interrupted"
    if statuses & {"failed", "stopped"}:
        return "failed", "failed"
    if not runs or "pending" in statuses:
        return "finished", "interrupted"
    return "finished", "completed"
