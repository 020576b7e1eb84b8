"""Prompt tokenization with embedding placeholders, and splicing the vectors into an encoder.

Neither the tokenizer nor the vocabulary matrix is changed. Instead:

1. :class:`PromptTokenizer` finds each embedding name's token sequence in the prompt ids
   (longest name first) and replaces every occurrence with N placeholder ids, recording
   ``(offset, name)`` fixes; offsets index the final id row (BOS is at 0).
2. :func:`injected_embeddings` hooks the encoder's token ``nn.Embedding`` for the duration of a
   ``with`` block and overwrites the output rows at those offsets with the embedding vectors.

This is how A1111 applies embeddings too, so trained vectors mean the same thing in both.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from pivotal.errors import EmbeddingNameError, ModelLayoutError
from pivotal.text.names import validate_embedding_name

CONTEXT_LENGTH = 77
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407

Fix = tuple[int, str]
#: Prompts a PromptTokenizer remembers (a dataset's captions; ~1 KB each).
MEMO_PROMPTS = 4096


class PromptIds(NamedTuple):
    """One prompt: ``ids`` LongTensor (max_length,), ``fixes`` [(offset, name)], ``truncated``."""

    ids: torch.Tensor
    fixes: list[Fix]
    truncated: bool


class BatchIds(NamedTuple):
    """A batch: ``ids`` LongTensor (B, max_length), ``fixes`` one list per row, ``truncated`` per row."""

    ids: torch.Tensor
    fixes: list[list[Fix]]
    truncated: list[bool]


def encode_plain(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/EOS.

    Accepts an HF tokenizer (``encode(text, add_special_tokens=False)`` or call returning
    ``input_ids``) or open_clip's ``SimpleTokenizer`` (whose ``encode`` adds no specials).
    """
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        # Decide by signature, not by catching TypeError: a retry without the flag would
        # silently add BOS/EOS on an HF tokenizer.
        if _accepts_keyword(encode, "add_special_tokens"):
            return [int(i) for i in encode(text, add_special_tokens=False)]
        return [int(i) for i in encode(text)]
    if callable(tokenizer):
        return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    raise TypeError(f"{type(tokenizer).__name__} has neither encode() nor __call__")


def _accepts_keyword(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        return [str(t) for t in convert(list(ids))]
    decoder = getattr(tokenizer, "decoder", None)  # open_clip SimpleTokenizer: id -> token
    if isinstance(decoder, Mapping):
        return [str(decoder.get(i, i)) for i in ids]
    return [str(i) for i in ids]


class PromptTokenizer:
    """Tokenizes prompts for one text encoder, leaving N placeholder positions per embedding.

    ``num_vectors`` maps embedding names to N. ``pad_id`` differs by encoder: HF CLIP (clip_l)
    pads with EOS 49407, open_clip (clip_g) with 0, so it is required. BOS/EOS default to the
    tokenizer's ``bos_token_id``/``eos_token_id`` (CLIP's 49406/49407 when absent).
    ``placeholder_id`` fills embedding positions; it must not be EOS because CLIP pools at the
    EOS (argmax) position. Name warnings (e.g. a name that is one ordinary word) are in ``warnings``.
    """

    def __init__(
        self,
        tokenizer: Any,
        num_vectors: Mapping[str, int],
        *,
        pad_id: int,
        bos_id: int | None = None,
        eos_id: int | None = None,
        placeholder_id: int = 0,
        max_length: int = CONTEXT_LENGTH,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_id = int(bos_id if bos_id is not None else getattr(tokenizer, "bos_token_id", None) or CLIP_BOS_ID)
        self.eos_id = int(eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None) or CLIP_EOS_ID)
        self.pad_id = int(pad_id)
        self.placeholder_id = int(placeholder_id)
        self.max_length = int(max_length)
        if self.placeholder_id in (self.eos_id, self.bos_id):
            raise ValueError(f"placeholder id {placeholder_id} must differ from BOS {self.bos_id} "
                             f"and EOS {self.eos_id}")
        if self.max_length < 3:
            raise ValueError(f"max_length {max_length} leaves no room between BOS and EOS")
        self.num_vectors = {validate_embedding_name(n): int(c) for n, c in num_vectors.items()}
        self.warnings: list[str] = []
        self.name_ids: dict[str, tuple[int, ...]] = {}
        by_ids: dict[tuple[int, ...], str] = {}
        for name, count in self.num_vectors.items():
            if count < 1:
                raise ValueError(f"embedding {name!r}: vector count must be >= 1, got {count}")
            ids = tuple(encode_plain(tokenizer, name))
            if not ids:
                raise EmbeddingNameError(f"embedding name {name!r} tokenizes to nothing")
            if ids in by_ids:
                raise EmbeddingNameError(
                    f"embedding names {by_ids[ids]!r} and {name!r} tokenize to the same tokens "
                    f"{_token_strings(tokenizer, ids)}; prompts could not tell them apart"
                )
            by_ids[ids] = name
            self.name_ids[name] = ids
            if len(ids) == 1:
                tok = _token_strings(tokenizer, ids)[0]
                self.warnings.append(
                    f"embedding name {name!r} is the single vocabulary token {tok!r} (id {ids[0]}); "
                    f"every {tok.replace('</w>', '')!r} in a prompt will mean the embedding, not the word"
                )
        # Longest first, so "my_cat_2" wins over its prefix "my_cat" at the same position.
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for ids, name in sorted(by_ids.items(), key=lambda kv: -len(kv[0])):
            self._by_first.setdefault(ids[0], []).append((ids, name))
        # Prompt -> result: a trainer tokenizes the same captions every epoch. Like ``name_ids``
        # above, this assumes the tokenizer does not change under us.
        self._memo: dict[str, PromptIds] = {}

    def build_prompt_ids(self, prompt: str) -> PromptIds:
        """``[BOS] content [EOS] pad...`` of length ``max_length`` with each embedding name replaced
        by N placeholders. Content beyond ``max_length - 2`` is cut (``truncated`` is then True);
        an embedding that would straddle the cut is dropped whole rather than half-filled."""
        hit = self._memo.get(prompt)
        if hit is None:
            hit = self._build_prompt_ids(prompt)
            if len(self._memo) >= MEMO_PROMPTS:
                self._memo.pop(next(iter(self._memo)))  # oldest first
            self._memo[prompt] = hit
        # Copies: a caller may change what it gets back; the memo must stay as built.
        return PromptIds(hit.ids.clone(), list(hit.fixes), hit.truncated)

    def _build_prompt_ids(self, prompt: str) -> PromptIds:
        tokens = encode_plain(self.tokenizer, prompt)
        content: list[int] = []
        fixes: list[Fix] = []
        i = 0
        while i < len(tokens):
            for ids, name in self._by_first.get(tokens[i], ()):
                if tuple(tokens[i : i + len(ids)]) == ids:
                    fixes.append((1 + len(content), name))  # +1: BOS precedes the content
                    content.extend([self.placeholder_id] * self.num_vectors[name])
                    i += len(ids)
                    break
            else:
                content.append(tokens[i])
                i += 1
        capacity = self.max_length - 2
        truncated = len(content) > capacity
        if truncated:
            cut = capacity
            for offset, name in fixes:
                if offset - 1 < cut < offset - 1 + self.num_vectors[name]:
                    cut = offset - 1
            content = content[:cut]
            fixes = [(o, n) for o, n in fixes if o - 1 + self.num_vectors[n] <= cut]
        row = [self.bos_id] + content + [self.eos_id]
        row += [self.pad_id] * (self.max_length - len(row))
        return PromptIds(torch.tensor(row, dtype=torch.long), fixes, truncated)

    def build_batch(self, prompts: Sequence[str]) -> BatchIds:
        """:meth:`build_prompt_ids` for each prompt, ids stacked to (B, max_length)."""
        rows = [self.build_prompt_ids(p) for p in prompts]
        if not rows:
            return BatchIds(torch.empty(0, self.max_length, dtype=torch.long), [], [])
        return BatchIds(torch.stack([r.ids for r in rows]), [r.fixes for r in rows], [r.truncated for r in rows])


def splice_vectors(
    output: torch.Tensor, batch_fixes: Sequence[Sequence[Fix]], vectors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Return ``output`` (B, L, D) with rows ``[offset, offset+N)`` of item b replaced by
    ``vectors[name]`` (N, D) for each ``(offset, name)`` in ``batch_fixes[b]``.

    Built with ``torch.cat``/``torch.stack`` so gradients flow to ``vectors`` and never into the
    replaced vocabulary rows; vectors are cast to ``output``'s dtype and device.
    """
    if output.dim() != 3 or output.shape[0] != len(batch_fixes):
        raise ModelLayoutError(
            f"token embedding output {tuple(output.shape)} does not match {len(batch_fixes)} fix lists "
            "(expected (batch, tokens, width) with one fix list per batch item)"
        )
    if not any(batch_fixes):
        return output
    seq_len, width = output.shape[1], output.shape[2]
    rows = []
    for b, fixes in enumerate(batch_fixes):
        row = output[b]
        for offset, name in sorted(fixes):
            if name not in vectors:
                raise EmbeddingNameError(f"embedding {name!r} in the prompt fixes has no vectors for this encoder")
            vec = vectors[name]
            n = vec.shape[0]
            if vec.dim() != 2 or vec.shape[1] != width:
                raise ModelLayoutError(f"embedding {name!r}: vectors {tuple(vec.shape)} "
                                       f"do not fit encoder width {width}")
            if offset < 1 or offset + n > seq_len:
                raise ModelLayoutError(f"embedding {name!r}: positions {offset}..{offset + n - 1} "
                                       f"outside 1..{seq_len - 1}")
            vec = vec.to(device=output.device, dtype=output.dtype)
            row = torch.cat([row[:offset], vec, row[offset + n :]], dim=0)
        rows.append(row)
    return torch.stack(rows, dim=0)


@contextmanager
def injected_embeddings(
    token_embedding: nn.Embedding,
    vectors: Mapping[str, torch.Tensor],
    batch_fixes: Sequence[Sequence[Fix]],
) -> Iterator[None]:
    """While active, every forward of ``token_embedding`` splices ``vectors`` in at ``batch_fixes``.

    ``token_embedding`` is the encoder's vocabulary embedding (see
    :func:`pivotal.adapters.te_names.token_embedding_of`); ``vectors`` maps names to (N, D) tensors (e.g.
    ``EmbeddingSet.vectors_for("clip_l")``). The hook is removed on exit, also on exceptions, so
    the encoder is then exactly as before.
    """
    fixes = [list(f) for f in batch_fixes]

    def hook(_module: nn.Module, _inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return splice_vectors(output, fixes, vectors)

    handle = token_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
