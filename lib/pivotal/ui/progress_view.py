"""HTML for the progress line and for messages, from a :meth:`TrainingJob.status` snapshot.

Every piece of text that came from outside (paths, messages, warnings, reports) is
html-escaped: an error message can hold a file name with ``<`` in it, and the page must show it,
not interpret it.
"""

from __future__ import annotations

import html
from typing import Any, Mapping, Optional

from pivotal.ui.queue_view import queue_line, queue_table_html

_STATE_COLOUR = {"idle": "#6b7280", "running": "#2157c4", "finished": "#15803d", "failed": "#b91c1c"}


def format_duration(seconds: Optional[float]) -> str:
    """``1:05:09`` / ``4:07`` / ``--`` for unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return "--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def message_html(text: str, kind: str = "error") -> str:
    """A boxed message (kind: "error", "busy", "info"), escaped."""
    colour = {"error": "#b91c1c", "busy": "#b45309", "info": "#374151"}.get(kind, "#374151")
    return (f'<div class="pivotal-message" data-kind="{kind}" style="border-left:4px solid {colour};'
            f'padding:6px 10px;white-space:pre-wrap">{html.escape(text)}</div>')


def report_html(text: str) -> str:
    """A pre-formatted report (the dataset pre-flight), escaped."""
    return f'<pre class="pivotal-report" style="white-space:pre-wrap;margin:0">{html.escape(text)}</pre>'


def progress_html(snap: Mapping[str, Any], notice: str = "", notice_kind: str = "busy") -> str:
    """The live progress block: state, step/total, losses, ETA, phase, message, warnings, bundle.

    ``notice``: an extra message shown above it (e.g. "a run is already going"). The outer div
    carries ``data-state`` / ``data-result`` so scripts and tests can read the state.
    """
    state = str(snap.get("state", "idle"))
    result = str(snap.get("result_status", ""))
    colour = _STATE_COLOUR.get(state, "#374151")
    parts = [f'<div id="pivotal-progress-state" data-state="{html.escape(state)}" '
             f'data-result="{html.escape(result)}" data-run="{int(snap.get("run_id", 0))}">']
    if notice:
        parts.append(message_html(notice, notice_kind))
    label = state if not result or state == "running" else f"{state}: {result}"
    step, total = int(snap.get("step", 0)), int(snap.get("total", 0))
    line = [f'<b style="color:{colour}">{html.escape(label)}</b>']
    if state != "idle":
        line.append(f"step {step}/{total}")
        pct = 100.0 * step / total if total else 0.0
        line.append(f"{pct:.0f}%")
        if snap.get("loss") is not None:
            line.append(f"loss {float(snap['loss']):.4f}")
        if snap.get("smoothed_loss") is not None:
            line.append(f"smoothed {float(snap['smoothed_loss']):.4f}")
        if snap.get("validation_loss") is not None:
            line.append(f"validation {float(snap['validation_loss']):.4f}")
        if snap.get("validation_drift") is not None:
            line.append(f"drift {float(snap['validation_drift']):+.2f}%")
        if state == "running":
            line.append(f"ETA {format_duration(snap.get('eta_s'))}")
        line.append(f"elapsed {format_duration(snap.get('elapsed_s'))}")
        if snap.get("phase"):
            line.append(f"phase: {html.escape(str(snap['phase']))}")
    else:
        line.append("no run yet")
    parts.append('<div class="pivotal-progress-line">' + " &middot; ".join(line) + "</div>")
    queue = snap.get("queue")
    if queue:  # one bar for the whole queue; the line above is the run going
        parts.insert(len(parts) - 1, queue_line(queue, state == "running"))
        parts.append(_bar(int(queue.get("step", 0)), int(queue.get("total", 0)), colour))
    elif state != "idle":
        parts.append(_bar(step, total, colour))
    if snap.get("message"):
        kind = "error" if state == "failed" else "info"
        parts.append(message_html(str(snap["message"]), kind))
    if snap.get("bundle_path"):
        path = html.escape(str(snap["bundle_path"]))
        parts.append(f'<div>bundle: <code id="pivotal-bundle-path">{path}</code></div>')
    if queue:
        parts.append(queue_table_html(queue, rank=state != "running", elem_id="pivotal-queue-table"))
    warnings = list(snap.get("warnings") or [])
    if warnings:
        shown = warnings[-5:]
        more = f" ({len(warnings) - len(shown)} earlier not shown)" if len(warnings) > len(shown) else ""
        items = "".join(f"<li>{html.escape(str(w))}</li>" for w in shown)
        parts.append(f"<details open><summary>warnings{more}</summary><ul>{items}</ul></details>")
    parts.append("</div>")
    return "".join(parts)


def _bar(step: int, total: int, colour: str) -> str:
    pct = max(0.0, min(100.0, 100.0 * step / total)) if total else 0.0
    return ('<div style="background:#e5e7eb;height:6px;border-radius:3px;margin:4px 0">'
            f'<div style="background:{colour};width:{pct:.1f}%;height:6px;border-radius:3px"></div></div>')
