"""Pivotal's HTTP API on the webui's FastAPI app (listed in its /docs under the "pivotal" tag).

* ``POST /pivotal/v1/train``: start a run from ``{"config": {...}, "resume": "...", "preview_sampler":
  "...", "preview_scheduler": "...", "preview_cfg": 7}``; ``config`` has the CLI's TOML schema
  (:class:`pivotal.training.config.TrainConfig` fields; /docs show each, from the model
  :mod:`pivotal.webui.api_schema` generates); the preview keys pick how the webui renders
  previews. 409 while a run is going, 422 for a bad setting.
* ``POST /pivotal/v1/sweep``: start a sweep: the train request plus ``"vary": ["te_lr=1e-6,1e-5"]``
  (one or two settings); one run per combination under ``<outputs>/sweeps/``, one after another.
  400 for a bad value (named), 409 while a run or sweep is going. Started again, the same sweep
  skips its finished runs and resumes the interrupted one.
* ``GET /pivotal/v1/status``: the run's snapshot (progress, loss history, messages, bundle path,
  ``webui_task``: the running run's id in the webui's ``/internal/progress``; ``queue``: a sweep's
  runs, which one is going (``index`` of ``count``) and its steps overall, else null);
  ``?preview=true`` adds the latest preview as base64 PNG.
* ``POST /pivotal/v1/interrupt``: stop at the next step (saves per ``on_interrupt``); a sweep
  stops with it.
* ``GET /pivotal/v1/bundles``: the bundles in the Lora folder with their embedding names.
* ``POST /pivotal/v1/grid``: an ablation grid of a bundle rendered by the webui's txt2img
  (:mod:`pivotal.webui.grid_api`): ``{"bundle", "prompts", "auto_prompts", "columns", "steps",
  "cfg_scale", "sampler_name", "width", "height", "seed", "negative_prompt"}`` -> ``{"png",
  "json", "record", "interrupted"}``; 400 for a bad field, 404 for an unknown bundle, 409 while
  a run is going.
* ``POST /pivotal/v1/sweep/grid``: a sweep's variants x parts grid rendered by the webui's txt2img
  (:mod:`pivotal.webui.sweep_grid_api`): ``{"sweep", "prompt", "seed", "columns", "steps", …}`` ->
  ``{"png", "json", "record", "interrupted"}``, saved next to the sweep; 404 for an unknown sweep
  or one with no finished run, 400 for a bad field, 409 while a run is going.
* ``GET /pivotal/v1/host``: what the loaded model looks like now (weights fingerprint, flags,
  attention optimization, registered embeddings): shows that a run left the host as it found it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any, Callable, Optional

from pivotal.errors import ConfigError, NotFoundError, PivotalError
from pivotal.training.config import TrainConfig
from pivotal.training.job import JobBusyError, TrainingJob
from pivotal.webui.api_schema import grid_request_model, request_dict, train_request_model
from pivotal.webui.lora_bundles import list_bundles

PREFIX = "/pivotal/v1"
TAGS = ["pivotal"]
#: the request example shown in /docs
TRAIN_EXAMPLE = {"config": {"data_dir": "/path/to/images", "output_name": "mychar", "steps": 500,
                            "embeddings": [{"name": "mychar", "vectors": 2, "init_text": "person"}]}}


def _example_kwargs(body_param: Callable[..., Any]) -> dict[str, Any]:
    """The /docs request example, in the spelling this FastAPI takes (``example`` is deprecated
    from 0.103 on, where ``openapi_examples`` replaces it; the webuis pin 0.94 and 0.104)."""
    if "openapi_examples" in inspect.signature(body_param).parameters:
        return {"openapi_examples": {"one embedding": {"value": TRAIN_EXAMPLE}}}
    return {"example": TRAIN_EXAMPLE}


def config_from_request(body: dict[str, Any], outputs_dir: str) -> TrainConfig:
    """A validated TrainConfig from the request's ``config``; ``out_dir`` defaults to
    ``<outputs>/<output_name>``. ConfigError for anything wrong."""
    raw = body.get("config")
    if not isinstance(raw, dict):
        raise ConfigError('the request body needs a "config" object (the CLI\'s TOML settings as JSON)')
    values = dict(raw)
    if not values.get("out_dir"):
        values["out_dir"] = os.path.join(outputs_dir, str(values.get("output_name") or TrainConfig().output_name))
    return TrainConfig.from_dict(values).validate()


def preview_options(body: dict[str, Any]) -> dict[str, Any]:
    """The request's optional ``preview_sampler`` / ``preview_scheduler`` (webui names, e.g.
    "DPM++ 2M", "Karras") and ``preview_cfg`` (CFG scale) for the webui-rendered previews."""
    out: dict[str, Any] = {}
    for key in ("preview_sampler", "preview_scheduler"):
        if body.get(key) is not None:
            if not isinstance(body[key], str) or not body[key].strip():
                raise ConfigError(f"{key} must be a sampler/scheduler name as the webui lists it")
            out[key] = body[key].strip()
    if body.get("preview_cfg") is not None:
        try:
            out["preview_cfg"] = float(body["preview_cfg"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"preview_cfg must be a number, got {body['preview_cfg']!r}") from e
    return out


def sweep_varies(body: dict[str, Any]) -> list[str]:
    """The request's ``vary``: a list of ``NAME=V1,V2`` strings (one string is taken as a list of
    one). ConfigError for anything else, and for ``resume`` (a sweep resumes by itself)."""
    vary = body.get("vary")
    if isinstance(vary, str):
        vary = [vary]
    if not isinstance(vary, list) or not vary or not all(isinstance(v, str) for v in vary):
        raise ConfigError('the sweep needs "vary": a list of NAME=V1,V2,... (e.g. ["te_lr=1e-6,1e-5,1e-4"])')
    if body.get("resume"):
        raise ConfigError("resume: a sweep resumes by itself; start the same sweep again to continue it")
    return vary


def _rendered(render: Callable[[], Any]) -> Any:
    """A grid route's answer: ``render()``'s record as JSON; 409 while a run goes, 404 for an
    unknown bundle or sweep, 400 for any other refusal (its message names the field)."""
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse

    try:
        out = render()
    except JobBusyError as e:
        raise HTTPException(status_code=409, detail=str(e)) from e
    except NotFoundError as e:
        raise HTTPException(status_code=404, detail=str(e)) from e
    except PivotalError as e:
        raise HTTPException(status_code=400, detail=str(e)) from e
    return JSONResponse(json.loads(json.dumps(out, default=str)))


def add_routes(app: Any, job: TrainingJob, host_provider: Callable[[], Any], paths: Callable[[], dict[str, str]],
               webui_provider: Optional[Callable[[], Any]] = None) -> None:
    """Register the routes on ``app`` (a FastAPI app)."""
    from fastapi import Body, HTTPException
    from fastapi.responses import JSONResponse

    def start(body: Any = Body(..., **_example_kwargs(Body))) -> dict:
        body = request_dict(body)
        try:
            config = config_from_request(body, paths()["outputs"])
            previews = preview_options(body)
            run_id = job.start(config, host_provider=functools.partial(host_provider, **previews),
                               resume=body.get("resume") or None)
        except JobBusyError as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except PivotalError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        return {"run_id": run_id, "output_name": config.output_name, "out_dir": config.out_dir}

    # /docs show every setting through the model generated from the declarations (a plain dict
    # body without pydantic); FastAPI reads the body's type from the annotation
    start.__annotations__["body"] = train_request_model() or dict
    app.post(f"{PREFIX}/train", tags=TAGS, summary="Start a Pivotal training run")(start)

    def sweep(body: Any = Body(...)) -> dict:
        from pivotal.training.sweep import start_sweep

        body = request_dict(body)
        try:
            varies = sweep_varies(body)
            config = config_from_request(body, paths()["outputs"])
            previews = preview_options(body)
            run_id, folder = start_sweep(job, config, varies, paths()["outputs"],
                                         functools.partial(host_provider, **previews))
        except JobBusyError as e:
            raise HTTPException(status_code=409, detail=str(e)) from e
        except PivotalError as e:
            raise HTTPException(status_code=400, detail=str(e)) from e
        runs = [r["name"] for r in (job.status().get("queue") or {}).get("runs", [])]
        return {"run_id": run_id, "folder": str(folder), "runs": runs}

    sweep.__annotations__["body"] = train_request_model(sweep=True) or dict
    app.post(f"{PREFIX}/sweep", tags=TAGS, summary="Start a sweep: one run per combination of one or two varied "
             "settings, one after another (started again, it skips its finished runs)")(sweep)

    @app.get(f"{PREFIX}/status", tags=TAGS, summary="Progress, loss history and result of the current/last run")
    def status(preview: bool = False) -> Any:
        from pivotal.webui.runner import current_task_id

        # webui_task: the id the webui's /internal/progress knows the running run by ("" if none)
        snap = dict(job.status(preview_png=preview), webui_task=current_task_id())
        return JSONResponse(json.loads(json.dumps(snap, default=str)))

    @app.post(f"{PREFIX}/interrupt", tags=TAGS, summary="Stop the running run at its next step")
    def interrupt() -> dict:
        return {"interrupted": job.interrupt()}

    @app.get(f"{PREFIX}/bundles", tags=TAGS, summary="Bundles in the Lora folder and their embedding names")
    def bundles() -> dict:
        return {"lora_dir": paths()["lora_dir"], "bundles": list_bundles(paths()["lora_dir"])}

    if webui_provider is not None:
        def grid(body: Any = Body(...)) -> Any:
            from pivotal.webui.grid_api import make_grid

            return _rendered(lambda: make_grid(request_dict(body), webui_provider(), paths(), lambda: job.running))

        grid.__annotations__["body"] = grid_request_model() or dict
        app.post(f"{PREFIX}/grid", tags=TAGS, summary="Render an ablation grid of a bundle (full / UNet / TE / "
                 "embeddings / base) through the webui's txt2img")(grid)

        def sweep_grid(body: Any = Body(...)) -> Any:
            from pivotal.webui.sweep_grid_api import render_sweep_grid_in_webui, sweep_folder

            request = request_dict(body)

            def render() -> Any:
                last = (job.status().get("queue") or {}) if hasattr(job, "status") else {}
                folder = sweep_folder(request, paths()["outputs"],
                                      last.get("folder", "") if last.get("kind") == "sweep" else "")
                return render_sweep_grid_in_webui(folder, request, webui_provider(), lambda: job.running)

            return _rendered(render)

        app.post(f"{PREFIX}/sweep/grid", tags=TAGS, summary="Render a sweep's variants x parts grid through the "
                 "webui's txt2img")(sweep_grid)

        @app.get(f"{PREFIX}/host", tags=TAGS, summary="The loaded model's state (weights fingerprint, flags)")
        def host() -> dict:
            if job.running:
                raise HTTPException(status_code=409, detail="a training run is going; ask again when it ends")
            from pivotal.hosts.webuis import host_state

            return host_state(webui_provider())
