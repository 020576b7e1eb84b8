"""A sweep's variants x parts grid rendered by the webui's own txt2img: ``POST
/pivotal/v1/sweep/grid`` and the tab's "Sweep grid" button.

The rows are the sweep's finished variants (their bundles were published into the Lora folder,
so the webui's ``<lora:…>`` tags find them), best validation loss first; the columns are the
ablation grid's; one prompt, one seed (:mod:`pivotal.inference.sweep_grid`). Each cell goes through
:func:`pivotal.webui.grid_render.render_in_webui` under the webui's queue lock. The sheet and its
record are saved next to the sweep (``<sweep folder>/sweep-grid.png`` + ``.json``).

Request: ``{"sweep": NAME, "prompt", "seed", "columns", "steps", "cfg_scale", "sampler_name",
"scheduler", "width", "height", "negative_prompt", "strength"}``; ``sweep`` is a folder name under
``<outputs>/sweeps`` (default: the job's last sweep). Errors: NotFoundError (404: no such sweep, or
no finished run yet), ConfigError (400: a bad field, named), JobBusyError (409: a run is going).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from pivotal.errors import ConfigError, NotFoundError
from pivotal.training.job import JobBusyError
from pivotal.webui.api_schema import GRID_DEFAULTS

#: the grid request's fields a sweep grid takes (its rows are the variants: no prompts list, no extra prompts)
SETTING_FIELDS = tuple(k for k in GRID_DEFAULTS if k not in ("prompts", "auto_prompts"))
FIELDS = ("sweep", "prompt", *SETTING_FIELDS)


def sweep_folder(body: Mapping[str, Any], outputs: str, last_folder: str = "") -> Path:
    """The folder of the sweep the request names (``sweep``: a folder name under
    ``<outputs>/sweeps``), or ``last_folder`` (the job's last sweep) when it names none."""
    name = body.get("sweep")
    if name in (None, ""):
        if not last_folder:
            raise NotFoundError('no sweep has run yet; give "sweep": the name of a folder under '
                                f"{Path(outputs) / 'sweeps'} (field: sweep)")
        return Path(last_folder)
    if not isinstance(name, str) or "/" in name or "\\" in name or name in (".", ".."):
        raise ConfigError(f"sweep {name!r}: give the name of a folder under {Path(outputs) / 'sweeps'} (field: sweep)")
    folder = Path(outputs) / "sweeps" / name
    if not folder.is_dir():
        raise NotFoundError(f"sweep {name!r}: no such folder under {Path(outputs) / 'sweeps'} (field: sweep)")
    return folder


def render_sweep_grid_in_webui(folder: Path, body: Mapping[str, Any], webui: Any, busy: Callable[[], bool],
                               runner: Any = None) -> dict[str, Any]:
    """Render and save the grid of the sweep in ``folder``; ``{"png", "json", "record",
    "interrupted"}`` (see the module docstring)."""
    import json

    from pivotal.inference.sweep_grid import finished_variants, save_sweep_grid, sweep_grid_plan
    from pivotal.webui.grid_api import parse_request
    from pivotal.webui.grid_render import render_in_webui

    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(unknown)}; the sweep grid takes {', '.join(FIELDS)}")
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str) or "<lora:" in prompt.lower():
        raise ConfigError("prompt must be text without a <lora:…> tag (the columns add each variant's) (field: prompt)")
    runs = finished_variants(folder)
    given = {k: body[k] for k in SETTING_FIELDS if k in body}
    if "width" not in given and "height" not in given:
        # the variants' own training size, not the ablation grid's 512 px default: the tab's button
        # gives no size, and 15 cells at 512 px of a small model on a CPU take many minutes
        size = _training_resolution(folder, runs[0].config)
        if size:
            given["width"] = given["height"] = size
    plan_args, settings = parse_request(given)
    plan = sweep_grid_plan(runs, prompt, plan_args["columns"], plan_args["seed"], plan_args["negative"],
                           plan_args["strength"])
    if busy():
        raise JobBusyError("a Pivotal training run is going; render the sweep grid when it ends")
    done = render_in_webui(webui, plan, settings, runner=runner)
    if not done.result.images:
        return {"png": "", "json": "", "record": None, "interrupted": done.interrupted}
    png, record = save_sweep_grid(folder, done.result)
    return {"png": str(png), "json": str(record), "record": json.loads(record.read_text(encoding="utf-8")),
            "interrupted": done.interrupted}


def tab_sweep_grid(webui_provider: Callable[[], Any], busy: Callable[[], bool],
                   runner: Optional[Any] = None) -> Callable[[str, str, int, int, int], tuple[str, str]]:
    """The Train tab's sweep-grid renderer in the webui: (folder, prompt, seed, steps, size) ->
    (png, json); size 0: the variants' training resolution."""
    def render(folder: str, prompt: str, seed: int, steps: int, size: int) -> tuple[str, str]:
        body: dict[str, Any] = {"prompt": prompt, "seed": seed, "steps": steps}
        if size:
            body["width"] = body["height"] = size
        out = render_sweep_grid_in_webui(Path(folder), body, webui_provider(), busy, runner=runner)
        if not out["png"]:
            raise ConfigError("the sweep grid was interrupted before its first cell")
        return out["png"], out["json"]

    return render


def _training_resolution(folder: Path, config_name: str) -> int:
    """The ``resolution`` a sweep run's config file trained at (0 when it cannot be read)."""
    import json

    try:
        value = json.loads((Path(folder) / config_name).read_text(encoding="utf-8")).get("resolution", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return int(value) if isinstance(value, int) and value > 0 else 0

