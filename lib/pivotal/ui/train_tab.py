"""The Train tab: settings, dataset check, Start / Interrupt, live progress, loss chart, previews.

:func:`build_train_tab` adds its components to the ``gr.Blocks`` (and tab) being built by the
caller, so the standalone app and the webui embed the same tab. The settings' inputs are generated
from their declarations (:mod:`pivotal.ui.setting_widgets`): the "Run" group open at the top, every
other group in an accordion, advanced-only settings in "Advanced". It works in gradio 3.41 and 6:
live progress comes from generator handlers that poll the :class:`TrainingJob` and yield updates
until the run ends (gradio 3.41 has no ``gr.Timer``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import gradio as gr

from pivotal.demo.reward import register as register_demo_reward
from pivotal.errors import PivotalError
from pivotal.training.config import TrainConfig
from pivotal.training.job import RUNNING, JobBusyError, TrainingJob
from pivotal.ui.compat import gallery_kwargs, long_event_kwargs, quick_event_kwargs
from pivotal.ui.dataset_check import check_dataset
from pivotal.ui.loss_chart import render_loss_chart
from pivotal.ui.progress_view import message_html, progress_html, report_html
from pivotal.ui.setting_widgets import setting_rows, setting_widget
from pivotal.ui.sweep_section import GRID_STEPS, VARY_ROWS, SweepGridFn, build_sweep_section, sweep_handlers
from pivotal.ui.train_form import (
    FORM_SECTIONS,
    config_from_form,
    form_field_names,
    form_settings,
    form_values_from_config,
)

HostProvider = Callable[[], Any]

#: the form section that ends with the "resume from" path
RESUME_SECTION = "saving"
#: seconds between progress polls while a run is followed
POLL_S = 0.5
#: the loss chart is redrawn at most this often (each redraw sends a new image to the page)
CHART_EVERY_S = 1.5


@dataclass
class TrainTab:
    """The tab's components and events, for a caller that wires more behaviour to them."""

    fields: dict[str, Any]
    start: Any
    interrupt: Any
    follow: Any
    check: Any
    progress: Any
    chart: Any
    gallery: Any
    report: Any
    #: the output components of every progress update, in the order the follow handlers yield
    outputs: list[Any] = field(default_factory=list)
    #: events that end when a followed run ends (chain ``.then(...)`` on them)
    run_events: list[Any] = field(default_factory=list)
    #: generator that follows the current run (for ``Blocks.load``, so a reloaded page catches up)
    follow_current: Optional[Callable[[], Iterator[tuple]]] = None
    #: the event handlers by name ("start", "follow", "interrupt", "check", "sweep", "sweep_grid"),
    #: callable directly
    handlers: dict[str, Callable[..., Any]] = field(default_factory=dict)
    #: the Sweep section's components (:func:`pivotal.ui.sweep_section.build_sweep_section`)
    sweep: dict[str, Any] = field(default_factory=dict)


def build_train_tab(job: TrainingJob, host_provider: HostProvider, data_dir: str = "", out_dir: str = "output",
                    base: Optional[TrainConfig] = None, elem_prefix: str = "pivotal",
                    sweep_grid: Optional[SweepGridFn] = None, grid_steps: int = GRID_STEPS,
                    mode_presets: Optional[Mapping[str, Mapping[str, Any]]] = None) -> TrainTab:
    """Add the Train tab's components to the current Blocks context and wire them to ``job``.

    ``host_provider``: returns the host (loading it on first use); called in the run's thread.
    ``base``: the settings the form starts from and that fill everything the form does not show.
    ``sweep_grid(folder, prompt, seed, steps, size)``: renders a finished sweep's variants x parts
    grid (:mod:`pivotal.ui.sweep_section`; default: Pivotal's own render on the host);
    ``grid_steps``: the sampling steps its section starts with.
    """
    # the demo's tiny-world reward (textcraftor mode) wherever the tab is: the demo model runs in a
    # webui too (pivotal export-checkpoint), and registering is a name in a table, no weights loaded
    register_demo_reward()
    cfg = base if base is not None else TrainConfig()
    cfg = TrainConfig.from_dict({**cfg.to_dict(), "data_dir": data_dir or cfg.data_dir, "out_dir": out_dir})
    init = form_values_from_config(cfg)
    ids = _Ids(elem_prefix)
    f: dict[str, Any] = {}
    shown = form_settings()
    with gr.Row():
        with gr.Column(scale=3):
            by_section = {sec.key: [s for s in shown if s.group == sec.key] for sec in FORM_SECTIONS}
            top = by_section.pop(FORM_SECTIONS[0].key)
            data = next((s for s in top if s.name == "data_dir"), None)
            with gr.Row():  # the dataset folder and the button that checks it
                if data is not None:
                    f["data_dir"] = setting_widget(data, init["data_dir"], ids, scale=4)
                check = gr.Button("Check dataset", elem_id=ids("check"), scale=1)
            report = gr.HTML("", elem_id=ids("report"))
            setting_rows([s for s in top if s is not data], init, ids, f)
            for section in FORM_SECTIONS[1:]:
                settings = by_section[section.key]
                with_resume = section.key == RESUME_SECTION
                if not settings and not with_resume:
                    continue
                with gr.Accordion(section.title, open=False, elem_id=ids(section.key)):
                    setting_rows(settings, init, ids, f)
                    if with_resume:
                        f["resume"] = gr.Textbox("", label="resume from (a *.resume.safetensors file, optional)",
                                                 elem_id=ids("resume"))
            sweep = build_sweep_section(ids, grid_steps)
        with gr.Column(scale=2):
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id=ids("start"))
                interrupt = gr.Button("Interrupt", variant="stop", interactive=False, elem_id=ids("interrupt"))
                follow = gr.Button("Show current run", elem_id=ids("follow"))
            progress = gr.HTML(progress_html(job.status()), elem_id=ids("progress"))
            # the chart draws its own title: gradio's label badge would cover it
            chart = gr.Image(None, type="pil", label="loss", show_label=False, interactive=False,
                             elem_id=ids("chart"))
            gallery = gr.Gallery([], label="previews", columns=4, height=300, elem_id=ids("previews"),
                                 **gallery_kwargs())

    names = form_field_names()
    inputs = [f[n] for n in names]
    outputs = [progress, chart, gallery, start, interrupt]

    def on_start(*values: Any) -> Iterator[tuple]:
        form = dict(zip(names, values))
        try:
            config, resume = config_from_form(cfg, form)
            run_id = job.start(config, host_provider=host_provider, resume=resume or None)
        except JobBusyError as e:
            yield from _follow(job, job.status()["run_id"], notice=str(e))
            return
        except PivotalError as e:  # a bad setting: shown in the page, the form stays as it is
            yield (message_html(str(e)) + progress_html(job.status()),) + _unchanged(4)
            return
        yield from _follow(job, run_id)

    def on_follow() -> Iterator[tuple]:
        yield from _follow(job, job.status()["run_id"])

    def on_interrupt() -> tuple:
        asked = job.interrupt()
        notice = "" if asked else "no run is going"
        return progress_html(job.status(), notice=notice, notice_kind="info"), gr.update(interactive=False)

    def on_check(*values: Any) -> str:
        form = dict(zip(names, values))
        try:
            config, _ = config_from_form(cfg, form)
            return report_html(check_dataset(config, host_provider()))
        except PivotalError as e:  # DatasetError and friends: the report of what is wrong
            return message_html(str(e))

    sweep_fns = sweep_handlers(job, host_provider, lambda form: config_from_form(cfg, dict(zip(names, form)))[0],
                               _follow,
                               lambda text: (message_html(text) + progress_html(job.status()),) + _unchanged(4),
                               sweep_grid or standalone_sweep_grid(job, host_provider))
    sweep_rows = [sweep[f"{part}{i}"] for i in range(VARY_ROWS) for part in ("name", "values")]
    on_mode, preset_fields = _mode_preset_handler(cfg, mode_presets or {}, f)
    if preset_fields:
        f["mode"].change(on_mode, inputs=[f["mode"]], outputs=[f[k] for k in preset_fields], **quick_event_kwargs())
    run_events = [
        start.click(on_start, inputs=inputs, outputs=outputs, show_progress="hidden", **long_event_kwargs()),
        follow.click(on_follow, inputs=None, outputs=outputs, show_progress="hidden", **long_event_kwargs()),
        sweep["start"].click(sweep_fns["sweep"], inputs=inputs + sweep_rows, outputs=outputs, show_progress="hidden",
                             **long_event_kwargs()),
    ]
    sweep["grid"].click(sweep_fns["sweep_grid"], inputs=[sweep["prompt"], sweep["seed"], sweep["steps"], sweep["size"]],
                        outputs=[sweep["image"], sweep["info"]])
    interrupt.click(on_interrupt, inputs=None, outputs=[progress, interrupt], **quick_event_kwargs())
    check.click(on_check, inputs=inputs, outputs=[report])
    return TrainTab(fields=f, start=start, interrupt=interrupt, follow=follow, check=check, progress=progress,
                    chart=chart, gallery=gallery, report=report, outputs=outputs, run_events=run_events,
                    follow_current=on_follow,
                    handlers={"start": on_start, "follow": on_follow, "interrupt": on_interrupt, "check": on_check,
                              "mode": on_mode, **sweep_fns}, sweep=sweep)


def _mode_preset_handler(base: TrainConfig, presets: Mapping[str, Mapping[str, Any]],
                         fields: Mapping[str, Any]) -> tuple[Callable[[str], tuple], list[str]]:
    """(handler of a pick of the training mode, the form fields it sets): the picked mode's preset
    values, or ``base``'s for a mode without one, in the form's representation."""
    names = sorted({k for preset in presets.values() for k in preset if k in fields})
    forms = {mode: form_values_from_config(TrainConfig.from_dict({**base.to_dict(), **preset}))
             for mode, preset in presets.items()}
    plain = form_values_from_config(base)

    def on_mode(mode: str) -> tuple:
        values = forms.get(mode, plain)
        return tuple(gr.update(value=values[k]) for k in names)

    return on_mode, names


def _follow(job: TrainingJob, run_id: int, notice: str = "", poll_s: float = POLL_S) -> Iterator[tuple]:
    """Yield (progress, chart, gallery, start, interrupt) updates until run ``run_id`` ends.

    Only what changed is sent: ``gr.update()`` leaves a component as it is, so the chart image
    and the gallery travel to the page only when there is something new to show.
    """
    chart_len, chart_at, previews_seen = -1, 0.0, -1
    while True:
        snap = job.status()
        done = snap["run_id"] != run_id or snap["state"] != RUNNING
        chart: Any = gr.update()
        gallery: Any = gr.update()
        losses = snap["losses"]
        points = len(losses) + len(snap["validation_losses"]) + len(snap["validation_drifts"])
        if points != chart_len and (done or time.monotonic() - chart_at >= CHART_EVERY_S):
            first = max(1, int(snap["step"]) - len(losses) + 1)
            chart = render_loss_chart(losses, snap["smoothed_losses"], snap["total"], first_step=first,
                                      validation=snap["validation_losses"], drift=snap["validation_drifts"])
            chart_len, chart_at = points, time.monotonic()
        if snap["preview_count"] != previews_seen:
            gallery = [(p.image, f"step {p.step}: {p.caption}") for p in job.previews()]
            previews_seen = snap["preview_count"]
        running = snap["state"] == RUNNING
        # a refusal notice is about the run that was going; once it has ended the notice is stale
        yield (progress_html(snap, notice=notice if running else ""), chart, gallery,
               gr.update(interactive=not running), gr.update(interactive=running and not snap["stop_requested"]))
        if done:
            return
        time.sleep(poll_s)


def standalone_sweep_grid(job: TrainingJob, host_provider: HostProvider) -> SweepGridFn:
    """A sweep's grid by Pivotal's own render on the host (the app), while no run uses it; size 0:
    the renderer's default size."""
    def render(folder: str, prompt: str, seed: int, steps: int, size: int) -> tuple[Any, Any]:
        from pivotal.inference.sweep_grid import render_sweep_grid, standalone_renderer

        with job.using_host():
            renderer = standalone_renderer(host_provider(), steps=steps, width=size or None, height=size or None)
            return render_sweep_grid(folder, renderer, prompt, seed=seed)

    return render


def _unchanged(n: int) -> tuple:
    return tuple(gr.update() for _ in range(n))


class _Ids:
    """``elem_id`` values with a prefix, unique on a page that holds other extensions' tabs."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def __call__(self, name: str) -> str:
        return f"{self.prefix}-{name}"
