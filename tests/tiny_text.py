"""Tiny, real text encoders and the real CLIP tokenizer for tests (no downloads).

* :func:`clip_tokenizer`: ``transformers.CLIPTokenizer`` built from open_clip's shipped BPE file.
* :func:`hf_text_model`: a seeded 2-layer HF ``CLIPTextModel`` (vocab 49408).
* :func:`openclip_text_tower`: a seeded 2-layer open_clip ``TextTransformer``, the real class
  from ``open_clip/transformer.py``, i.e. the layout of SDXL's second encoder in A1111.
"""

from __future__ import annotations

import atexit
import functools
import importlib
import importlib.util
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pivotal.text.clip_vocab import find_open_clip_bpe, write_clip_tokenizer_files

# (hidden, heads) of the "clip_l"-like and "clip_g"-like tiny encoders.
TINY_DIMS = {"clip_l": (32, 4), "clip_g": (64, 4)}
TINY_LAYERS = 2
_OPEN_CLIP_ALIAS = "pivotal_tests_open_clip"


def bpe_path() -> Path | None:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, or None when open_clip is not installed."""
    return find_open_clip_bpe()


@functools.lru_cache(maxsize=None)
def _tokenizer_dir() -> str:
    path = bpe_path()
    if path is None:
        raise RuntimeError("open_clip_torch is not installed; its BPE file is needed for the CLIP tokenizer")
    # Lives for the test session (the tokenizer may re-read it), removed at interpreter exit.
    out = tempfile.mkdtemp(prefix="pivotal-clip-tok-")
    atexit.register(shutil.rmtree, out, True)
    write_clip_tokenizer_files(path, out)
    return out


@functools.lru_cache(maxsize=None)
def clip_tokenizer() -> Any:
    """The shared real CLIP tokenizer (cached per session); never mutate it — see :func:`new_clip_tokenizer`."""
    return new_clip_tokenizer()


def new_clip_tokenizer() -> Any:
    """A new real CLIP BPE tokenizer (safe to mutate, e.g. by diffusers' load_textual_inversion).

    ``from_pretrained`` on the folder works with transformers 4.30 and 5; transformers 5's
    ``CLIPTokenizer(vocab_file=, merges_file=)`` silently ignores the files and builds a
    3-token vocabulary, so the constructor is not used.
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tokenizer_dir(), local_files_only=True, model_max_length=77)


def hf_text_config(key: str = "clip_l", layers: int = TINY_LAYERS) -> Any:
    """``CLIPTextConfig`` of a tiny encoder; ``hidden_act`` "gelu" matches open_clip's nn.GELU."""
    from transformers import CLIPTextConfig

    hidden, heads = TINY_DIMS[key]
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        projection_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def hf_text_model(key: str = "clip_l", seed: int = 0, layers: int = TINY_LAYERS) -> nn.Module:
    """A seeded tiny HF ``CLIPTextModel`` in eval mode; last hidden state (B, 77, hidden)."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(hf_text_config(key, layers)).eval()


class _FrozenBatchNorm2dStandIn(nn.Module):
    """Stand-in for torchvision's FrozenBatchNorm2d; only vision towers would build one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("torchvision stand-in: FrozenBatchNorm2d is not available in tests")


@functools.lru_cache(maxsize=None)
def open_clip_transformer_module() -> types.ModuleType:
    """Import ``open_clip/transformer.py`` without running ``open_clip/__init__.py``.

    The package ``__init__`` imports the vision/training stack, which needs torchvision, and
    torchvision cannot be installed in these environments. So a bare parent package (under a
    private alias, so a later real ``import open_clip`` is not shadowed) gets ``__path__`` set to
    the open_clip folder, and ``transformer`` is imported as its submodule. ``open_clip/utils.py``
    does ``from torchvision.ops.misc import FrozenBatchNorm2d`` (used only to freeze vision
    towers); when torchvision is missing a minimal stand-in module is placed in ``sys.modules``
    just for that import and removed afterwards.
    """
    path = bpe_path()
    if path is None:
        raise RuntimeError("open_clip_torch is not installed")
    if _OPEN_CLIP_ALIAS not in sys.modules:
        parent = types.ModuleType(_OPEN_CLIP_ALIAS)
        parent.__path__ = [str(path.parent)]  # type: ignore[attr-defined]
        sys.modules[_OPEN_CLIP_ALIAS] = parent
    stand_ins: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("torchvision") is None:
        for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
            mod = types.ModuleType(name)
            if name != "torchvision.ops.misc":
                mod.__path__ = []  # type: ignore[attr-defined]
            stand_ins[name] = mod
        stand_ins["torchvision.ops.misc"].FrozenBatchNorm2d = _FrozenBatchNorm2dStandIn  # type: ignore[attr-defined]
        stand_ins["torchvision"].ops = stand_ins["torchvision.ops"]  # type: ignore[attr-defined]
        stand_ins["torchvision.ops"].misc = stand_ins["torchvision.ops.misc"]  # type: ignore[attr-defined]
        sys.modules.update(stand_ins)
    try:
        return importlib.import_module(f"{_OPEN_CLIP_ALIAS}.transformer")
    finally:
        for name, mod in stand_ins.items():
            if sys.modules.get(name) is mod:
                del sys.modules[name]


def openclip_text_tower(key: str = "clip_g", seed: int = 0, layers: int = TINY_LAYERS) -> nn.Module:
    """A seeded tiny open_clip ``TextTransformer`` (eval), returning ``(pooled, tokens)``.

    Only constructor arguments shared by open_clip 2.20 and 3.3 are passed. Note the blocks'
    ``nn.MultiheadAttention`` is sequence-first in 2.20 and ``batch_first=True`` in 3.3.
    """
    hidden, heads = TINY_DIMS[key]
    module = open_clip_transformer_module()
    torch.manual_seed(seed)
    tower = module.TextTransformer(
        context_length=77,
        vocab_size=49408,
        width=hidden,
        heads=heads,
        layers=layers,
        output_dim=hidden,
        act_layer=nn.GELU,
        output_tokens=True,
    )
    return tower.eval()


def encode_hf(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden state (B, 77, hidden) of an HF CLIP text model for ids (B, 77)."""
    return model(input_ids=ids).last_hidden_state


def encode_openclip(tower: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Token states after ``ln_final`` (B, 77, width) of an open_clip text tower for ids (B, 77)."""
    return tower(ids)[1]
