"""The real CLIP tokenizer, built offline from open_clip's BPE file and cached on disk.

SD1.x and SDXL use OpenAI's CLIP tokenizer for every text encoder (SDXL's second one pads with
"!" instead of the end token). Its files are fully determined by ``bpe_simple_vocab_16e6.txt.gz``
(see :mod:`pivotal.text.clip_vocab`), so models that ship no tokenizer folder (single-file
checkpoints, the demo models) get it from there; nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pivotal.errors import ConfigError
from pivotal.text.clip_vocab import find_open_clip_bpe, write_clip_tokenizer_files

#: Environment variable naming the folder for files Pivotal caches (the CLIP tokenizer).
CACHE_ENV = "PIVOTAL_CACHE_DIR"
TOKENIZER_FOLDER = "clip-tokenizer"
INSTALL_HINT = "pip install --no-deps open_clip_torch"
#: Encoder key -> the pad token its tokenizer uses when it is not the end token.
PAD_TOKENS = {"clip_g": "!"}


def default_cache_dir() -> Path:
    """``$PIVOTAL_CACHE_DIR``, else the user's cache folder + ``pivotal``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if os.name == "nt":
        base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pivotal"


def ensure_tokenizer_files(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding CLIP's ``vocab.json`` + ``merges.txt``, written once from open_clip's BPE file.

    The folder is filled under a temporary name and renamed into place, so a crash or a second
    process never leaves a half-written tokenizer. ConfigError when open_clip_torch is missing or
    the cache folder is not writable.
    """
    folder = Path(cache_dir if cache_dir is not None else default_cache_dir()) / TOKENIZER_FOLDER
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    bpe = find_open_clip_bpe()
    if bpe is None:
        raise ConfigError("this model needs CLIP's tokenizer file bpe_simple_vocab_16e6.txt.gz, which ships "
                          f"with open_clip_torch; it is not installed. Install it with: {INSTALL_HINT}")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{TOKENIZER_FOLDER}-", dir=folder.parent))
    except OSError as e:
        raise ConfigError(f"cannot write the CLIP tokenizer cache under {folder.parent}: {e}; "
                          f"set {CACHE_ENV} to a writable folder") from e
    try:
        try:
            write_clip_tokenizer_files(bpe, tmp)
        except ValueError as e:
            raise ConfigError(f"{bpe}: cannot build the CLIP tokenizer from it: {e}") from e
        try:
            os.replace(tmp, folder)
        except OSError as e:
            # Another process renamed its copy into place first: theirs is complete, use it.
            if not (folder / "vocab.json").is_file():
                raise ConfigError(f"cannot write the CLIP tokenizer cache {folder}: {e}; "
                                  f"set {CACHE_ENV} to a writable folder") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def clip_tokenizer(key: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """A real ``CLIPTokenizer`` for encoder ``key``; clip_g's pads with "!" (id 0) like SDXL's tokenizer_2."""
    from transformers import CLIPTokenizer

    folder = ensure_tokenizer_files(cache_dir)
    # from_pretrained, not the constructor: transformers 5's CLIPTokenizer(vocab_file=...)
    # ignores the files and builds a 3-token vocabulary.
    kwargs: dict[str, Any] = {"pad_token": PAD_TOKENS[key]} if key in PAD_TOKENS else {}
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77, **kwargs)
