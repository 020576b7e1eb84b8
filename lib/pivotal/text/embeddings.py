"""Trainable textual-inversion embeddings, host-agnostic.

An ``EmbeddingSet`` holds named embeddings; each has N vectors per text-encoder key
("clip_l" for SD1 and SDXL's first encoder, "clip_g" for SDXL's second), stored as fp32
``nn.Parameter`` of shape (N, dim). All embeddings of one set cover the same encoder keys with
the same dims, and one embedding has the same N for every key, because one placeholder run in
the prompt is filled from every encoder at once.

The set is deliberately not an ``nn.Module``: embedding names would become attribute names and
clash with module methods ("eval", "training", "keys" ...).
"""

from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from pivotal.errors import EmbeddingNameError, ModelLayoutError
from pivotal.text.names import validate_embedding_name


def init_vectors_from_ids(vocab: torch.Tensor, ids: Sequence[int], num_vectors: int) -> torch.Tensor:
    """Vectors (num_vectors, dim) fp32 from the init text's token ids, spread as A1111 does.

    ``vocab`` is the token-embedding weight (V, dim). With T ids, ``vec[i] = vocab[ids[i*T//N]]``:
    a short text is repeated, a long one sampled evenly.
    """
    count = len(ids)
    picks = [int(ids[i * count // num_vectors]) for i in range(num_vectors)]
    index = torch.tensor(picks, dtype=torch.long, device=vocab.device)
    return vocab.detach().index_select(0, index).to(torch.float32).clone()


def random_vectors(
    vocab: torch.Tensor, num_vectors: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Vectors (num_vectors, dim) fp32 drawn from N(0, std(vocab)), on CPU when a CPU generator is given."""
    std = vocab.detach().to(torch.float32).std()
    device = generator.device if generator is not None else vocab.device
    noise = torch.randn(num_vectors, vocab.shape[1], generator=generator, device=device, dtype=torch.float32)
    return (noise * std.to(device)).to(vocab.device)


class EmbeddingSet:
    """Named trainable embeddings: ``{name: {encoder_key: Parameter (N, dim) fp32}}``."""

    def __init__(self) -> None:
        self._params: dict[str, dict[str, nn.Parameter]] = {}

    def __len__(self) -> int:
        return len(self._params)

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._params))

    def names(self) -> list[str]:
        """Embedding names in insertion order."""
        return list(self._params)

    def encoder_keys(self) -> tuple[str, ...]:
        """Encoder keys every embedding of the set covers (empty while the set is empty)."""
        for per_key in self._params.values():
            return tuple(per_key)
        return ()

    def num_vectors(self, name: str) -> int:
        """N, the number of vectors (prompt positions) of embedding ``name``."""
        return next(iter(self._get(name).values())).shape[0]

    def dim(self, key: str) -> int:
        """Vector width for encoder ``key`` (the set must hold at least one embedding)."""
        for per_key in self._params.values():
            if key in per_key:
                return per_key[key].shape[1]
        raise ModelLayoutError(f"encoder key {key!r}: no embedding in the set has vectors for it")

    def _get(self, name: str) -> dict[str, nn.Parameter]:
        if name not in self._params:
            have = ", ".join(self._params) or "none"
            raise EmbeddingNameError(f"embedding {name!r} is not in the set (have: {have})")
        return self._params[name]

    def _check_new(self, name: str, vectors: Mapping[str, torch.Tensor]) -> None:
        validate_embedding_name(name)
        for existing in self._params:
            if existing.lower() == name.lower():
                raise EmbeddingNameError(
                    f"embedding name {name!r} clashes with {existing!r} already in the set "
                    "(names must differ in more than letter case)"
                )
        if not vectors:
            raise ModelLayoutError(f"embedding {name!r}: no encoder vectors given")
        counts = set()
        for key, t in vectors.items():
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] < 1 or t.shape[1] < 1:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ModelLayoutError(f"embedding {name!r} [{key}]: expected a (N, dim) tensor, got {shape}")
            if not t.is_floating_point():
                raise ModelLayoutError(f"embedding {name!r} [{key}]: expected floating-point vectors, got {t.dtype}")
            counts.add(t.shape[0])
        if len(counts) != 1:
            per = ", ".join(f"{k}={t.shape[0]}" for k, t in vectors.items())
            raise ModelLayoutError(f"embedding {name!r}: vector counts differ between encoders ({per})")
        have = self.encoder_keys()
        if have and set(have) != set(vectors):
            raise ModelLayoutError(
                f"embedding {name!r}: covers encoders {sorted(vectors)}, the set uses {sorted(have)}"
            )
        for key, t in vectors.items():
            if have and t.shape[1] != self.dim(key):
                raise ModelLayoutError(
                    f"embedding {name!r} [{key}]: width {t.shape[1]} != {self.dim(key)} of the set"
                )

    def add(self, name: str, vectors: Mapping[str, torch.Tensor]) -> None:
        """Add embedding ``name`` with ``{encoder_key: Tensor (N, dim)}``; copied to fp32 Parameters.

        Raises EmbeddingNameError for an invalid or duplicate name (case-insensitive), and
        ModelLayoutError when the shapes or keys do not fit the set.
        """
        self._check_new(name, vectors)
        self._params[name] = {
            key: nn.Parameter(t.detach().to(torch.float32).clone(), requires_grad=True)
            for key, t in vectors.items()
        }

    def add_new(
        self,
        name: str,
        num_vectors: int,
        vocabularies: Mapping[str, torch.Tensor],
        init_ids: Mapping[str, Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Create embedding ``name`` with ``num_vectors`` vectors for every encoder in ``vocabularies``.

        ``vocabularies[key]`` is that encoder's token-embedding weight (V, dim). ``init_ids[key]``
        are the init text's token ids for that encoder (no BOS/EOS); when missing or empty the
        vectors are random at the vocabulary's standard deviation.
        """
        if not isinstance(num_vectors, int) or num_vectors < 1:
            raise ModelLayoutError(f"embedding {name!r}: num_vectors must be a positive int, got {num_vectors!r}")
        vectors: dict[str, torch.Tensor] = {}
        for key, vocab in vocabularies.items():
            ids = list((init_ids or {}).get(key) or [])
            bad = [i for i in ids if not 0 <= int(i) < vocab.shape[0]]
            if bad:
                raise ModelLayoutError(f"embedding {name!r} [{key}]: init token ids {bad} "
                                       f"outside vocabulary of {vocab.shape[0]}")
            if ids:
                vectors[key] = init_vectors_from_ids(vocab, ids, num_vectors)
            else:
                vectors[key] = random_vectors(vocab, num_vectors, generator)
        self.add(name, vectors)

    def vectors_for(self, key: str) -> dict[str, nn.Parameter]:
        """``{name: Parameter (N, dim)}`` for one encoder key (what an injector splices in)."""
        return {name: per_key[key] for name, per_key in self._params.items() if key in per_key}

    def parameters(self) -> list[nn.Parameter]:
        """Every trainable vector tensor, for an optimizer."""
        return [p for per_key in self._params.values() for p in per_key.values()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``("name.key", Parameter)`` pairs."""
        return [(f"{n}.{k}", p) for n, per_key in self._params.items() for k, p in per_key.items()]

    def requires_grad_(self, flag: bool = True) -> EmbeddingSet:
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    def to_(self, device: torch.device | str) -> EmbeddingSet:
        """Move every vector to ``device`` in place, keeping Parameter identity (optimizers stay valid)."""
        for p in self.parameters():
            p.data = p.data.to(device)
        return self

    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Detached fp32 copies: ``{name: {encoder_key: Tensor (N, dim)}}``."""
        return {n: {k: p.detach().clone() for k, p in per_key.items()} for n, per_key in self._params.items()}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> EmbeddingSet:
        """Build a set from ``{name: {encoder_key: Tensor (N, dim)}}`` (the inverse of :meth:`tensors`)."""
        out = cls()
        for name, per_key in tensors.items():
            out.add(name, per_key)
        return out
