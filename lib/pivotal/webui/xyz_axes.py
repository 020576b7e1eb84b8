"""Two axes for the webui's built-in X/Y/Z plot script, so a bundle's parts and several bundles
cross with any other axis (CFG, sampler, and Checkpoint name: the transfer test):

* **Pivotal: bundle part** — full / unet / te / emb / base: each ``<lora:…>`` tag of the prompt
  rewritten to that part (:func:`pivotal.inference.grid.prompt_for_part`);
* **Pivotal: bundle** — bundles of the Lora folder: the prompt's first ``<lora:…>`` tag names it
  (:func:`pivotal.inference.grid.prompt_with_bundle`).

Added in ``on_before_ui``, when every script is loaded; the X/Y/Z module is found by its file name
among the webui's loaded scripts (A1111, Forge and reForge all ship ``scripts/xyz_grid.py``). A
webui without it gets no axes and a log line, never an error.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from pivotal.hosts.a1111.webui import optional_webui_module
from pivotal.inference.grid import COLUMNS, prompt_for_part, prompt_with_bundle

log = logging.getLogger(__name__)

PART_AXIS = "Pivotal: bundle part"
BUNDLE_AXIS = "Pivotal: bundle"


def find_xyz_module(scripts: Any) -> Optional[Any]:
    """The loaded ``xyz_grid.py`` module among ``scripts.scripts_data`` (None when absent)."""
    for data in getattr(scripts, "scripts_data", []) or []:
        module = getattr(data, "module", None)
        path = str(getattr(data, "path", ""))
        if module is not None and path.replace("\\", "/").endswith("/xyz_grid.py") and hasattr(module, "AxisOption"):
            return module
    return None


def _apply_to_prompts(p: Any, change: Callable[[str], str]) -> None:
    p.prompt = change(p.prompt)
    # hires prompts follow the main one in the webui unless set; keep a set one in step too
    if getattr(p, "hr_prompt", ""):
        p.hr_prompt = change(p.hr_prompt)


def apply_part(p: Any, x: str, _xs: Any) -> None:
    _apply_to_prompts(p, lambda prompt: prompt_for_part(prompt, str(x).strip()))


def apply_bundle(p: Any, x: str, _xs: Any) -> None:
    _apply_to_prompts(p, lambda prompt: prompt_with_bundle(prompt, str(x).strip()))


def add_axes(xyz: Any, bundle_names: Callable[[], list[str]]) -> list[str]:
    """Append the two axes to ``xyz.axis_options`` (once: an existing label is left alone); returns
    the labels added."""
    have = {getattr(o, "label", None) for o in xyz.axis_options}
    added = []
    for label, apply, choices in ((PART_AXIS, apply_part, lambda: list(COLUMNS)),
                                  (BUNDLE_AXIS, apply_bundle, bundle_names)):
        if label in have:
            continue
        xyz.axis_options.append(xyz.AxisOption(label, str, apply, format_value=_format_value(xyz), choices=choices))
        added.append(label)
    return added


def _format_value(xyz: Any) -> Callable[..., str]:
    return getattr(xyz, "format_value_add_label", None) or (lambda p, opt, x: f"{opt.label}: {x}")


def lora_bundle_names(lora_dir: str) -> list[str]:
    """The ``<lora:…>`` names of the bundles (files with bundled embeddings) in the Lora folder,
    sorted; a file that cannot be read is left out (the folder scans warn about it elsewhere)."""
    from pivotal.errors import BundleError
    from pivotal.formats.name_registry import bundle_embedding_names

    names = set()
    root = Path(lora_dir)
    for path in sorted(root.rglob("*.safetensors")) if root.is_dir() else []:
        try:
            if bundle_embedding_names(path):
                names.add(path.stem)
        except BundleError:
            continue
    return sorted(names, key=str.casefold)


def register_axes() -> None:
    """``on_before_ui`` callback: add the axes to the loaded X/Y/Z plot script, if there is one."""
    scripts = optional_webui_module("scripts")
    xyz = find_xyz_module(scripts) if scripts is not None else None
    if xyz is None:
        log.info("Pivotal: no X/Y/Z plot script loaded; its Pivotal axes are not added")
        return
    from pivotal.webui.runner import webui_paths

    add_axes(xyz, lambda: lora_bundle_names(webui_paths()["lora_dir"]))
