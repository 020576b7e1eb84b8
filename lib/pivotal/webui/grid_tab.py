"""The Pivotal tab's "Ablation grid" section: a bundle of the Lora folder, prompts and the txt2img
settings, one button; the sheet and the saved paths come back. The work is
:func:`pivotal.webui.grid_api.make_grid`, the same as ``POST /pivotal/v1/grid``."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable

from pivotal.errors import PivotalError
from pivotal.hosts.a1111.webui import optional_webui_module
from pivotal.training.job import TrainingJob
from pivotal.webui.grid_api import DEFAULTS


def bundle_choices(lora_dir: str) -> list[str]:
    """The names of the Lora folder's bundles (readable ones), sorted."""
    from pivotal.webui.lora_bundles import list_bundles

    return sorted(b["name"] for b in list_bundles(lora_dir) if "error" not in b)


def default_bundle(job: TrainingJob, choices: list[str]) -> str:
    """The last run's bundle when it is in the Lora folder, else the first one ("" when none)."""
    last = Path(str(job.status().get("bundle_path") or "")).stem
    return last if last in choices else (choices[0] if choices else "")


def sampler_names() -> list[str]:
    """The webui's sampler names (the default alone outside a webui)."""
    samplers = getattr(optional_webui_module("sd_samplers"), "samplers", None) or []
    names = [str(getattr(s, "name", "")) for s in samplers if getattr(s, "name", "")]
    return names or [DEFAULTS["sampler_name"]]


def grid_click(job: TrainingJob, paths: Callable[[], dict[str, str]], webui_provider: Callable[[], Any]
               ) -> Callable[..., tuple[Any, str]]:
    """The button's handler: (sheet image or None, HTML with the saved paths or the error)."""
    from pivotal.webui.grid_api import make_grid

    def on_click(bundle: str, prompts: str, auto: Any, steps: Any, cfg: Any, sampler: str, width: Any,
                 height: Any, seed: Any, negative: str) -> tuple[Any, str]:
        body = {"bundle": bundle, "prompts": [p for p in (prompts or "").splitlines() if p.strip()],
                "auto_prompts": auto, "steps": steps, "cfg_scale": cfg, "sampler_name": sampler, "width": width,
                "height": height, "seed": seed, "negative_prompt": negative or ""}
        try:
            out = make_grid(body, webui_provider(), paths(), lambda: job.running)
        except PivotalError as e:
            return None, f'<div class="pivotal-grid-error">{html.escape(str(e))}</div>'
        if not out["png"]:
            return None, "<div>interrupted before the first cell</div>"
        note = " (interrupted: the cells done so far)" if out["interrupted"] else ""
        from PIL import Image

        with Image.open(out["png"]) as im:
            sheet = im.copy()
        return sheet, (f'<div id="pivotal-grid-done">grid{note}: <code>{html.escape(out["png"])}</code>, '
                       f'record: <code>{html.escape(out["json"])}</code></div>')

    return on_click


def build_grid_section(job: TrainingJob, paths: Callable[[], dict[str, str]], webui_provider: Callable[[], Any],
                       elem_prefix: str = "pivotal") -> dict[str, Any]:
    """Add the section to the current Blocks context; returns its components by name."""
    import gradio as gr

    ids = lambda name: f"{elem_prefix}-grid-{name}"  # noqa: E731 - a one-line naming rule
    choices = bundle_choices(paths()["lora_dir"])
    samplers = sampler_names()
    c: dict[str, Any] = {}
    with gr.Accordion("Ablation grid", open=False, elem_id=ids("section")):
        gr.HTML("<div>One bundle, its parts one at a time: full / UNet LoRA only / text-encoder LoRA only / "
                "embeddings only / base model with the names as plain text, rendered by this webui's txt2img "
                "(same seed along a row). Saved under outputs/pivotal/grids.</div>")
        with gr.Row():
            c["bundle"] = gr.Dropdown(choices, value=default_bundle(job, choices), label="Bundle",
                                      elem_id=ids("bundle"))
            c["refresh"] = gr.Button("Refresh", elem_id=ids("refresh"))
        c["prompts"] = gr.Textbox("", lines=2, label="Prompts (one a line; empty: the embedding names)",
                                  elem_id=ids("prompts"))
        c["negative"] = gr.Textbox("", label="Negative prompt", elem_id=ids("negative"))
        with gr.Row():
            c["auto"] = gr.Number(DEFAULTS["auto_prompts"], label="Extra prompts in new contexts", precision=0,
                                  elem_id=ids("auto"))
            c["steps"] = gr.Number(DEFAULTS["steps"], label="Steps", precision=0, elem_id=ids("steps"))
            c["cfg"] = gr.Number(DEFAULTS["cfg_scale"], label="CFG scale", elem_id=ids("cfg"))
            c["sampler"] = gr.Dropdown(samplers, value=DEFAULTS["sampler_name"] if DEFAULTS["sampler_name"] in samplers
                                       else samplers[0], label="Sampler", elem_id=ids("sampler"))
        with gr.Row():
            c["width"] = gr.Number(DEFAULTS["width"], label="Width", precision=0, elem_id=ids("width"))
            c["height"] = gr.Number(DEFAULTS["height"], label="Height", precision=0, elem_id=ids("height"))
            c["seed"] = gr.Number(1, label="Seed (row i: seed + i)", precision=0, elem_id=ids("seed"))
        c["button"] = gr.Button("Render ablation grid", variant="primary", elem_id=ids("button"))
        c["image"] = gr.Image(label="Grid", type="pil", interactive=False, elem_id=ids("image"))
        c["info"] = gr.HTML("", elem_id=ids("info"))
    inputs = [c[k] for k in ("bundle", "prompts", "auto", "steps", "cfg", "sampler", "width", "height", "seed",
                             "negative")]
    c["button"].click(grid_click(job, paths, webui_provider), inputs=inputs, outputs=[c["image"], c["info"]])

    def refresh() -> Any:
        names = bundle_choices(paths()["lora_dir"])
        return gr.update(choices=names, value=default_bundle(job, names))

    c["refresh"].click(refresh, inputs=[], outputs=[c["bundle"]])
    return c
