"""The ``bundle_emb.<name>.<rest>`` key grammar of bundled embeddings, in one place.

Every reader of bundled embeddings (the full bundle reader, the name registry, the webui's
generation-time loader, the HTTP bundle list) splits keys here, so they all agree on which keys are
embeddings and under which name. The grammar is the webui's (A1111 ``networks.load_network``): the
text between ``bundle_emb.`` and the next ``.`` is the name, the rest is the vector key, and a rest
that starts with ``string_to_param.`` is the SD1 form (``{"string_to_param": {"*": tensor}}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

EMB_PREFIX = "bundle_emb."
STRING_TO_PARAM = "string_to_param"


@dataclass(frozen=True)
class EmbeddingKey:
    """One ``bundle_emb.<name>.<rest>`` key, split."""

    key: str
    name: str
    rest: str

    @property
    def encoder(self) -> str | None:
        """The text encoder the vectors are for ("clip_l" / "clip_g"), or None for a key no reader
        uses. ``string_to_param.*`` (the webui's SD1 form) and ``emb_params`` (kohya's) are clip_l."""
        if self.rest.startswith(STRING_TO_PARAM + ".") or self.rest == "emb_params":
            return "clip_l"
        if self.rest in ("clip_l", "clip_g"):
            return self.rest
        return None


def is_embedding_key(key: str) -> bool:
    """Whether ``key`` claims to be a bundled embedding (well-formed or not)."""
    return key.startswith(EMB_PREFIX)


def split_embedding_key(key: str) -> EmbeddingKey | None:
    """``key`` split into name and rest; None when it is not ``bundle_emb.<name>.<rest>`` with a
    non-empty name and rest (the caller decides whether that is an error or a key to skip)."""
    if not key.startswith(EMB_PREFIX):
        return None
    name, sep, rest = key[len(EMB_PREFIX):].partition(".")
    if not name or not sep or not rest:
        return None
    return EmbeddingKey(key, name, rest)


def embedding_names(keys: Iterable[str]) -> list[str]:
    """The embedding names among ``keys``, each once, in first-seen order (malformed keys skipped)."""
    names: dict[str, None] = {}
    for key in keys:
        split = split_embedding_key(key)
        if split is not None:
            names.setdefault(split.name, None)
    return list(names)


def webui_embedding_data(items: Iterable[tuple[str, object]]) -> dict[str, dict[str, object]]:
    """{name: data} grouped as the webui's ``create_embedding_from_data`` reads it: ``string_to_param.<k>``
    nested under ``"string_to_param"``, any other rest flat. ``items``: (key, tensor) pairs; keys that
    are not well-formed embedding keys are skipped."""
    grouped: dict[str, dict[str, object]] = {}
    for key, value in items:
        split = split_embedding_key(key)
        if split is None:
            continue
        entry = grouped.setdefault(split.name, {})
        if split.rest.startswith(STRING_TO_PARAM + "."):
            nested: dict[str, object] = entry.setdefault(STRING_TO_PARAM, {})  # type: ignore[assignment]
            nested[split.rest[len(STRING_TO_PARAM) + 1:]] = value
        else:
            entry[split.rest] = value
    return grouped
