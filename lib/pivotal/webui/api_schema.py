"""The pydantic model of ``POST /pivotal/v1/train``'s body, generated from the settings' declarations.

It exists so the webui's /docs show every setting (type, default, limits or choices, help), with
the JSON Schema of :mod:`pivotal.training.schema` as each field's schema. It does not judge values:
each setting is typed ``Any`` for pydantic and unknown keys are kept, so a bad value reaches
:meth:`TrainConfig.validate` and is refused with the same message as in a config file (422, the
message as ``detail``). Works with pydantic 1.10 (A1111, reForge) and 2.x (Forge); without pydantic
:func:`train_request_model` returns None and the route takes a plain ``dict`` body.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

from pivotal.inference.grid import COLUMNS
from pivotal.training.config import TrainConfig
from pivotal.training.schema import setting_schema
from pivotal.training.settings import declared

CONFIG_MODEL = "PivotalTrainConfig"
REQUEST_MODEL = "PivotalTrainRequest"
SWEEP_MODEL = "PivotalSweepRequest"


def _pydantic() -> Any:
    try:
        import pydantic
    except ImportError:
        return None
    return pydantic


def _is_v2(pydantic: Any) -> bool:
    return int(str(pydantic.VERSION).split(".", 1)[0]) >= 2


def _field(pydantic: Any, default: Any, schema: dict[str, Any]) -> Any:
    """A documentation-only field: ``schema`` (title, description, type, limits…) shows in /docs."""
    extra = {k: v for k, v in schema.items() if k not in ("title", "description", "default")}
    kw: dict[str, Any] = {"title": schema.get("title"), "description": schema.get("description")}
    if isinstance(default, list):
        kw["default_factory"] = list
    else:
        kw["default"] = default
    if _is_v2(pydantic):
        return pydantic.Field(json_schema_extra=extra, **kw)
    return pydantic.Field(**kw, **extra)  # pydantic 1: extra keywords go into the field's schema


def _model(pydantic: Any, name: str, fields: dict[str, Any], doc: str) -> Any:
    """A model that keeps unknown keys (so they are refused by name, as in a config file)."""
    if _is_v2(pydantic):
        config: Any = pydantic.ConfigDict(extra="allow")
    else:
        class config:  # noqa: N801 - pydantic 1 reads the options from a class
            extra = pydantic.Extra.allow
    model = pydantic.create_model(name, __config__=config, **fields)
    model.__doc__ = doc
    return model


@functools.lru_cache(maxsize=None)
def _config_model() -> Any:
    """The training settings' model, built once: the run and the sweep requests share this one class
    (FastAPI 0.94 with pydantic 1, A1111's pins, fails on two distinct classes of one name)."""
    pydantic = _pydantic()
    settings = {s.name: (Any, _field(pydantic, s.default, setting_schema(s))) for s in declared(TrainConfig)}
    return _model(pydantic, CONFIG_MODEL, settings,
                  "The training settings: the same keys as a pivotal train --config file. A run needs data_dir "
                  "and at least one embedding; out_dir defaults to the webui's Pivotal outputs/<output_name>.")


def train_request_model(sweep: bool = False) -> Optional[type]:
    """The request-body model (a pydantic class), or None when pydantic is not installed;
    ``sweep``: ``POST /pivotal/v1/sweep``'s (the same plus ``vary``, without ``resume``)."""
    pydantic = _pydantic()
    if pydantic is None:
        return None
    config = _config_model()
    request = {
        "config": (Optional[config], _field(pydantic, None, {"description": "the training settings (required)"})),
        "resume": (Any, _field(pydantic, None, {"type": "string", "description":
                                                "a *.resume.safetensors file to continue from"})),
        "preview_sampler": (Any, _field(pydantic, None, {"type": "string", "description":
                                                         "the sampler of the previews, as the webui names it"})),
        "preview_scheduler": (Any, _field(pydantic, None, {"type": "string", "description":
                                                           "the scheduler of the previews (e.g. Karras)"})),
        "preview_cfg": (Any, _field(pydantic, None, {"type": "number", "description": "CFG scale of the previews"})),
    }
    if sweep:
        del request["resume"]  # a sweep resumes by itself: started again, it skips its finished runs
        request["vary"] = (Any, _field(pydantic, [], {"type": "array", "items": {"type": "string"}, "description":
                                                      "one or two settings to vary, NAME=V1,V2,... (e.g. "
                                                      "te_lr=1e-6,1e-5,1e-4); one run per combination"}))
        return _model(pydantic, SWEEP_MODEL, request, "Start a Pivotal sweep: one run per combination of the "
                      "varied values, one after another.")
    return _model(pydantic, REQUEST_MODEL, request, "Start a Pivotal training run.")


#: POST /pivotal/v1/grid's fields but ``bundle`` (required) and their defaults
GRID_DEFAULTS: dict[str, Any] = {"prompts": [], "auto_prompts": 2, "columns": list(COLUMNS),
                                 "steps": 20, "cfg_scale": 7.0, "sampler_name": "Euler a", "scheduler": "",
                                 "width": 512, "height": 512, "seed": 0, "negative_prompt": "", "strength": 1.0}
#: POST /pivotal/v1/grid's fields: (JSON type, description)
GRID_FIELDS: dict[str, tuple[str, str]] = {
    "bundle": ("string", "the bundle: its name in the Lora folder, or the path of a file there (required)"),
    "prompts": ("array", "the rows' prompts, without <lora:…> tags (the columns add the bundle's)"),
    "auto_prompts": ("integer", "how many prompts to add in contexts the bundle's captions never had (0..6)"),
    "columns": ("array", "which of full, unet, te, emb, base (default: all five)"),
    "steps": ("integer", "sampling steps"),
    "cfg_scale": ("number", "CFG scale"),
    "sampler_name": ("string", "the sampler, as the webui names it"),
    "scheduler": ("string", "the scheduler (e.g. Karras; empty: the sampler's own)"),
    "width": ("integer", "width in pixels (multiple of 8)"),
    "height": ("integer", "height in pixels (multiple of 8)"),
    "seed": ("integer", "the first row's seed; row i uses seed + i, the same in every column"),
    "negative_prompt": ("string", "the negative prompt of every cell"),
    "strength": ("number", "the LoRA strength of the columns that use it"),
}
GRID_MODEL = "PivotalGridRequest"


def grid_request_model() -> Optional[type]:
    """The grid request's model (documentation only: values are judged by
    :func:`pivotal.webui.grid_api.parse_request`), or None without pydantic."""
    pydantic = _pydantic()
    if pydantic is None:
        return None
    fields = {name: (Any, _field(pydantic, GRID_DEFAULTS.get(name), {"type": kind, "description": text}))
              for name, (kind, text) in GRID_FIELDS.items()}
    return _model(pydantic, GRID_MODEL, fields, "Render an ablation grid of a bundle through the webui's txt2img.")


def request_dict(body: Any) -> dict[str, Any]:
    """The keys the client sent, as plain data (a ``dict`` body is returned as it is)."""
    if isinstance(body, dict):
        return body
    if hasattr(body, "model_dump"):  # pydantic 2
        return body.model_dump(exclude_unset=True)
    return body.dict(exclude_unset=True)
