"""``POST /pivotal/v1/grid`` and the tab's "Ablation grid" button: one function for both.

The request names a bundle (its name in the Lora folder, or a path to a file there), the rows'
prompts, how many prompts to add in contexts the captions never had, the columns, and the webui
txt2img settings. :func:`make_grid` renders it through the webui (:mod:`pivotal.webui.grid_render`)
and saves ``<outputs>/grids/<bundle>-<timestamp>.png`` and its ``.json`` record.

Errors: :class:`~pivotal.errors.NotFoundError` (404: unknown bundle), other
:class:`~pivotal.errors.ConfigError` (400: a bad field, named in the message),
:class:`~pivotal.training.job.JobBusyError` (409: a training run is going).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from pivotal.errors import ConfigError, NotFoundError
from pivotal.inference.grid import COLUMNS
from pivotal.training.job import JobBusyError
from pivotal.webui.api_schema import GRID_DEFAULTS
from pivotal.webui.grid_render import GridSettings, render_in_webui
from pivotal.webui.lora_bundles import list_bundles

#: the request's fields and their defaults (``bundle`` is required)
DEFAULTS = GRID_DEFAULTS
#: the /docs request example
GRID_EXAMPLE = {"bundle": "mychar", "prompts": ["a photo of mychar"], "auto_prompts": 2, "steps": 20,
                "cfg_scale": 7, "sampler_name": "Euler a", "width": 512, "height": 512, "seed": 1}


def resolve_bundle(bundle: Any, lora_dir: str) -> Path:
    """The bundle file the request names: a Lora-folder bundle by name (file stem or its
    ``ss_output_name``), or a path to a file in the Lora folder (the webui's ``<lora:…>`` tags only
    find files there). NotFoundError / ConfigError naming the field ``bundle`` otherwise."""
    if not isinstance(bundle, str) or not bundle.strip():
        raise ConfigError('the request needs "bundle": a bundle name in the Lora folder or its path (field: bundle)')
    text = bundle.strip()
    known = [b for b in list_bundles(lora_dir) if "error" not in b]
    if os.sep in text or "/" in text or text.endswith(".safetensors"):
        path = Path(text)
        if not path.is_file():
            raise NotFoundError(f"bundle {text!r}: no such file (field: bundle)")
        for b in known:
            if Path(b["path"]).resolve() == path.resolve():
                return Path(b["path"])
        raise ConfigError(f"bundle {text!r} is not a bundle in the webui's Lora folder {lora_dir}; copy it there "
                          "so <lora:…> tags find it (field: bundle)")
    for key in ("name", "output_name"):
        for b in known:
            if b.get(key) == text:
                return Path(b["path"])
    names = ", ".join(sorted(b["name"] for b in known)) or "(none)"
    raise NotFoundError(f"bundle {text!r} is not in the Lora folder {lora_dir}; bundles there: {names} "
                        "(field: bundle)")


def _number(body: Mapping[str, Any], key: str, kind: type) -> Any:
    value = body.get(key, DEFAULTS[key])
    if value is None:
        value = DEFAULTS[key]
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number, got {value!r} (field: {key})")
    try:
        number = kind(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key} must be a number, got {value!r} (field: {key})") from e
    if kind is int and number != float(value):
        raise ConfigError(f"{key} must be a whole number, got {value!r} (field: {key})")
    return number


def _strings(body: Mapping[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return list(DEFAULTS[key])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key} must be a list of strings, got {value!r} (field: {key})")
    return [v.strip() for v in value if v.strip()]


def parse_request(body: Mapping[str, Any]) -> tuple[dict[str, Any], GridSettings]:
    """(plan arguments, sampling settings) from a request body; ConfigError naming the field."""
    unknown = sorted(set(body) - set(DEFAULTS) - {"bundle"})
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; the grid takes bundle, {', '.join(DEFAULTS)}")
    columns = _strings(body, "columns")
    bad = [c for c in columns if c not in COLUMNS]
    if bad or not columns:
        raise ConfigError(f"columns {', '.join(bad) or '(none)'}: choose from {', '.join(COLUMNS)} (field: columns)")
    auto = _number(body, "auto_prompts", int)
    if not 0 <= auto <= 6:
        raise ConfigError(f"auto_prompts must be 0..6, got {auto} (field: auto_prompts)")
    negative = body.get("negative_prompt") or ""
    if not isinstance(negative, str):
        raise ConfigError(f"negative_prompt must be a string, got {negative!r} (field: negative_prompt)")
    plan = {"prompts": _strings(body, "prompts"), "auto_prompts": auto, "columns": columns,
            "seed": _number(body, "seed", int), "negative": negative, "strength": _number(body, "strength", float)}
    sampler = body.get("sampler_name") or DEFAULTS["sampler_name"]
    scheduler = body.get("scheduler") or ""
    if not isinstance(sampler, str) or not isinstance(scheduler, str):
        raise ConfigError("sampler_name and scheduler must be names as the webui lists them (field: sampler_name)")
    settings = GridSettings(steps=_number(body, "steps", int), cfg_scale=_number(body, "cfg_scale", float),
                            sampler_name=sampler.strip(), scheduler=scheduler.strip(),
                            width=_number(body, "width", int), height=_number(body, "height", int)).validate()
    return plan, settings


def grid_target(outputs: str, bundle: str) -> Path:
    """``<outputs>/grids/<bundle>-<timestamp>.png`` (a new name per second, then numbered)."""
    folder = Path(outputs) / "grids"
    stem = f"{bundle}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = folder / f"{stem}.png", 1
    while target.exists() or target.with_suffix(".json").exists():
        n += 1
        target = folder / f"{stem}-{n}.png"
    return target


def make_grid(body: Mapping[str, Any], webui: Any, paths: Mapping[str, str], busy: Callable[[], bool],
              runner: Any = None) -> dict[str, Any]:
    """Render and save the grid a request asks for; ``{"png", "json", "record", "interrupted"}``.

    ``busy()``: whether a training run is going (JobBusyError then). ``runner``: see
    :func:`pivotal.webui.grid_render.render_in_webui`.
    """
    import json

    from pivotal.inference.grid import bundle_grid_plan
    from pivotal.inference.grid_sheet import save_grid

    plan_args, settings = parse_request(body)
    path = resolve_bundle(body.get("bundle"), paths["lora_dir"])
    plan = bundle_grid_plan(str(path), plan_args["prompts"], plan_args["auto_prompts"], plan_args["columns"],
                            seed=plan_args["seed"], negative=plan_args["negative"], strength=plan_args["strength"])
    if not plan.rows:
        raise ConfigError("nothing to render: give prompts or auto_prompts > 0 (field: prompts)")
    if busy():
        raise JobBusyError("a Pivotal training run is going; render the grid when it ends")
    done = render_in_webui(webui, plan, settings, runner=runner)
    if not done.result.images:
        return {"png": "", "json": "", "record": None, "interrupted": done.interrupted}
    target = grid_target(paths["outputs"], plan.bundle)
    target.parent.mkdir(parents=True, exist_ok=True)
    png, json_path = save_grid(target, done.result)
    record = json.loads(json_path.read_text(encoding="utf-8"))
    return {"png": str(png), "json": str(json_path), "record": record, "interrupted": done.interrupted}
