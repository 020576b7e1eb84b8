"""The few places where gradio 3.41 (the webui's pin) and gradio 4-6 differ, in one module.

Everything else in the UI uses only what both accept: Blocks/Tab/Row/Column/Accordion,
Textbox/Number/Slider/Checkbox/Radio/Dropdown/Button/HTML/Image/Gallery, ``gr.update`` and
generator event handlers (live progress: gradio 3.41 has no ``gr.Timer``).
"""

from __future__ import annotations

import inspect
from typing import Any

import gradio as gr


def gradio_major() -> int:
    """The major version of the installed gradio (3 for the webui's 3.41.2)."""
    try:
        return int(str(gr.__version__).split(".", 1)[0])
    except ValueError:  # a dev build with an odd version string: assume a current one
        return 99


def long_event_kwargs() -> dict[str, Any]:
    """Keyword arguments for events that run for a long time (following a run).

    gradio 4+ gives each event one worker by default, so a second tab's Start would wait in the
    queue until the first run ended and then start another run; with no limit it reaches the job
    at once and is refused there with a clear message. gradio 3.41 has no per-event limit
    (its queue's ``concurrency_count`` applies, see :func:`enable_queue`).
    """
    return {"concurrency_limit": None} if gradio_major() >= 4 else {}


def quick_event_kwargs() -> dict[str, Any]:
    """Keyword arguments for short events that must get through while a run is followed
    (Interrupt): unlimited on gradio 4+; on 3.41 they skip the queue altogether."""
    return {"concurrency_limit": None} if gradio_major() >= 4 else {"queue": False}


def enable_queue(blocks: gr.Blocks, workers: int = 8) -> gr.Blocks:
    """Turn the queue on (generator handlers need it) with room for several tabs at once."""
    params = inspect.signature(blocks.queue).parameters
    # gradio 4 still lists concurrency_count but raises when it is given: ask for the new name first
    if "default_concurrency_limit" in params:  # gradio 4+
        blocks.queue(default_concurrency_limit=workers)
    elif "concurrency_count" in params:  # gradio 3.x
        blocks.queue(concurrency_count=workers)
    else:
        blocks.queue()
    return blocks


def launch_kwargs() -> dict[str, Any]:
    """Launch options that exist only in some versions: no server-side rendering (it needs a
    Node.js process, and the page works the same without it)."""
    params = inspect.signature(gr.Blocks.launch).parameters
    return {"ssr_mode": False} if "ssr_mode" in params else {}



def gallery_kwargs() -> dict[str, Any]:
    """Gallery options that exist only in some versions: fixed-width tiles (gradio 6 otherwise
    stretches a single preview across the whole gallery)."""
    params = inspect.signature(gr.Gallery.__init__).parameters
    return {"fit_columns": False} if "fit_columns" in params else {}
