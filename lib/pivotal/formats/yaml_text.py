"""A minimal YAML writer for the configs Pivotal writes (webui model configs): nested dicts,
lists and scalars in block style, keys in the given order. Nothing here parses YAML."""

from __future__ import annotations

import json
import re
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z_/.][A-Za-z0-9_./-]*$")
_RESERVED = {"true", "false", "yes", "no", "on", "off", "null", "~", "y", "n"}


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.match(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)  # a JSON string is a valid double-quoted YAML scalar


def to_yaml(value: Any, indent: int = 0) -> str:
    """Block-style YAML text of ``value``; lists of scalars are written inline (``[1, 2]``)."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict) and item:
                lines.append(f"{pad}{key}:")
                lines.append(to_yaml(item, indent + 2).rstrip("\n"))
            elif isinstance(item, (list, tuple)):
                lines.append(f"{pad}{key}: [{', '.join(_scalar(v) for v in item)}]")
            else:
                lines.append(f"{pad}{key}: {_scalar(item) if item != {} else '{}'}")
        return "\n".join(lines) + "\n"
    return pad + _scalar(value) + "\n"
