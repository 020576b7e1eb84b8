"""The grid after a sweep: its variants × the bundle's parts, one prompt, one seed.

Rows are the sweep's finished runs, best validation loss first (the table's order); columns are
the ablation grid's (:data:`pivotal.inference.grid.COLUMNS`: full / UNet only / TE only /
embeddings only / base), so each row reads as that variant's ablation and each column compares
the variants on one part. Every cell uses the same prompt and seed: the only differences are the
variant (down) and the part (across). The plan is an ordinary :class:`GridPlan` (its
``row_bundles`` name each row's bundle), so any host renders it with its own txt2img
(:func:`pivotal.inference.grid.render_grid`) and :func:`pivotal.inference.grid_sheet.save_grid`
writes the sheet. It is saved next to the sweep: ``<sweep folder>/sweep-grid.png`` + ``.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from pivotal.errors import ConfigError, NotFoundError
from pivotal.formats.bundle import bundle_name, read_bundle
from pivotal.inference.grid import COLUMNS, GridPlan, GridResult, Renderer, host_renderer, plan_grid, render_grid
from pivotal.training.queue import SWEEP_GRID_RECORD, QueueRun, load_summary
from pivotal.training.sweep import ranked

#: the sheet's file name in the sweep folder (its record: the same name with .json, which the queue
#: knows is no config)
GRID_FILE = Path(SWEEP_GRID_RECORD).with_suffix(".png").name


def finished_variants(folder: str | os.PathLike) -> list[QueueRun]:
    """The sweep's runs that saved a bundle (completed, the bundle still there), best validation
    loss first. NotFoundError when the folder has no record or no finished run yet."""
    runs = list(load_summary(Path(folder)).values())
    if not runs:
        raise NotFoundError(f"{folder}: no sweep record (queue-summary.json) there; run the sweep first")
    done = [r for r in runs if r.status == "completed" and r.bundle and Path(r.bundle).is_file()]
    if not done:
        raise NotFoundError(f"{folder}: no run of the sweep has finished yet; its grid needs at least one bundle")
    return ranked(done)


def row_label(run: QueueRun) -> str:
    """``te_lr=1e-05 (val 0.1234)``: what the variant varied, and its validation loss."""
    label = ", ".join(run.values) or Path(run.bundle).stem
    extras = []
    if run.validation_loss is not None:
        extras.append(f"val {run.validation_loss:.4f}")
    if run.validation_drift is not None:
        extras.append(f"drift {run.validation_drift:+.1f}%")
    return f"{label} ({', '.join(extras)})" if extras else label


def sweep_grid_plan(runs: Sequence[QueueRun], prompt: str = "", columns: Sequence[str] = tuple(COLUMNS),
                    seed: int = 0, negative: str = "", strength: float = 1.0) -> GridPlan:
    """The variants × parts plan of ``runs`` (each with its bundle); ``prompt``: every row's (empty:
    the first bundle's embedding names); the bundles' ``<lora:…>`` names are their file stems."""
    if not runs:
        raise ConfigError("the sweep grid needs at least one finished run")
    if not prompt.strip():
        prompt = " ".join(sorted(read_bundle(runs[0].bundle).embeddings))
    plan = plan_grid(bundle_name(runs[0].bundle), [prompt.strip()] * len(runs), columns, seed, negative, strength)
    plan.seeds = [seed] * len(runs)  # one seed: the rows differ by their variant only
    plan.row_bundles = [bundle_name(r.bundle) for r in runs]
    plan.row_labels = [row_label(r) for r in runs]
    return plan


def lora_dirs(runs: Sequence[QueueRun]) -> list[str]:
    """The folders the variants' bundles are in (for a renderer that looks LoRAs up by name)."""
    return sorted({str(Path(r.bundle).parent) for r in runs})


def sweep_grid_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / GRID_FILE


def save_sweep_grid(folder: str | os.PathLike, result: GridResult) -> tuple[Path, Path]:
    """Write the sheet and its record next to the sweep; (png, json)."""
    from pivotal.inference.grid_sheet import save_grid

    return save_grid(sweep_grid_path(folder), result)


def render_sweep_grid(folder: str | os.PathLike, render_for: Callable[[list[QueueRun]], Renderer], prompt: str = "",
                      seed: int = 0, columns: Sequence[str] = tuple(COLUMNS), negative: str = "",
                      strength: float = 1.0, should_stop: Callable[[], bool] | None = None) -> tuple[Path, Path]:
    """Plan, render and save the sweep's grid; (png, json). ``render_for(runs)``: the host's
    renderer for these variants (e.g. :func:`standalone_renderer`, or the webui's txt2img)."""
    runs = finished_variants(folder)
    plan = sweep_grid_plan(runs, prompt, columns, seed, negative, strength)
    return save_sweep_grid(folder, render_grid(plan, render_for(runs), should_stop=should_stop))


def standalone_renderer(host: Any, steps: int = 20, width: int | None = None, height: int | None = None,
                        guidance: float = 7.0) -> Callable[[list[QueueRun]], Renderer]:
    """Pivotal's own render (:func:`pivotal.inference.grid.host_renderer`) on ``host``, the
    variants' bundles looked up in their folders: the app's and the CLI's sweep grid."""
    return lambda runs: host_renderer(host, lora_dirs(runs), steps, width, height, guidance)
