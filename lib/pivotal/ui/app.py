"""The standalone app: the Train and Generate tabs on one page, served on 127.0.0.1 only.

``pivotal app [--demo {sd1,sdxl} | --model PATH] [--out DIR] [--port 7860] [--no-browser]``
(:func:`run_app`; the flags are defined in :mod:`pivotal.cli.main`, which imports no gradio). The
model is loaded before the server starts, so a bad path is one error line on the terminal, not a
broken page. ``--demo`` uses a tiny model (sd1: pre-trained on a synthetic world of coloured shapes;
sdxl: random weights) and a synthetic dataset of a character that model never saw, so the whole
workflow can be tried on a laptop CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import html
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr

from pivotal.demo.settings import DEMO_EMBEDDING as CORE_DEMO_EMBEDDING
from pivotal.demo.settings import DEMO_SETTINGS as CORE_DEMO_SETTINGS
from pivotal.training.config import EmbeddingSpec, TrainConfig
from pivotal.training.job import TrainingJob
from pivotal.ui.compat import enable_queue, launch_kwargs
from pivotal.ui.generate_tab import build_generate_tab
from pivotal.ui.train_tab import build_train_tab, standalone_sweep_grid

HostProvider = Callable[[], Any]

LOCALHOST = "127.0.0.1"
#: the demo's embedding and settings: tiny, so a run ends in seconds on a CPU
DEMO_EMBEDDING = EmbeddingSpec.parse(CORE_DEMO_EMBEDDING)
DEMO_SETTINGS = {**CORE_DEMO_SETTINGS, "preview_every": 50, "preview_steps": 8}
DEMO_IMAGES = 8
#: seconds to wait, after Ctrl-C, for a running run to reach its next step and save
INTERRUPT_WAIT_S = 300.0
DEMO_SIZE = 64


def build_app(host_provider: HostProvider, out_dir: str, data_dir_default: str = "", *,
              job: Optional[TrainingJob] = None, host_label: str = "", base: Optional[TrainConfig] = None,
              demo: bool = False, generate_size: int = 512, generate_steps: int = 20,
              pretrained_demo: bool = False) -> gr.Blocks:
    """The app's page. Nothing is loaded or started here; ``host_provider`` is called on first use.

    ``job``: the process's training job (a new one when not given). ``base``: the settings the
    Train form starts from. ``demo``: say what the demo model is: random weights, or with
    ``pretrained_demo`` the tiny model pre-trained on the synthetic world (prompts then describe
    that world).
    """
    job = job if job is not None else TrainingJob()
    base = base if base is not None else TrainConfig(out_dir=out_dir, data_dir=data_dir_default)
    names = [e.name for e in base.embeddings]
    with gr.Blocks(title="Pivotal", analytics_enabled=False) as blocks:
        gr.HTML(_header_html(host_label, demo, pretrained_demo))
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="pivotal-tab-train"):
                train = build_train_tab(job, host_provider, data_dir=data_dir_default, out_dir=out_dir, base=base,
                                        sweep_grid=standalone_sweep_grid(job, host_provider),
                                        grid_steps=generate_steps,
                                        mode_presets=demo_mode_presets() if demo and pretrained_demo else None)
            with gr.Tab("Generate", id="generate", elem_id="pivotal-tab-generate"):
                prompt = f"a photo of {names[0]}" if names else ""
                contexts = None
                if names and demo and pretrained_demo:
                    from pivotal.demo.data import GRID_CONTEXTS

                    prompt = f"{names[0]} on a blue background, top left"  # words the demo model knows
                    contexts = GRID_CONTEXTS
                gen = build_generate_tab(job, host_provider, out_dir=out_dir, default_prompt=prompt,
                                         default_size=generate_size, default_steps=generate_steps,
                                         grid_contexts=contexts)
        # when a run ends, the Generate tab lists (and picks) the bundle it just saved
        for event in train.run_events:
            event.then(gen.refresh_fn, inputs=[gen.folder], outputs=[gen.bundle, gen.names])
        # a reloaded page, or a second tab, catches up with a run that is going
        blocks.load(train.follow_current, inputs=None, outputs=train.outputs)
    return blocks


def demo_mode_presets() -> dict[str, dict[str, Any]]:
    """The pre-trained demo's Train form, when "textcraftor" is picked: the recipe and prompts
    ``pivotal train --demo sd1 --mode textcraftor`` runs (the run measured to raise prompt following:
    world captions whose object colours are words the model never saw)."""
    from pivotal.demo.reward import demo_textcraftor_settings

    return {"textcraftor": demo_textcraftor_settings()}


def launch(blocks: gr.Blocks, port: int = 7860, open_browser: bool = False, block: bool = True) -> str:
    """Serve ``blocks`` on 127.0.0.1:``port`` (never on other interfaces); return its URL.

    ``block``: keep serving until Ctrl-C (the CLI); False returns once the server is up (tests).
    """
    enable_queue(blocks)
    blocks.launch(server_name=LOCALHOST, server_port=port, share=False, inbrowser=open_browser,
                  prevent_thread_lock=not block, show_error=False, quiet=False, **launch_kwargs())
    return f"http://{LOCALHOST}:{port}/"


def cached_host_provider(load: Callable[[], Any]) -> HostProvider:
    """A provider that calls ``load`` once (under a lock: two tabs must not load two models)."""
    lock = threading.Lock()
    cache: list[Any] = []

    def provide() -> Any:
        with lock:
            if not cache:
                cache.append(load())
            return cache[0]

    return provide


def demo_setup(out_dir: Path) -> tuple[TrainConfig, str]:
    """(Train form settings, dataset folder) for ``--demo``: writes the synthetic captioned dataset
    to ``<out>/demo_data`` unless a dataset is already there."""
    from pivotal.demo.data import make_demo_dataset
    from pivotal.demo.world import EXAMPLE_CHARACTER

    folder = out_dir / "demo_data"
    if not folder.is_dir() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        make_demo_dataset(folder, [DEMO_EMBEDDING.name], count=DEMO_IMAGES, size=DEMO_SIZE, seed=0,
                          character=EXAMPLE_CHARACTER)
    base = TrainConfig.from_dict({**TrainConfig().to_dict(), **DEMO_SETTINGS, "out_dir": str(out_dir),
                                  "data_dir": str(folder), "embeddings": [vars(DEMO_EMBEDDING)]})
    return base, str(folder)


def run_app(args: argparse.Namespace) -> int:
    """``pivotal app``: load the model, build the page, serve it until Ctrl-C."""
    # gradio would otherwise try to report usage to its servers (no network here, and no need)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from pivotal.demo.host import load_host
    from pivotal.demo.model import is_pretrained

    out_dir = Path(args.out)
    if args.demo:
        base, data_dir = demo_setup(out_dir)
    else:
        base, data_dir = TrainConfig(out_dir=str(out_dir)), ""
    host = load_host(model=args.model, demo=args.demo, device=args.device)
    label = host.label
    print(f"model: {label}", flush=True)
    small = base.resolution if args.demo else 512
    job = TrainingJob()
    blocks = build_app(cached_host_provider(lambda: host), str(out_dir), data_dir, job=job, host_label=label,
                       base=base, demo=bool(args.demo), generate_size=small, generate_steps=8 if args.demo else 20,
                       pretrained_demo=bool(args.demo) and is_pretrained(args.demo))
    launch(blocks, port=args.port, open_browser=not args.no_browser, block=False)
    return serve_until_ctrl_c(blocks, job)


def serve_until_ctrl_c(blocks: gr.Blocks, job: TrainingJob) -> int:
    """Keep serving until Ctrl-C; then let a running run stop at its next step and save (per its
    ``on_interrupt``) before the server closes, instead of dying mid-step with the process.
    A second Ctrl-C leaves at once. Returns the exit status (130 when a run was cut short)."""
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        if job.interrupt():
            print("stopping the training run at the next step (Ctrl-C again to leave now)...", flush=True)
            try:
                job.wait(INTERRUPT_WAIT_S)
            except KeyboardInterrupt:
                print("left without waiting for the run", flush=True)
                return 130
            print(f"run {job.status()['result_status'] or 'still going'}: {job.status()['message']}", flush=True)
    finally:
        blocks.close()
    return 0


def _header_html(label: str, demo: bool, pretrained_demo: bool = False) -> str:
    parts = ['<div id="pivotal-header"><h2 style="margin:0">Pivotal</h2>']
    parts.append(f'<div>model: <b id="pivotal-host-label">{html.escape(label or "loaded on first use")}</b></div>')
    if demo and pretrained_demo:
        name = html.escape(DEMO_EMBEDDING.name)
        parts.append('<div id="pivotal-demo-warning" style="border-left:4px solid #b45309;padding:4px 8px">'
                     "DEMO: a tiny model pre-trained on a synthetic world of coloured shapes (it draws prompts "
                     "like &quot;a red circle on a blue background, top left&quot;, 64 px), and a synthetic "
                     f"dataset of a character it never saw ({name}: a striped star). Train, then generate "
                     f"&quot;{name} on a blue background, top left&quot;. Training mode textcraftor fills in "
                     "the demo's reward fine-tuning: prompts that say colours in words the model never saw "
                     "(&quot;a crimson circle…&quot;).</div>")
    elif demo:
        parts.append('<div id="pivotal-demo-warning" style="border-left:4px solid #b45309;padding:4px 8px">'
                     "DEMO: a tiny model with RANDOM weights and a synthetic dataset. Images will be noise; "
                     "this tries the workflow, not the quality.</div>")
    parts.append("</div>")
    return "".join(parts)
