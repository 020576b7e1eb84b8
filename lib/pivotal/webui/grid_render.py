"""The ablation grid rendered by the webui itself: each cell is one txt2img generation.

Every cell goes through the webui's ``processing.StableDiffusionProcessingTxt2Img`` and
``process_images`` with the txt2img scripts runner and its always-on scripts at their default
values, exactly as ``POST /sdapi/v1/txt2img`` builds a generation. So the webui's Lora loader reads
each cell's ``<lora:…:te=…:unet=…>`` tag and Pivotal's bundle script registers the bundle's
embeddings the way they are in a user's generation. Nothing is saved by the webui
(``do_not_save_samples`` / ``do_not_save_grid``); the sheet is saved by
:func:`pivotal.inference.grid_sheet.save_grid`.

The whole grid holds the webui's ``queue_lock``, so it never overlaps a training run or another
generation. The webui's Interrupt (``shared.state.interrupted``) stops it between cells; a cell that
was being sampled when it was pressed is dropped (its picture is unfinished), and the result is
marked interrupted. A1111, Forge and reForge share these entry points; the webui handle
(:func:`pivotal.hosts.webuis.load_webui`) gives the model and modules of each.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pivotal.errors import ConfigError
from pivotal.hosts.a1111.webui import optional_webui_module
from pivotal.inference.grid import GridCell, GridPlan, GridResult, Renderer, render_grid

#: the ``shared.state.job`` of a grid's generations
GRID_JOB = "pivotal-grid"


@dataclass(frozen=True)
class GridSettings:
    """How each cell is sampled: the webui's own txt2img settings."""

    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str = "Euler a"
    scheduler: str = ""  # "" = the sampler's own (A1111 >= 1.9 "Automatic")
    width: int = 512
    height: int = 512

    def validate(self) -> "GridSettings":
        """This, or ConfigError naming the field and its range."""
        if not 1 <= int(self.steps) <= 150:
            raise ConfigError(f"steps must be 1..150, got {self.steps} (field: steps)")
        if not 0 < float(self.cfg_scale) <= 30:
            raise ConfigError(f"cfg_scale must be in (0, 30], got {self.cfg_scale} (field: cfg_scale)")
        for name, v in (("width", self.width), ("height", self.height)):
            if not 64 <= int(v) <= 2048 or int(v) % 8:
                raise ConfigError(f"{name} must be a multiple of 8 in 64..2048, got {v} (field: {name})")
        if not str(self.sampler_name).strip():
            raise ConfigError("sampler_name must name one of the webui's samplers, e.g. 'Euler a' "
                              "(field: sampler_name)")
        return self


@dataclass
class WebuiGridResult:
    """The cells rendered, and whether the webui's Interrupt cut the grid short."""

    result: GridResult
    interrupted: bool


def default_script_args(runner: Any) -> list[Any]:
    """The txt2img scripts' arguments at their UI defaults, as the webui's API builds them for a
    request with no script arguments (``Api.init_default_script_args``): slot 0 (the selected
    script) is 0 = none, every always-on script's slots hold its components' default values."""
    scripts = list(getattr(runner, "scripts", []) or [])
    args: list[Any] = [None] * max([1] + [int(getattr(s, "args_to", 0) or 0) for s in scripts])
    args[0] = 0
    import gradio as gr

    with gr.Blocks():  # the scripts' ui() builds components, which need a Blocks context
        for script in scripts:
            components = script.ui(script.is_img2img)
            if components:
                args[script.args_from:script.args_to] = [c.value for c in components]
    return args


def _txt2img_runner() -> Any:
    """The webui's txt2img scripts runner (None where this webui has none: glue tests' fakes)."""
    scripts = optional_webui_module("scripts")
    return getattr(scripts, "scripts_txt2img", None)


def webui_renderer(webui: Any, settings: GridSettings, runner: Any = None,
                   on_cell_done: Optional[Callable[[bool], None]] = None) -> Renderer:
    """A :data:`~pivotal.inference.grid.Renderer` drawing a cell with the webui's txt2img.

    ``runner``: the scripts runner (default: the webui's txt2img one). ``on_cell_done(interrupted)``
    is told after each cell whether the webui's Interrupt was pressed while it was sampled.
    """
    proc, state = webui.processing, webui.shared.state
    runner = runner if runner is not None else _txt2img_runner()
    script_args = tuple(default_script_args(runner)) if runner is not None else ()
    cls = proc.StableDiffusionProcessingTxt2Img
    # A1111 >= 1.9 and the Forge family have a scheduler field; older A1111 has none
    extra = ({"scheduler": settings.scheduler}
             if settings.scheduler and "scheduler" in getattr(cls, "__dataclass_fields__", {}) else {})

    def render(cell: GridCell) -> tuple[Any, str]:
        # shared.sd_model, as the webui's API passes it (Forge loads its model inside process_images)
        p = cls(sd_model=webui.shared.sd_model, prompt=cell.prompt, negative_prompt=cell.negative, seed=int(cell.seed),
                steps=int(settings.steps), cfg_scale=float(settings.cfg_scale), width=int(settings.width),
                height=int(settings.height), sampler_name=settings.sampler_name, batch_size=1, n_iter=1,
                do_not_save_samples=True, do_not_save_grid=True, **extra)
        processed, interrupted = None, False
        try:
            p.is_api = True  # as the API's generations: the UI-only script setup (seed/sampler rows) is skipped
            if runner is not None:
                p.scripts = runner
                p.script_args = script_args
            state.begin(job=GRID_JOB)
            try:
                processed = proc.process_images(p)
            finally:
                interrupted = bool(getattr(state, "interrupted", False) or getattr(state, "stopping_generation", False))
                state.end()
                total = getattr(webui.shared, "total_tqdm", None)  # the console's bar, as the API clears it
                if total is not None and hasattr(total, "clear"):
                    total.clear()
                if on_cell_done is not None:
                    on_cell_done(interrupted)
        finally:
            p.close()
        images = list(getattr(processed, "images", []) or [])
        if not images and interrupted:
            # stopped before sampling began: a blank stand-in, dropped as the interrupted cell
            from PIL import Image

            return Image.new("RGB", (int(settings.width), int(settings.height))), ""
        if not images:
            raise ConfigError(f"the webui returned no image for the grid cell {cell.prompt!r}; see the webui's "
                              "console for the reason")
        infotexts = list(getattr(processed, "infotexts", []) or [])
        return images[0], str(infotexts[0] if infotexts else getattr(processed, "info", ""))

    return render


def queue_lock(webui: Any) -> contextlib.AbstractContextManager[Any]:
    """The webui's generation queue lock (a null context where it has none)."""
    call_queue = getattr(webui, "call_queue", None)
    lock = getattr(call_queue, "queue_lock", None) if call_queue is not None else None
    return lock if lock is not None else contextlib.nullcontext()


def render_in_webui(webui: Any, plan: GridPlan, settings: GridSettings, runner: Any = None) -> WebuiGridResult:
    """Render ``plan`` through the webui's txt2img under its queue lock, stopping at its Interrupt.

    ``runner``: the scripts runner (default: the webui's txt2img one).
    """
    settings.validate()
    state = webui.shared.state
    stopped: list[bool] = [False]

    def cell_done(interrupted: bool) -> None:
        stopped[0] = stopped[0] or interrupted

    def should_stop() -> bool:
        # an Interrupt pressed between cells (state.begin resets the flag, so read it before)
        return stopped[0] or bool(getattr(state, "interrupted", False))

    last: list[GridCell] = []
    with queue_lock(webui):
        # a flag left by an earlier generation's Interrupt (state.begin clears it; state.end does not)
        for flag in ("interrupted", "stopping_generation"):
            if hasattr(state, flag):
                setattr(state, flag, False)
        render = webui_renderer(webui, settings, runner, on_cell_done=cell_done)
        result = render_grid(plan, render, progress=lambda i, n, cell: last.append(cell), should_stop=should_stop)
    interrupted = stopped[0] or bool(getattr(state, "interrupted", False))
    if stopped[0] and last:
        # the cell being sampled when Interrupt was pressed is unfinished: leave it out
        key = (last[-1].row, last[-1].column)
        result.images.pop(key, None)
        result.infotexts.pop(key, None)
    return WebuiGridResult(result, interrupted)
