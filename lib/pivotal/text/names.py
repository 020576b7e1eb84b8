"""Embedding-name rules, shared by training, prompt matching and bundle files.

A name becomes a prompt word, a file name and a safetensors key, so it must be safe for all
three: ASCII letters, digits, ``_`` and ``-`` only (no dots, slashes or spaces), 1-64 characters,
and not a Windows device name (``CON``, ``NUL``, ``COM1`` ... cannot be created as files there).
"""

from __future__ import annotations

import re

from pivotal.errors import EmbeddingNameError

MAX_NAME_LENGTH = 64
NAME_RULE = "1-64 characters from A-Z a-z 0-9 _ -"
_ALLOWED = re.compile(r"[A-Za-z0-9_-]+")
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"COM{i}" for i in range(1, 10)] + [f"LPT{i}" for i in range(1, 10)]
)


def validate_embedding_name(name: object) -> str:
    """Return ``name`` unchanged when it is a valid embedding name, else raise EmbeddingNameError.

    The message names the offending name and the rule it breaks.
    """
    if not isinstance(name, str):
        raise EmbeddingNameError(f"embedding name {name!r} is not a string; use {NAME_RULE}")
    if name == "":
        raise EmbeddingNameError(f"embedding name '' is empty; use {NAME_RULE}")
    if len(name) > MAX_NAME_LENGTH:
        raise EmbeddingNameError(
            f"embedding name {name!r} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}"
        )
    if not _ALLOWED.fullmatch(name):
        bad = "".join(sorted({c for c in name if not _ALLOWED.fullmatch(c)}))
        raise EmbeddingNameError(
            f"embedding name {name!r} contains {bad!r}; only A-Z a-z 0-9 _ - are allowed"
        )
    if name.upper() in _WINDOWS_RESERVED:
        raise EmbeddingNameError(
            f"embedding name {name!r} is a reserved Windows device name; pick another name"
        )
    return name
