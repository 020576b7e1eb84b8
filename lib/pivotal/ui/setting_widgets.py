"""Gradio inputs for declared settings: one widget per setting, laid out in rows.

The widget kind, label, limits and choices come from the setting's declaration
(:mod:`pivotal.training.settings`); only constructor arguments that gradio 3.41, 4 and 6 all accept
are used. Each input's ``elem_id`` is ``<prefix>-<name with ->`` unless the declaration gives its
own (the browser tests find inputs by these ids).
"""

from __future__ import annotations

from typing import Any, Callable

import gradio as gr

from pivotal.training.settings import DeclaredSetting
from pivotal.ui.train_form import EMBEDDING_ROWS

#: inputs per row of a section
ROW_WIDTH = 4
#: widgets that take a whole row
_WIDE = ("lines", "embeddings")

Ids = Callable[[str], str]


def elem_suffix(s: DeclaredSetting) -> str:
    """The part of the input's ``elem_id`` after the prefix."""
    return s.spec.elem or s.name.replace("_", "-")


def setting_widget(s: DeclaredSetting, value: Any, ids: Ids, **extra: Any) -> Any:
    """A gradio input for one (non-table) setting, created in the current Blocks context."""
    kw: dict[str, Any] = {"label": s.label, "elem_id": ids(elem_suffix(s)), **extra}
    widget = s.widget
    if widget == "checkbox":
        return gr.Checkbox(bool(value), **kw)
    if widget == "radio":
        return gr.Radio(list(s.choices), value=value, **kw)
    if widget == "dropdown":
        return gr.Dropdown(list(s.choices), value=value, **kw)
    if widget == "slider":
        limits = s.spec.limits
        low = limits.low if limits is not None and limits.low is not None else 0.0
        high = limits.high if limits is not None and limits.high is not None else 1.0
        return gr.Slider(low, high, value=value, step=s.spec.step or (high - low) / 100, **kw)
    if widget == "number":
        return gr.Number(value, precision=0 if s.kind == "int" else None, **kw)
    if widget == "lines":
        return gr.Textbox(value, lines=2, **kw)
    return gr.Textbox(value, **kw)


def embedding_table(init: dict[str, Any], ids: Ids, fields: dict[str, Any]) -> None:
    """The embeddings setting as a table: name, vectors and init text per row."""
    gr.Markdown("**Embeddings** — the trigger words to learn (rows with no name are ignored)")
    for i in range(EMBEDDING_ROWS):
        with gr.Row():
            fields[f"emb{i}_name"] = gr.Textbox(init[f"emb{i}_name"], label="name", elem_id=ids(f"emb{i}-name"))
            fields[f"emb{i}_vectors"] = gr.Number(init[f"emb{i}_vectors"], label="vectors", precision=0,
                                                  elem_id=ids(f"emb{i}-vectors"))
            fields[f"emb{i}_init"] = gr.Textbox(init[f"emb{i}_init"], label="init text (a class word)",
                                                elem_id=ids(f"emb{i}-init"))


def setting_rows(settings: list[DeclaredSetting], init: dict[str, Any], ids: Ids, fields: dict[str, Any]) -> None:
    """Inputs for ``settings`` in rows of up to :data:`ROW_WIDTH`; a table or a multi-line box takes
    a row of its own. Each input goes into ``fields`` under the setting's name."""
    row: list[DeclaredSetting] = []

    def flush() -> None:
        if row:
            with gr.Row():
                for s in row:
                    fields[s.name] = setting_widget(s, init[s.name], ids)
            row.clear()

    for s in settings:
        if s.widget in _WIDE:
            flush()
            if s.widget == "embeddings":
                embedding_table(init, ids, fields)
            else:
                fields[s.name] = setting_widget(s, init[s.name], ids)
            continue
        row.append(s)
        if len(row) == ROW_WIDTH:
            flush()
    flush()
