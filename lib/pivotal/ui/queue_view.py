"""HTML for a queue or sweep in progress: its line (run i of n, steps overall), one bar for the whole
queue, and the table of its runs (name, values, state, steps, final loss, validation loss, drift),
ranked by validation loss once the queue has ended. Every text from outside is html-escaped."""

from __future__ import annotations

import html
from typing import Any, Mapping, Optional, Sequence

#: the table's columns: (title, row key)
COLUMNS = (("run", "name"), ("values", "values"), ("state", "state"), ("steps", "steps"), ("final loss", "loss"),
           ("val. loss", "validation_loss"), ("drift %", "validation_drift"))


def ranked_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``rows`` best first by validation loss (rows without one after, in their order), as
    :func:`pivotal.training.sweep.ranked` orders the CLI's table."""
    if not any(r.get("validation_loss") is not None for r in rows):
        return list(rows)
    return sorted(rows, key=lambda r: (r.get("validation_loss") is None, r.get("validation_loss") or 0.0))


def queue_line(queue: Mapping[str, Any], running: bool) -> str:
    """``sweep NAME: run 2 of 3 · step 14/24 overall · 58%`` (escaped)."""
    done, total = int(queue.get("step", 0)), int(queue.get("total", 0))
    pct = 100.0 * done / total if total else 0.0
    where = f"run {int(queue.get('index', 0))} of {int(queue.get('count', 0))}" if running else \
        f"{int(queue.get('count', 0))} runs"
    return (f'<div class="pivotal-queue-line" data-index="{int(queue.get("index", 0))}" '
            f'data-count="{int(queue.get("count", 0))}">{html.escape(str(queue.get("kind", "queue")))} '
            f'<b>{html.escape(str(queue.get("name", "")))}</b>: {where} &middot; step {done}/{total} overall '
            f"&middot; {pct:.0f}%</div>")


def _cell(key: str, row: Mapping[str, Any]) -> str:
    value = row.get(key)
    if key == "values":
        return html.escape(", ".join(value or []) or "-")
    if key == "steps":
        return f"{int(row.get('steps') or 0)}/{int(row.get('total') or 0)}"
    if key == "state":
        return html.escape(str(value) + (" (earlier)" if row.get("skipped") else ""))
    if value is None:
        return "-"
    if key == "validation_drift":
        return f"{float(value):+.2f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def queue_table_html(queue: Mapping[str, Any], rank: bool = False, elem_id: Optional[str] = None) -> str:
    """The runs as an HTML table; ``rank``: best validation loss first (the sweep has ended)."""
    rows = ranked_rows(queue.get("runs") or []) if rank else list(queue.get("runs") or [])
    head = "".join(f'<th style="text-align:left;padding:2px 6px">{t}</th>' for t, _ in COLUMNS)
    body = []
    for r in rows:
        cells = "".join(f'<td style="padding:2px 6px">{_cell(k, r)}</td>' for _, k in COLUMNS)
        body.append(f'<tr data-run="{html.escape(str(r.get("name", "")))}" '
                    f'data-state="{html.escape(str(r.get("state", "")))}">{cells}</tr>')
    ident = f' id="{html.escape(elem_id)}"' if elem_id else ""
    caption = " (ranked by validation loss)" if rank and rows and rows[0].get("validation_loss") is not None else ""
    return (f'<table class="pivotal-queue-table"{ident} style="border-collapse:collapse;font-size:90%">'
            f'<caption style="text-align:left">runs{caption}</caption><tr>{head}</tr>{"".join(body)}</table>')
