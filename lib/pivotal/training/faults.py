"""Fault injection for tests of the failure paths (reliability checklist 26: out of memory at the
first step, mid-run, during a preview, during a save), in a real webui too.

Inert unless the environment variable ``PIVOTAL_FAULT_FILE`` names a file: then, at each
injection point, the file is read (it may appear and disappear while the process runs, so a test
can arm one fault for one run of a long-lived webui) and, when it holds a fault for this point, the
fault is raised. The file is JSON::

    {"point": "step", "step": 3, "error": "oom"}

``point``: ``step`` (before the forward pass of step index ``step``; 0 is the first step),
``preview`` or ``save`` (any step, or ``step`` when given). ``error``: ``oom`` raises
``torch.cuda.OutOfMemoryError`` (what CUDA raises, on any device), ``runtime`` a RuntimeError.
A missing or unreadable file means no fault.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

ENV = "PIVOTAL_FAULT_FILE"
POINTS = ("step", "preview", "save", "validation")


def _armed() -> dict[str, Any] | None:
    path = os.environ.get(ENV, "")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def fault_point(point: str, step: int) -> None:
    """Raise the armed fault when it is for ``point`` (one of :data:`POINTS`) at ``step``."""
    spec = _armed()
    if spec is None or spec.get("point") != point:
        return
    if "step" in spec and int(spec["step"]) != step:
        return
    what = f"fault injected by {ENV} at {point} (step index {step})"
    if spec.get("error", "oom") == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 MiB ({what})")
    raise RuntimeError(what)
