"""What ``scripts/sd_webui_pivotal.py`` hands off to: the webui callbacks Pivotal registers.

* ``on_app_started``: the HTTP API (:mod:`pivotal.webui.api`);
* ``on_ui_tabs``: the "Pivotal" tab, the standalone app's Train tab on the webui's model (its Sweep
  section's grid rendered by the webui's txt2img, :mod:`pivotal.webui.sweep_grid_api`), and the
  "Ablation grid" section (:mod:`pivotal.webui.grid_tab`);
* ``on_ui_settings``: the bundle-embeddings option (:mod:`pivotal.webui.bundle_script`, whose
  always-on script the entry file exposes to the webui's script loader);
* ``on_before_ui``: the X/Y/Z plot axes "Pivotal: bundle part" and "Pivotal: bundle"
  (:mod:`pivotal.webui.xyz_axes`);
* ``on_script_unloaded``: a running run is asked to stop before the UI reloads (its session then
  restores the model as it ends).

Nothing is registered at import time; :func:`register` does it, once per script load (the webui
clears and re-collects callbacks on every load).
"""

from __future__ import annotations

import logging
from typing import Any

from pivotal.training.job import TrainingJob

log = logging.getLogger(__name__)


def host_provider(**preview: Any) -> Any:
    """A host over the model the webui has loaded now (built in the run's thread); ``preview``:
    ``preview_sampler`` / ``preview_scheduler`` / ``preview_cfg`` for the webui-rendered previews."""
    from pivotal.hosts.webuis import training_host

    return training_host(**preview)


def _on_app_started(_demo: Any, app: Any) -> None:
    from pivotal.hosts.webuis import load_webui
    from pivotal.webui.api import add_routes
    from pivotal.webui.runner import webui_job, webui_paths

    add_routes(app, webui_job(), host_provider, webui_paths, webui_provider=load_webui)


def _on_ui_tabs() -> list[tuple[Any, str, str]]:
    import gradio as gr

    from pivotal.hosts.webuis import load_webui
    from pivotal.ui.train_tab import build_train_tab
    from pivotal.webui.grid_tab import build_grid_section
    from pivotal.webui.runner import webui_job, webui_paths
    from pivotal.webui.sweep_grid_api import tab_sweep_grid

    with gr.Blocks(analytics_enabled=False) as tab:
        gr.HTML('<div id="pivotal-webui-header">Pivotal trains a LoRA and its trigger-word embeddings together on '
                "the model loaded in the webui. The finished bundle is copied into the Lora folder: use it with "
                "<code>&lt;lora:NAME:1&gt;</code> and the embedding names.</div>")
        # Where javascript/pivotal.js shows the webui's own progress bar and live preview of a run.
        gr.HTML('<div id="pivotal-webui-live"><div id="pivotal-webui-progressbar"></div>'
                '<div id="pivotal-webui-preview"></div></div>')
        job = webui_job()
        build_train_tab(job, host_provider, out_dir=webui_paths()["outputs"], elem_prefix="pivotal",
                        sweep_grid=tab_sweep_grid(load_webui, lambda: job.running))
        build_grid_section(webui_job(), webui_paths, load_webui, elem_prefix="pivotal")
    return [(tab, "Pivotal", "pivotal")]


def _on_script_unloaded() -> None:
    from pivotal.hosts.webuis import uninstall_lora_file_filter
    from pivotal.webui.runner import webui_job

    job: TrainingJob = webui_job()
    if job.interrupt():
        log.warning("Pivotal: the UI is reloading; the training run stops at its next step")
    uninstall_lora_file_filter()  # the reloaded scripts install it again


def _on_ui_settings() -> None:
    from pivotal.webui.bundle_script import add_settings

    add_settings()


def _on_before_ui() -> None:
    from pivotal.webui.xyz_axes import register_axes

    register_axes()


def register() -> None:
    """Register Pivotal's callbacks with the running webui."""
    from pivotal.hosts.a1111.webui import webui_module
    from pivotal.hosts.webuis import install_lora_file_filter, load_webui

    script_callbacks = webui_module("script_callbacks")
    try:  # Forge: its Lora loader must not see bundled embeddings (it would skip big bundles whole)
        install_lora_file_filter(load_webui())
    except Exception as e:  # noqa: BLE001 - the bundle script installs it again before each generation
        log.warning("Pivotal: could not prepare Forge's Lora loader yet (%s)", e)

    script_callbacks.on_ui_settings(_on_ui_settings, name="pivotal settings")
    script_callbacks.on_app_started(_on_app_started, name="pivotal api")
    script_callbacks.on_ui_tabs(_on_ui_tabs, name="pivotal tab")
    script_callbacks.on_script_unloaded(_on_script_unloaded, name="pivotal unload")
    script_callbacks.on_before_ui(_on_before_ui, name="pivotal x/y/z axes")
