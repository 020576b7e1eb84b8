"""Training previews through the webui's own txt2img processing.

The trainer asks for a preview inside its training session, with its LoRA attached to the host's
modules; the embeddings are registered live for the length of the call. The webui's processing then
samples exactly as a user's generation would (sampler, scheduler, CFG, emphasis, clip skip), without
reloading the embeddings folder, without saving, and with the cond cache cleared before and after
(its key is the prompt, which does not change while the vectors do). The webui's progress fields
that processing overwrites are put back so the training's progress bar keeps its place; an
Interrupt pressed meanwhile is left set, so the run stops at its next step.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from pivotal.errors import ConfigError
from pivotal.hosts.a1111.session import clear_cond_cache
from pivotal.hosts.a1111.webui import optional_webui_module
from pivotal.text.embeddings import EmbeddingSet

#: shared.state fields that processing changes and a training job owns
STATE_FIELDS = ("job", "job_no", "job_count", "sampling_step", "sampling_steps", "textinfo")


class PreviewHost(Protocol):
    """What a preview needs of the host (the A1111 host has it): the webui, its loaded model, the
    preview sampler settings, and a way to make the run's embeddings usable by name."""

    webui: Any
    sd_model: Any
    preview_sampler: str
    preview_scheduler: str

    def live_embeddings(self, embeddings: EmbeddingSet) -> contextlib.AbstractContextManager[None]: ...


def _empty_script_runner() -> Any:
    """A ``ScriptRunner`` with no scripts, or None where the webui has none (glue tests' fakes)."""
    scripts = optional_webui_module("scripts")
    runner_class = getattr(scripts, "ScriptRunner", None)
    return runner_class() if runner_class is not None else None


def generate_preview(host: PreviewHost, prompt: str, negative: str, embeddings: EmbeddingSet, steps: int,
                     seed: int, width: int, height: int, cfg_scale: float) -> Any:
    """One image (PIL) from the webui's txt2img; a blank image when the user interrupted first."""
    from PIL import Image

    if steps < 1:
        raise ConfigError(f"preview steps must be >= 1, got {steps} (setting: preview_steps)")
    for name, v in (("width", width), ("height", height)):
        if v < 8 or v % 8:
            raise ConfigError(f"preview {name} {v} must be a positive multiple of 8 (setting: preview_size)")
    webui = host.webui
    proc = webui.processing
    state = webui.shared.state
    saved = {k: getattr(state, k) for k in STATE_FIELDS if hasattr(state, k)}
    images: list[Any] = []
    with host.live_embeddings(embeddings):
        clear_cond_cache(webui)
        cls = proc.StableDiffusionProcessingTxt2Img
        extra = {"scheduler": host.preview_scheduler} if "scheduler" in getattr(cls, "__dataclass_fields__", {}) else {}
        p = cls(sd_model=host.sd_model, prompt=prompt, negative_prompt=negative, steps=int(steps), seed=int(seed),
                width=int(width), height=int(height), cfg_scale=float(cfg_scale), sampler_name=host.preview_sampler,
                batch_size=1, n_iter=1, do_not_save_samples=True, do_not_save_grid=True,
                do_not_reload_embeddings=True, **extra)
        runner = _empty_script_runner()
        if runner is not None:
            # reForge reads p.scripts.alwayson_scripts unguarded; an empty runner runs no script,
            # which is what None means on A1111
            p.scripts, p.script_args = runner, ()
        try:
            processed = proc.process_images(p)
            images = list(getattr(processed, "images", []) or [])
        finally:
            p.close()
            clear_cond_cache(webui)
            for k, v in saved.items():
                setattr(state, k, v)
    if not images:
        return Image.new("RGB", (int(width), int(height)))
    return images[0]
