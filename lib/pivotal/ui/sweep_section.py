"""The Train tab's "Sweep" section: vary one or two settings of the form, one run per combination.

Each row of the section is a setting (a dropdown of the settings a sweep may vary) and its values
(``1e-6, 1e-5, 1e-4``), checked against the setting's declaration exactly as ``pivotal sweep
--vary`` checks them (:func:`pivotal.training.sweep.parse_vary`: the error names the setting). The
sweep starts from the form's current settings, is written under ``<out_dir>/sweeps/`` and runs
through the tab's training job as one queue (:func:`pivotal.training.sweep.start_sweep`): the
progress block shows one bar for the queue and the table of its runs, Interrupt stops the sweep,
"Start sweep" again with the same settings resumes it. Once runs have finished, "Sweep grid"
renders the variants x parts grid through ``render_grid(folder, prompt, seed)`` (the host's own
txt2img in the webui, Pivotal's render in the app).
"""

from __future__ import annotations

import html
from typing import Any, Callable, Iterator, Optional

from pivotal.errors import ConfigError, PivotalError
from pivotal.training.config import TrainConfig
from pivotal.training.settings import declared
from pivotal.ui.form_numbers import form_whole

#: rows of the section (a sweep varies at most two settings)
VARY_ROWS = 2
#: settings a sweep may not vary (as pivotal.training.sweep.NOT_VARIED, kept here so the UI imports no torch)
NOT_VARIED = ("output_name", "out_dir", "data_dir", "validation_dir", "sweep")

#: (sweep folder, prompt, seed, sampling steps, size in px or 0 = the variants' training size)
#: -> (sheet PNG path, record JSON path)
SweepGridFn = Callable[[str, str, int, int, int], "tuple[Any, Any]"]
#: the grid's sampling steps in the section until the user changes them
GRID_STEPS = 20


def sweepable_settings() -> list[str]:
    """The names of the settings a sweep may vary (numbers, switches, choices), in declaration order."""
    return [s.name for s in declared(TrainConfig)
            if s.kind in ("int", "float", "bool", "str") and s.name not in NOT_VARIED]


def varies_from_form(rows: list[tuple[Any, Any]]) -> list[str]:
    """``["te_lr=1e-6,1e-5"]`` from the section's (setting, values) rows; a row with no setting
    is skipped. ConfigError naming the setting when its values are empty, or none is chosen."""
    varies = []
    for name, values in rows:
        name, values = str(name or "").strip(), str(values or "").strip()
        if not name:
            continue
        if not values:
            raise ConfigError(f"sweep {name}: enter its values, separated by commas (e.g. 1e-6, 1e-5, 1e-4)")
        varies.append(f"{name}={values}")
    if not varies:
        raise ConfigError("sweep: choose a setting to vary and enter its values")
    return varies


def build_sweep_section(ids: Callable[[str], str], grid_steps: int = GRID_STEPS) -> dict[str, Any]:
    """Add the section's components to the current Blocks context; returns them by name.
    ``grid_steps``: the grid's sampling steps the section starts with."""
    import gradio as gr

    choices = [""] + sweepable_settings()
    c: dict[str, Any] = {}
    with gr.Accordion("Sweep", open=False, elem_id=ids("sweep")):
        gr.HTML("<div>Train one run per combination of the values below, starting from the settings above, "
                "one after another; then compare them (the table ranks them by validation loss) and render a "
                "variants &times; parts grid. Started again with the same settings, a sweep skips its finished "
                "runs.</div>")
        for i in range(VARY_ROWS):
            with gr.Row():
                c[f"name{i}"] = gr.Dropdown(choices, value="te_lr" if i == 0 else "", label=f"setting {i + 1}",
                                            elem_id=ids(f"sweep-name{i}"))
                c[f"values{i}"] = gr.Textbox("", label="values (comma-separated)", elem_id=ids(f"sweep-values{i}"))
        c["start"] = gr.Button("Start sweep", variant="primary", elem_id=ids("sweep-start"))
        with gr.Row():
            c["prompt"] = gr.Textbox("", label="grid prompt (empty: the embedding names)", scale=3,
                                     elem_id=ids("sweep-prompt"))
            c["seed"] = gr.Number(1, label="grid seed", precision=0, scale=1, elem_id=ids("sweep-seed"))
            c["steps"] = gr.Number(grid_steps, label="grid steps", precision=0, scale=1, elem_id=ids("sweep-steps"))
            # 0: the variants' training resolution (a grid of 15 cells at 512 px is slow on small hardware)
            c["size"] = gr.Number(0, label="grid size (px, 0: the training resolution)", precision=0, scale=1,
                                  elem_id=ids("sweep-size"))
        c["grid"] = gr.Button("Sweep grid (variants x parts)", elem_id=ids("sweep-grid"))
        c["image"] = gr.Image(None, type="pil", label="sweep grid", interactive=False, elem_id=ids("sweep-image"))
        c["info"] = gr.HTML("", elem_id=ids("sweep-info"))
    return c


def sweep_handlers(job: Any, host_provider: Callable[[], Any], form_config: Callable[[tuple], TrainConfig],
                   follow: Callable[..., Iterator[tuple]], busy_update: Callable[[str], tuple],
                   render_grid: Optional[SweepGridFn]) -> dict[str, Callable[..., Any]]:
    """The section's handlers. ``form_config(form values)``: the form's validated settings (the
    sweep is written under its ``out_dir``: ``<out_dir>/sweeps/``);
    ``follow(job, run_id, notice=...)``: the tab's progress updates; ``busy_update(message)``: the
    tab's outputs showing a refusal."""
    from pivotal.training.job import JobBusyError

    def on_start(*values: Any) -> Iterator[tuple]:
        form, rows = values[:-2 * VARY_ROWS], values[-2 * VARY_ROWS:]
        try:
            varies = varies_from_form([(rows[2 * i], rows[2 * i + 1]) for i in range(VARY_ROWS)])
            from pivotal.training.sweep import start_sweep

            config = form_config(form)
            run_id, _ = start_sweep(job, config, varies, config.out_dir, host_provider)
        except JobBusyError as e:
            yield from follow(job, job.status()["run_id"], notice=str(e))
            return
        except PivotalError as e:
            yield busy_update(str(e))
            return
        yield from follow(job, run_id)

    def on_grid(prompt: str, seed: Any, steps: Any = GRID_STEPS, size: Any = 0) -> tuple[Any, str]:
        queue = job.status().get("queue") or {}
        if queue.get("kind") != "sweep":
            return None, _error("no sweep yet: start one above, then render its grid")
        if job.running:
            return None, _error("the sweep is still running; render its grid when it ends")
        if render_grid is None:
            return None, _error("this host renders no grid")
        try:
            steps_i, size_i = grid_numbers(steps, size)
            png, record = render_grid(str(queue["folder"]), str(prompt or ""), int(seed or 0), steps_i, size_i)
        except PivotalError as e:
            return None, _error(str(e))
        from PIL import Image

        with Image.open(png) as im:
            sheet = im.copy()
        return sheet, (f'<div id="pivotal-sweep-grid-done">sweep grid: <code>{html.escape(str(png))}</code>, '
                       f"record: <code>{html.escape(str(record))}</code></div>")

    return {"sweep": on_start, "sweep_grid": on_grid}


def grid_numbers(steps: Any, size: Any) -> tuple[int, int]:
    """The section's grid steps and size as whole numbers; ConfigError naming the field otherwise
    (steps >= 1; size 0, or a multiple of 8 from 64)."""
    steps_i = form_whole("grid steps", GRID_STEPS if steps in (None, "") else steps)
    size_i = form_whole("grid size", size or 0)
    if steps_i < 1:
        raise ConfigError(f"grid steps {steps!r}: enter a whole number of sampling steps, 1 or more")
    if size_i and (size_i < 64 or size_i % 8):
        raise ConfigError(f"grid size {size!r}: enter 0 (the variants' training resolution) or a multiple of 8 "
                          "from 64")
    return steps_i, size_i


def _error(text: str) -> str:
    return f'<div class="pivotal-message" data-kind="error">{html.escape(text)}</div>'
