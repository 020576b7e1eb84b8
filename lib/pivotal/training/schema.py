"""The JSON Schema of the training settings, generated from their declarations.

One schema serves the config file (``pivotal train --config``; print it with ``pivotal train
--print-schema``) and the ``config`` object of the webui's ``POST /pivotal/v1/train`` (whose
/docs show it through :mod:`pivotal.webui.api_schema`). Draft 2020-12 keywords, which OpenAPI 3.1
shares; unknown keys are refused, as :meth:`TrainConfig.from_dict` refuses them.
"""

from __future__ import annotations

from typing import Any

from pivotal.text.names import MAX_NAME_LENGTH, NAME_RULE
from pivotal.training.config import TrainConfig
from pivotal.training.settings import GROUPS, DeclaredSetting, declared

_JSON_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
_GROUP_TITLES = {g.key: g.title for g in GROUPS}


def embedding_schema() -> dict[str, Any]:
    """One entry of ``embeddings``: a ``{name, vectors, init_text}`` table or a
    ``NAME[:VECTORS[:INIT TEXT]]`` string."""
    table = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": f"^[A-Za-z0-9_-]{{1,{MAX_NAME_LENGTH}}}$",
                     "description": f"the trigger word: {NAME_RULE}, unique ignoring case"},
            "vectors": {"type": "integer", "minimum": 1, "maximum": 16, "default": 2,
                        "description": "vectors per text encoder"},
            "init_text": {"type": "string", "default": "",
                          "description": "a class word to start from (empty: random at the vocabulary's std)"},
        },
        "required": ["name"],
        "additionalProperties": False,
    }
    return {"anyOf": [table, {"type": "string", "description": "NAME[:VECTORS[:INIT TEXT]]"}]}


def setting_schema(s: DeclaredSetting) -> dict[str, Any]:
    """The schema of one setting: type, default, limits or choices, description and group."""
    if s.kind == "embeddings":
        out: dict[str, Any] = {"type": "array", "items": embedding_schema(), "default": []}
    elif s.kind == "str_list":
        out = {"type": "array", "items": {"type": "string"}, "default": list(s.default)}
    else:
        out = {"type": _JSON_TYPES[s.kind], "default": s.default}
    if s.choices:
        out["enum"] = list(s.choices)
    if s.spec.limits is not None:
        out.update(s.spec.limits.json_schema())
    out["title"] = s.label
    out["description"] = s.spec.help
    out["x-group"] = _GROUP_TITLES[s.spec.group]
    if s.spec.form != "group":
        out["x-form"] = s.spec.form
    return out


def config_schema() -> dict[str, Any]:
    """The whole settings object (a config file's top level, the API's ``config``)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Pivotal training settings",
        "description": "The settings of one Pivotal training run: a pivotal train --config file (TOML or JSON) or "
                       "the config object of POST /pivotal/v1/train. Every key is optional here; a run needs "
                       "data_dir and at least one embedding (given here or as flags).",
        "type": "object",
        "properties": {s.name: setting_schema(s) for s in declared(TrainConfig)},
        "additionalProperties": False,
    }
