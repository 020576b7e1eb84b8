"""JSON parsing with limits, for text that comes from files (safetensors headers and metadata).

Python's ``json`` parses nesting recursively and turns digit strings into ints without bound, so a
10 KB hostile header raises ``RecursionError`` (5,000 levels) or ``ValueError`` (an int of more
than 4,300 digits). Here both, and everything else that can go wrong, are one ValueError with a
message. The safetensors format needs nesting 3 and numbers below 2**64; the number limits are far
above that and far below what strains the parser. Nesting deeper than the structure allows is
refused by the callers' type checks; the parser's own limit is the interpreter's recursion limit.
"""

from __future__ import annotations

import json
from typing import Any

#: Longest integer literal accepted (2**64 has 20 digits).
MAX_INT_DIGITS = 32
#: Longest float literal accepted (a float has 17 significant digits; the rest is noise or attack).
MAX_FLOAT_CHARS = 64


class JsonLimitError(ValueError):
    """The text is JSON (or close to it) but beyond the limits above."""


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonLimitError(f"an integer of {len(text.lstrip('-'))} digits (limit {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    if len(text) > MAX_FLOAT_CHARS:
        raise JsonLimitError(f"a number literal of {len(text)} characters (limit {MAX_FLOAT_CHARS})")
    return float(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # json keeps the last silently; another reader may keep the first: refuse the ambiguity
            raise JsonLimitError(f"key {k[:80]!r} appears twice in one object")
        out[k] = v
    return out


def loads_limited(raw: bytes | str) -> Any:
    """``json.loads`` with the limits above; any failure is a ValueError (JsonLimitError or
    json.JSONDecodeError) whose message says what is wrong. Bytes must be UTF-8."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise JsonLimitError(f"not UTF-8 ({e.reason} at byte {e.start})") from e
    try:
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float,
                          parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except RecursionError as e:
        # The C scanner recurses once per level and checks the interpreter's recursion limit, so
        # deep nesting ends here, before the stack does.
        raise JsonLimitError("nested too deeply") from e


def _reject_constant(name: str) -> Any:
    raise JsonLimitError(f"{name} is not JSON")
