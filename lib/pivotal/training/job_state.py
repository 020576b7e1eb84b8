"""What the training job knows of its run: the state its snapshots are made from.

:class:`RunState` is filled by :class:`pivotal.training.job.TrainingJob` from the trainer's events
(under the job's lock); :class:`Preview` is one preview image the gallery shows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

from pivotal.training.queue_job import QueueProgress

#: states of a job, as :meth:`pivotal.training.job.TrainingJob.status` reports them
IDLE, RUNNING, FINISHED, FAILED = "idle", "running", "finished", "failed"


@dataclass
class Preview:
    """A preview image the trainer made, with the step and the prompt it shows."""

    image: Any
    step: int
    caption: str
    #: where the trainer saved it ("" when it did not)
    path: str = ""


@dataclass
class RunState:
    """Everything one run has reported so far (guarded by the job's lock)."""

    run_id: int
    state: str = RUNNING
    result_status: str = ""
    step: int = 0
    total: int = 0
    loss: Optional[float] = None
    smoothed_loss: Optional[float] = None
    losses: list[float] = field(default_factory=list)
    smoothed_losses: list[float] = field(default_factory=list)
    #: [step, validation loss] of each evaluation (none without a validation set)
    validation_losses: list[list[float]] = field(default_factory=list)
    lrs: dict[str, float] = field(default_factory=dict)
    #: the last step's gradient norm before clipping (None: clipping off, or no step yet)
    grad_norm: Optional[float] = None
    eta_s: Optional[float] = None
    phase: str = ""
    message: str = ""
    warnings: list[str] = field(default_factory=list)
    bundle_path: str = ""
    saved_paths: list[str] = field(default_factory=list)
    preflight: dict[str, Any] = field(default_factory=dict)
    previews: list[Preview] = field(default_factory=list)
    preview_count: int = 0
    started_at: float = field(default_factory=time.time)
    ended_at: Optional[float] = None
    stop_requested: bool = False
    config: dict[str, Any] = field(default_factory=dict)
    #: [step, drift %] of each evaluation with ``validation_drift`` on
    validation_drifts: list[list[float]] = field(default_factory=list)
    #: the queue or sweep this job trains (None: a single run)
    queue: Optional[QueueProgress] = None

    def resume_history(self, history: dict[str, Any]) -> None:
        """A resumed run's earlier steps and evaluations (the trainer's "start" event): the chart
        goes on from them instead of restarting."""
        from pivotal.training.progress import LossSmoother

        smoother = LossSmoother()
        self.losses = [float(v) for v in history.get("losses", [])]
        self.smoothed_losses = [smoother.update(v) for v in self.losses]
        self.validation_losses = [[int(s), float(v)] for s, v in history.get("validation_losses", [])]
        self.validation_drifts = [[int(s), float(v)] for s, v in history.get("validation_drifts", [])]

    def reset_for_next_run(self) -> None:
        """A queue's next run begins: its chart, losses and previews start empty."""
        self.step, self.total, self.loss, self.smoothed_loss, self.eta_s = 0, 0, None, None, None
        self.losses, self.smoothed_losses, self.validation_losses, self.validation_drifts = [], [], [], []
        self.lrs, self.preflight, self.bundle_path, self.previews = {}, {}, "", []
        self.grad_norm = None
