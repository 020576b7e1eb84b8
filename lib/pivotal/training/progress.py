"""Progress events the trainer emits, and the result of a run.

Every front end (CLI ``--json``, the app, the webui tab and API) consumes the same events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

#: kinds of event, in the order a run can produce them
EVENT_KINDS = ("preflight", "start", "step", "phase", "validation", "save", "preview", "warning", "done")
#: how a run ended
STATUSES = ("completed", "interrupted", "stopped", "failed")


@dataclass
class ProgressEvent:
    """One thing that happened. ``step`` counts optimizer steps done (0 before the first)."""

    kind: str
    step: int = 0
    total: int = 0
    loss: float | None = None
    smoothed_loss: float | None = None
    lrs: dict[str, float] = field(default_factory=dict)
    eta_s: float | None = None
    phase: str = ""
    message: str = ""
    path: str = ""
    #: a preview image (PIL) for "preview" events; never serialised
    image: Any = None
    #: extra JSON-able data (the pre-flight report, ``{"validation_loss": x}``, the final summary)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = {"event": self.kind, "step": self.step, "total": self.total}
        for k in ("loss", "smoothed_loss", "eta_s"):
            v = getattr(self, k)
            if v is not None:
                d[k] = round(v, 6)
        for k in ("lrs", "phase", "message", "path", "data"):
            v = getattr(self, k)
            if v:
                d[k] = v
        return d


EventSink = Callable[[ProgressEvent], None]


@dataclass
class TrainResult:
    """How a run ended. ``bundle_path`` is empty when nothing was saved."""

    status: str
    steps_done: int
    total_steps: int
    bundle_path: str = ""
    #: mean loss of the first / last window of steps (see :func:`window_means`)
    first_smoothed_loss: float | None = None
    last_smoothed_loss: float | None = None
    losses: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    message: str = ""
    #: (step, validation loss) of each evaluation of this session (none without a validation set)
    validation_losses: list[tuple[int, float]] = field(default_factory=list)
    #: (step, drift in %) of each evaluation with ``validation_drift`` on
    validation_drifts: list[tuple[int, float]] = field(default_factory=list)

    @property
    def validation_loss(self) -> float | None:
        """The last validation loss (None without a validation set)."""
        return self.validation_losses[-1][1] if self.validation_losses else None

    @property
    def validation_drift(self) -> float | None:
        """The last drift in % (None when not measured)."""
        return self.validation_drifts[-1][1] if self.validation_drifts else None

    def summary(self) -> dict[str, Any]:
        return {"status": self.status, "steps": self.steps_done, "total": self.total_steps,
                "bundle": self.bundle_path, "first_smoothed_loss": self.first_smoothed_loss,
                "last_smoothed_loss": self.last_smoothed_loss, "validation_loss": self.validation_loss,
                "validation_drift": self.validation_drift,
                "warnings": self.warnings, "message": self.message}


def window_means(losses: list[float]) -> tuple[float | None, float | None]:
    """Mean loss of the first and of the last window of steps (a quarter of the run, 5 to 50 steps).

    This is the "first / last smoothed loss" of a run's summary: single-step diffusion losses
    swing with the random timestep, so only means over many steps show whether it learned.
    """
    if not losses:
        return None, None
    w = max(1, min(50, max(5, len(losses) // 4), len(losses)))
    return sum(losses[:w]) / w, sum(losses[-w:]) / w


class LossSmoother:
    """Exponential moving average of the loss, bias-corrected so early values are meaningful.

    Single-step diffusion losses are dominated by the random timestep; a user needs the trend.
    """

    def __init__(self, beta: float = 0.95) -> None:
        self.beta = beta
        self._avg = 0.0
        self._n = 0

    def update(self, loss: float) -> float:
        self._n += 1
        self._avg = self.beta * self._avg + (1 - self.beta) * loss
        return self._avg / (1 - self.beta ** self._n)  # value(), never None after an update

    def value(self) -> float | None:
        if self._n == 0:
            return None
        return self._avg / (1 - self.beta ** self._n)

    def state(self) -> dict[str, float]:
        return {"avg": self._avg, "n": self._n}

    def load_state(self, state: dict[str, float]) -> None:
        self._avg, self._n = float(state["avg"]), int(state["n"])
