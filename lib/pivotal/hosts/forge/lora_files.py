"""What Forge's built-in Lora loader reads from a file: bundle embeddings left out, rewritten files re-read.

Forge's loader (``extensions-builtin/sd_forge_lora/networks.py``) reads a LoRA file through
``networks.load_lora_state_dict(filename)``, an ``lru_cache`` keyed on the file name only, and then
skips the **whole** LoRA when more than 12 of the file's keys match no layer ("LoRA version
mismatch"). A bundle's ``bundle_emb.*`` tensors are such keys (one per SD1 embedding, two per SDXL
one), so a bundle with 13 SD1 or 7 SDXL embeddings would silently lose its LoRA; Pivotal's bundle
script registers those embeddings itself. :func:`install` replaces the function with one that

* drops the ``bundle_emb.*`` keys (Forge never uses them), and
* caches on (file name, modification time, size), so a bundle a training run rewrote under the same
  name is read again instead of served from the old cache.

:func:`uninstall` puts Forge's function back (on a UI reload); both are idempotent.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

#: the key prefix of bundled embeddings (never a LoRA layer)
BUNDLE_PREFIX = "bundle_emb."
#: the attribute on our replacement that holds Forge's own function
ORIGINAL_ATTR = "_pivotal_original"
#: as many files as Forge's own cache keeps
CACHE_SIZE = 5


def without_bundle_embeddings(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The LoRA part of a file's tensors (a new dict; the tensors are shared)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(BUNDLE_PREFIX)}


def make_loader(read: Callable[[str], dict[str, Any]]) -> Callable[[str], dict[str, Any]]:
    """``load_lora_state_dict(filename)`` over Forge's uncached reader ``read``: cached per
    (name, mtime, size), bundle embeddings dropped. Exposes ``cache_info`` / ``cache_clear`` as
    Forge's ``lru_cache`` does."""
    @functools.lru_cache(maxsize=CACHE_SIZE)
    def cached(filename: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
        return without_bundle_embeddings(read(filename))

    def load_lora_state_dict(filename: str) -> dict[str, Any]:
        try:
            st = os.stat(filename)
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, 0)  # let the reader raise its own error for a missing file
        return cached(filename, *stamp)

    load_lora_state_dict.cache_info = cached.cache_info  # type: ignore[attr-defined]
    load_lora_state_dict.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
    return load_lora_state_dict


def install(networks: Any) -> bool:
    """Put the replacement in place of ``networks.load_lora_state_dict`` (Forge's loader module);
    False where there is nothing to replace (A1111, reForge) or it is already in place."""
    current = getattr(networks, "load_lora_state_dict", None)
    if current is None or hasattr(current, ORIGINAL_ATTR):
        return False
    read = getattr(current, "__wrapped__", current)  # Forge's function without its lru_cache
    replacement = make_loader(read)
    setattr(replacement, ORIGINAL_ATTR, current)
    if hasattr(current, "cache_clear"):
        current.cache_clear()  # its cached state dicts would only hold memory now
    networks.load_lora_state_dict = replacement
    return True


def uninstall(networks: Any) -> bool:
    """Forge's own function back; False when ours was not installed."""
    current = getattr(networks, "load_lora_state_dict", None)
    original = getattr(current, ORIGINAL_ATTR, None)
    if original is None:
        return False
    networks.load_lora_state_dict = original
    return True
