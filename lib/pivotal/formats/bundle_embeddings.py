"""The embeddings of a bundle: ``bundle_emb.<name>.<rest>`` tensors grouped and checked, and the
one-embedding files other tools write (diffusers' pivotal ``{name}_emb.safetensors`` with
``clip_l``/``clip_g``, kohya's and Pivotal's ``emb_params``, the webui's ``string_to_param``).

Lenient where other writers differ harmlessly, strict about safety: an embedding whose name could
reach a path or a page unescaped (OneTrainer's default ``<embedding>``, ``../x``) is skipped with a
warning naming it, the rest of the file still loads; shapes and vector counts are checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pivotal.errors import BundleError, EmbeddingNameError
from pivotal.formats.embedding_keys import EMB_PREFIX, split_embedding_key
from pivotal.text.names import validate_embedding_name

#: The webui splits a prompt into 75-token chunks; an embedding must fit in one.
MAX_VECTORS = 75
#: Keys of a file that is one embedding (the file name is its name, as in the webui's embeddings folder).
EMBEDDING_FILE_KEYS = ({"clip_l", "clip_g"}, {"clip_l"}, {"emb_params"}, {"string_to_param.*"})
#: OneTrainer's "output embedding" vectors: no webui reads them.
OUTPUT_SUFFIX = "_out"


@dataclass
class BundleEmbedding:
    """One embedding: N vectors per text encoder (``clip_l`` always; ``clip_g`` on SDXL)."""

    name: str
    vectors: dict[str, torch.Tensor]  # key -> (N, dim)
    init_text: str = ""
    #: encoder key -> the file key it was read from (for messages that name the tensor)
    source_keys: dict[str, str] = field(default_factory=dict)

    def key_of(self, encoder: str) -> str:
        return self.source_keys.get(encoder, f"{EMB_PREFIX}{self.name}.{encoder}")

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def embedding_file(p: str, tensors: dict[str, torch.Tensor]) -> BundleEmbedding | None:
    """The one embedding of a standalone embedding file (None when ``tensors`` is not one).

    Its name is the file name, as the webui names files of its embeddings folder. BundleError when
    the file name cannot be an embedding name.
    """
    if set(tensors) not in EMBEDDING_FILE_KEYS:
        return None
    name = Path(p).stem
    try:
        validate_embedding_name(name)
    except EmbeddingNameError as e:
        raise BundleError(p, f"is an embedding file, and its file name cannot be the embedding's name: {e}") from e
    emb = BundleEmbedding(name, {})
    for key, t in tensors.items():
        enc = "clip_g" if key == "clip_g" else "clip_l"
        emb.vectors[enc] = _as_vectors(p, key, t)
        emb.source_keys[enc] = key
    return emb


def _as_vectors(p: str, key: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise BundleError(p, f"embedding tensor must be (vectors, dim), got shape {tuple(t.shape)}", key=key)
    return t


def parse_embeddings(p: str, tensors: dict[str, torch.Tensor]
                     ) -> tuple[dict[str, BundleEmbedding], list[str], list[str]]:
    """Group ``bundle_emb.<name>.<rest>`` tensors into embeddings. Returns (embeddings, unknown keys,
    warnings); an embedding with an unusable name is skipped with a warning, not an error."""
    out: dict[str, BundleEmbedding] = {}
    unknown: list[str] = []
    warnings: list[str] = []
    skipped: dict[str, str] = {}
    extra: dict[str, list[str]] = {}
    for k, t in tensors.items():
        split = split_embedding_key(k)
        if split is None:
            raise BundleError(p, "embedding key must be bundle_emb.<name>.<vector key>", key=k)
        name, rest, enc = split.name, split.rest, split.encoder
        if name in skipped:
            continue
        try:
            validate_embedding_name(name)
        except EmbeddingNameError as e:
            hint = " (OneTrainer's default placeholder: rename the embedding there)" if name == "<embedding>" else ""
            skipped[name] = f"embedding {name!r} skipped: its name cannot be used in prompts{hint}: {e}"
            continue
        if enc is None:
            unknown.append(k)
            extra.setdefault(name, []).append(rest)
            continue
        emb = out.setdefault(name, BundleEmbedding(name, {}))
        if enc in emb.vectors:
            raise BundleError(p, f"embedding {name!r} has more than one {enc} tensor", key=k)
        emb.vectors[enc] = _as_vectors(p, k, t)
        emb.source_keys[enc] = k
    warnings += list(skipped.values())
    for name, rests in extra.items():
        sdxl = "clip_g" in getattr(out.get(name), "vectors", {})
        outputs = all(r.endswith(OUTPUT_SUFFIX) for r in rests)
        what = "OneTrainer's output-embedding vectors, which no webui reads" if outputs else "not an encoder key"
        tail = "" if sdxl else "; the webui refuses SD1 embeddings with more than one tensor"
        warnings.append(f"embedding {name!r}: extra key {', '.join(map(repr, rests))} ignored ({what}){tail}")
    return out, unknown, warnings


def check_embeddings(p: str, embeddings: dict[str, BundleEmbedding], base: str) -> None:
    dims: dict[str, int] = {}
    for emb in embeddings.values():
        where = f"{EMB_PREFIX}{emb.name}"
        if "clip_l" not in emb.vectors:
            raise BundleError(p, "embedding has no clip_l / string_to_param vectors", key=where)
        if base == "sdxl" and "clip_g" not in emb.vectors:
            raise BundleError(p, "SDXL embedding needs both clip_l and clip_g", key=where)
        counts = {int(t.shape[0]) for t in emb.vectors.values()}
        if len(counts) != 1:
            raise BundleError(p, f"clip_l and clip_g have different vector counts {sorted(counts)}", key=where)
        n = counts.pop()
        if not 1 <= n <= MAX_VECTORS:
            raise BundleError(p, f"{n} vectors; an embedding needs 1 to {MAX_VECTORS}", key=where)
        for enc, t in emb.vectors.items():
            d = int(t.shape[1])
            if d == 0:
                raise BundleError(p, f"{enc} vectors have no components (shape {tuple(t.shape)})", key=where)
            if dims.setdefault(enc, d) != d:
                raise BundleError(p, f"{enc} vectors are {d}-dimensional but other embeddings "
                                     f"in this file have {dims[enc]}", key=where)


