"""The Generate tab: try a trained bundle — pick it, write a prompt with its embedding names, get an image.

Built into the caller's ``gr.Blocks`` like the Train tab. Generation runs on the same host as
training, so it is refused while a run is going (the host's modules are in training shape then).
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import gradio as gr

from pivotal.errors import BundleError, ConfigError, PivotalError
from pivotal.training.job import JobBusyError, TrainingJob
from pivotal.ui.bundle_list import BundleEntry, describe, find_bundles
from pivotal.ui.form_numbers import form_number, form_whole
from pivotal.ui.progress_view import message_html

HostProvider = Callable[[], Any]
NO_BUNDLE = "(none: the base model)"


@dataclass
class GenerateTab:
    """The tab's components, for a caller that wires more behaviour to them."""

    folder: Any
    bundle: Any
    names: Any
    refresh: Any
    prompt: Any
    generate: Any
    image: Any
    info: Any
    grid: Any = None
    #: fn(folder) -> (bundle dropdown update, names html), for chaining after a run ends
    refresh_fn: Optional[Callable[..., tuple]] = None
    #: the event handlers by name ("refresh", "pick", "generate"), callable directly
    handlers: dict[str, Callable[..., Any]] = field(default_factory=dict)


def build_generate_tab(job: TrainingJob, host_provider: HostProvider, out_dir: str = "output",
                       default_prompt: str = "", default_size: int = 512, default_steps: int = 20,
                       elem_prefix: str = "pivotal", grid_contexts: Optional[Sequence[str]] = None) -> GenerateTab:
    """Add the Generate tab's components to the current Blocks context.

    ``default_size`` / ``default_steps``: the image size and sampling steps the form starts with
    (small for the demo's tiny model). ``grid_contexts``: what the ablation grid's extra rows say
    (:func:`pivotal.inference.grid.novel_prompts`; None = its general contexts).
    """
    entries, _ = find_bundles(out_dir)
    choices = [NO_BUNDLE] + [e.label for e in entries]
    first = entries[0].label if entries else NO_BUNDLE
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                folder = gr.Textbox(out_dir, label="Bundles folder", elem_id=f"{elem_prefix}-gen-folder", scale=3)
                refresh = gr.Button("Refresh", elem_id=f"{elem_prefix}-gen-refresh", scale=1)
            bundle = gr.Dropdown(choices, value=first, label="Bundle", elem_id=f"{elem_prefix}-gen-bundle")
            names = gr.HTML(_names_html(entries, first), elem_id=f"{elem_prefix}-gen-names")
            weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA weight")
            prompt = gr.Textbox(default_prompt, lines=2, label="Prompt (use the embedding names)",
                                elem_id=f"{elem_prefix}-gen-prompt")
            negative = gr.Textbox("", lines=1, label="Negative prompt", elem_id=f"{elem_prefix}-gen-negative")
            with gr.Row():
                steps = gr.Number(default_steps, label="steps", precision=0)
                seed = gr.Number(0, label="seed", precision=0)
                guidance = gr.Number(7.0, label="guidance")
            with gr.Row():
                width = gr.Number(default_size, label="width", precision=0, elem_id=f"{elem_prefix}-gen-width")
                height = gr.Number(default_size, label="height", precision=0, elem_id=f"{elem_prefix}-gen-height")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id=f"{elem_prefix}-gen-go")
                grid = gr.Button("Ablation grid of this bundle", elem_id=f"{elem_prefix}-gen-grid")
        with gr.Column(scale=2):
            image = gr.Image(None, type="pil", label="image", interactive=False, height=384,
                             elem_id=f"{elem_prefix}-gen-image")
            info = gr.HTML("", elem_id=f"{elem_prefix}-gen-info")

    def on_refresh(folder_text: str) -> tuple:
        found, warnings = find_bundles(folder_text or out_dir)
        labels = [NO_BUNDLE] + [e.label for e in found]
        # after a run the newest bundle is the one the user wants to try
        value = found[0].label if found else NO_BUNDLE
        text = _names_html(found, value) + "".join(message_html(w, "info") for w in warnings)
        return gr.update(choices=labels, value=value), text

    def on_pick(folder_text: str, label: str) -> str:
        found, _ = find_bundles(folder_text or out_dir)
        return _names_html(found, label)

    def on_generate(folder_text: str, label: str, w: float, prompt_text: str, negative_text: str, n_steps: Any,
                    seed_v: Any, width_v: Any, height_v: Any, guidance_v: Any) -> tuple:
        try:
            numbers = (form_whole("steps", n_steps), form_whole("seed", seed_v), form_whole("width", width_v),
                       form_whole("height", height_v), form_number("guidance", guidance_v))
            entry = _entry(folder_text or out_dir, label)
            full_prompt = _with_lora_tag(prompt_text or "", entry, w)
            lora_dirs = [str(Path(entry.path).parent)] if entry else []
            from pivotal.inference.generate import format_infotext, generate_image  # the pipeline code, only when used

            with job.using_host():  # never while a run (or another image) has the model
                img, meta = generate_image(host_provider(), full_prompt, negative_text or "", lora_dirs, *numbers)
        except JobBusyError as e:
            return gr.update(), message_html(str(e), "busy")
        except PivotalError as e:  # bad prompt, bad bundle, bad size: the reason, in the page
            return gr.update(), message_html(str(e))
        return img, _info_html(full_prompt, format_infotext(meta), meta, elem_prefix)

    def on_grid(folder_text: str, label: str, w: float, prompt_text: str, negative_text: str, n_steps: Any,
                seed_v: Any, width_v: Any, height_v: Any, guidance_v: Any) -> tuple:
        """Full / UNet only / TE only / embeddings only / base for the chosen bundle: the prompt is the
        first row, two rows in contexts its captions never had follow; one seed per row."""
        try:
            steps_v, seed_i, w_i, h_i = (form_whole("steps", n_steps), form_whole("seed", seed_v),
                                         form_whole("width", width_v), form_whole("height", height_v))
            entry = _entry(folder_text or out_dir, label)
            if entry is None:
                raise ConfigError("choose a bundle for the grid (it compares that bundle's parts)")
            from pivotal.inference.grid import DEFAULT_CONTEXTS, bundle_grid_plan, host_renderer, render_grid
            from pivotal.inference.grid_sheet import save_grid

            row = _without_lora_tag(prompt_text or "", entry)
            plan = bundle_grid_plan(entry.path, [row] if row else [], 2, seed=seed_i, negative=negative_text or "",
                                    strength=float(w), contexts=grid_contexts or DEFAULT_CONTEXTS)
            target = Path(folder_text or out_dir) / "grids" / f"{entry.lora_name}-{time.strftime('%Y%m%d-%H%M%S')}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            with job.using_host():
                render = host_renderer(host_provider(), [str(Path(entry.path).parent)], steps_v, w_i, h_i,
                                       form_number("guidance", guidance_v))
                png, record = save_grid(target, render_grid(plan, render))
        except JobBusyError as e:
            return gr.update(), message_html(str(e), "busy")
        except PivotalError as e:
            return gr.update(), message_html(str(e))
        from PIL import Image

        with Image.open(png) as sheet:
            shown = sheet.copy()
        notes = "".join(message_html(f"{c}: {n}", "info") for c, n in plan.notes.items())
        return shown, (f'<div id="{elem_prefix}-gen-grid-done">grid: <code>{html.escape(str(png))}</code>, '
                       f"cells: <code>{html.escape(str(record))}</code></div>{notes}")

    refresh.click(on_refresh, inputs=[folder], outputs=[bundle, names])
    bundle.change(on_pick, inputs=[folder, bundle], outputs=[names])
    form = [folder, bundle, weight, prompt, negative, steps, seed, width, height, guidance]
    generate.click(on_generate, inputs=form, outputs=[image, info])
    grid.click(on_grid, inputs=form, outputs=[image, info])
    return GenerateTab(folder=folder, bundle=bundle, names=names, refresh=refresh, prompt=prompt, generate=generate,
                       image=image, info=info, grid=grid, refresh_fn=on_refresh,
                       handlers={"refresh": on_refresh, "pick": on_pick, "generate": on_generate, "grid": on_grid})


def _info_html(prompt: str, infotext: str, meta: dict[str, Any], elem_prefix: str) -> str:
    """What was generated: the prompt as sent, the webui-style parameters, warnings, and the
    full details (folded)."""
    warnings = "".join(message_html(str(w), "busy") for w in meta.get("warnings") or [])
    details = json.dumps(meta, indent=1, ensure_ascii=False, default=str)
    return (f'<div id="{elem_prefix}-gen-done">prompt sent: <code>{html.escape(prompt)}</code></div>'
            f'<pre style="white-space:pre-wrap">{html.escape(infotext)}</pre>{warnings}'
            f'<details><summary>details</summary><pre style="white-space:pre-wrap">{html.escape(details)}</pre>'
            "</details>")


def _entry(folder: str, label: Optional[str]) -> Optional[BundleEntry]:
    if not label or label == NO_BUNDLE:
        return None
    found, _ = find_bundles(folder)
    for e in found:
        if e.label == label:
            return e
    raise BundleError(Path(folder) / label, "this bundle is no longer there; press Refresh")


def _with_lora_tag(prompt: str, entry: Optional[BundleEntry], weight: float) -> str:
    """The prompt with ``<lora:NAME:w>`` for the chosen bundle, unless the prompt already names it."""
    if entry is None:
        return prompt
    if re.search(r"<lora:" + re.escape(entry.lora_name) + r"(:[^>]*)?>", prompt, flags=re.IGNORECASE):
        return prompt
    return f"{prompt} <lora:{entry.lora_name}:{float(weight):g}>".strip()


def _without_lora_tag(prompt: str, entry: BundleEntry) -> str:
    """The prompt without the chosen bundle's ``<lora:…>`` tag (the grid's columns add their own)."""
    pattern = r"<lora:" + re.escape(entry.lora_name) + r"(:[^>]*)?>"
    return re.sub(r"\s{2,}", " ", re.sub(pattern, " ", prompt, flags=re.IGNORECASE)).strip()


def _names_html(entries: list[BundleEntry], label: Optional[str]) -> str:
    if not entries:
        return message_html("no bundles in this folder yet: train one, then press Refresh", "info")
    for e in entries:
        if e.label == label:
            return f'<div class="pivotal-bundle-names">{html.escape(describe(e))}</div>'
    return ""
