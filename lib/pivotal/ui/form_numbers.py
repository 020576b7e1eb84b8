"""Numbers typed into the app's and the tab's forms: read once, with one error wording.

A form sends what the browser had: a number, a numeric string, "" or None (a cleared box), or
text. Each reader names the field in its ConfigError, so the page can say which box to fix."""

from __future__ import annotations

import math
from typing import Any

from pivotal.errors import ConfigError


def form_number(name: str, value: Any) -> float:
    """``value`` as a finite float; ConfigError naming ``name`` when empty, text, NaN or infinite."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ConfigError(f"{name}: enter a number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: {value!r} is not a number") from None
    if not math.isfinite(v):
        raise ConfigError(f"{name}: {value!r} is not a finite number")
    return v


def form_whole(name: str, value: Any) -> int:
    """``value`` as an int (2.0 is 2); ConfigError naming ``name`` when it is not a whole number."""
    v = form_number(name, value)
    if not v.is_integer():
        raise ConfigError(f"{name}: must be a whole number, got {value!r}")
    return int(v)
