"""The Train tab's form values → a validated :class:`TrainConfig` (no gradio here).

The form is generated from the settings' declarations (:mod:`pivotal.training.settings`): one
input per setting the form shows (each group's section, or "Advanced"), plus the embeddings table
and the resume path. A setting declared ``form="none"`` comes from the ``base`` config the tab was
built with (so the webui and the demo can preset it). Number boxes hand back floats, or None when
left empty, in every gradio version: each value is converted here by the setting's kind, and a bad
one raises ConfigError naming the setting.
"""

from __future__ import annotations

from typing import Any, Mapping

from pivotal.training.config import TrainConfig
from pivotal.training.settings import ADVANCED, GROUPS, DeclaredSetting, declared
from pivotal.ui.form_numbers import form_number, form_whole

#: rows of the embeddings table (name, vectors, init text); empty names are skipped
EMBEDDING_ROWS = 3
#: the form's sections in page order: the declared groups, then "Advanced"
FORM_SECTIONS = (*GROUPS, ADVANCED)


def form_settings() -> list[DeclaredSetting]:
    """The settings the form shows, in page order (section by section, field order within)."""
    shown = [s for s in declared(TrainConfig) if s.in_form]
    return [s for section in FORM_SECTIONS for s in shown if s.group == section.key]


def embedding_field_names() -> list[str]:
    """``emb0_name, emb0_vectors, emb0_init, emb1_name, ...`` in table order."""
    return [f"emb{i}_{part}" for i in range(EMBEDDING_ROWS) for part in ("name", "vectors", "init")]


def form_field_names() -> list[str]:
    """Every value the form hands to the Start / Check handlers, in a fixed order: the settings
    (the embeddings setting as its table's cells), then the resume path."""
    names: list[str] = []
    for s in form_settings():
        names.extend(embedding_field_names() if s.kind == "embeddings" else [s.name])
    return [*names, "resume"]


def form_values_from_config(cfg: TrainConfig) -> dict[str, Any]:
    """Initial form values for ``cfg`` (the inverse of :func:`config_from_form`)."""
    values: dict[str, Any] = {}
    for s in form_settings():
        value = getattr(cfg, s.name)
        if s.kind == "embeddings":
            for i in range(EMBEDDING_ROWS):
                spec = value[i] if i < len(value) else None
                values[f"emb{i}_name"] = spec.name if spec else ""
                values[f"emb{i}_vectors"] = spec.vectors if spec else 2
                values[f"emb{i}_init"] = spec.init_text if spec else ""
        elif s.kind == "str_list":
            values[s.name] = "\n".join(value)
        else:
            values[s.name] = value
    values["resume"] = ""
    return values


def config_from_form(base: TrainConfig, values: Mapping[str, Any]) -> tuple[TrainConfig, str]:
    """(validated config, resume path or "") from the form's values; ConfigError when one is bad."""
    data = base.to_dict()
    for s in form_settings():
        data[s.name] = _embeddings(values) if s.kind == "embeddings" else _convert(s, values.get(s.name))
    cfg = TrainConfig.from_dict(data).validate()
    return cfg, str(values.get("resume") or "").strip()


def _convert(s: DeclaredSetting, value: Any) -> Any:
    if s.kind == "int":
        return form_whole(s.name, value)
    if s.kind == "float":
        return form_number(s.name, value)
    if s.kind == "bool":
        return bool(value)
    if s.kind == "str_list":
        return [line.strip() for line in str(value or "").splitlines() if line.strip()]
    return str(value or "").strip()


def _embeddings(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i in range(EMBEDDING_ROWS):
        name = str(values.get(f"emb{i}_name") or "").strip()
        if not name:
            continue
        vectors = form_whole(f"embedding {name!r} vectors", values.get(f"emb{i}_vectors"))
        out.append({"name": name, "vectors": vectors, "init_text": str(values.get(f"emb{i}_init") or "").strip()})
    return out
