"""Caption files, the trigger, tag shuffling, caption dropout and token counting.

Caption file of ``photo.png``: ``photo.txt`` or ``photo.caption`` next to it (the first
extension in ``caption_extensions`` that exists wins). Files are read as bytes and decoded
explicitly, never with the OS default codec: UTF-8, with or without a BOM (what "utf-8-sig"
accepts; the BOM is stripped here so error offsets count from the file's first byte), or
UTF-16/UTF-32 when the file starts with their BOM. Lines are joined with ", " (lines ending in
a comma do not get a second one) and runs of whitespace become one space.

The trigger: the embedding names. A caption may contain a name literally (``mychar smiling``)
or in brackets (``[mychar] smiling``; the brackets are removed). A caption that contains none
of the names gets all of them prepended: ``"name1 name2, caption"``. A missing or empty caption
becomes just the trigger ``"name1 name2"``. Names match case-insensitively (CLIP lowercases
prompts) and only as whole words (``mychar2`` does not contain ``mychar``).

Per step, with ``seeded_rng("caption", seed, step, index)`` (so a resumed run sees the same):
caption dropout (probability p) replaces the caption by its trigger (the names it contains);
tag shuffling splits on ",", keeps the first ``keep_tags`` tags in place (a prepended trigger
is the first tag, so it counts as one of them) and shuffles the rest.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pivotal.data.buckets import seeded_rng
from pivotal.errors import DatasetError
from pivotal.text.inject import CLIP_EOS_ID, CONTEXT_LENGTH, PromptTokenizer, encode_plain

#: Tokens between BOS and EOS in CLIP's 77-token window.
TOKEN_LIMIT = CONTEXT_LENGTH - 2

# Longest BOM first: UTF-32-LE's BOM starts with UTF-16-LE's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16"),
)
_WORD_CHARS = "A-Za-z0-9_-"


def read_caption(path: Path, name: str, lossy: bool = False) -> tuple[str, list[str]]:
    """``(text, warnings)`` of a caption file, decoded as described in the module docstring.

    Invalid bytes raise DatasetError naming ``name`` and the byte offset, unless ``lossy``: then
    they become U+FFFD and a warning says so. NUL characters (a UTF-16 file saved without a BOM
    looks like that) are refused the same way.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"caption {name}: cannot read the file ({e.strerror or e})") from e
    codec, label, skip = "utf-8", "UTF-8", 0
    for bom, bom_codec, bom_label in _BOMS:
        if data.startswith(bom):
            codec, label, skip = bom_codec, bom_label, len(bom)
            break
    warnings: list[str] = []
    try:
        text = data[skip:].decode(codec)
    except UnicodeDecodeError as e:
        offset = skip + e.start
        problem = f"not valid {label} at byte {offset} (0x{data[offset]:02x})"
        if not lossy:
            raise DatasetError(
                f"caption {name}: {problem}; re-save the file as UTF-8, or set lossy_captions=True "
                "to replace the bad bytes"
            ) from e
        text = data[skip:].decode(codec, errors="replace")
        warnings.append(f"caption {name}: {problem}; bad bytes replaced with U+FFFD (lossy_captions)")
    if "\x00" in text:
        problem = "contains NUL characters (UTF-16 saved without a byte-order mark?)"
        if not lossy:
            raise DatasetError(f"caption {name}: {problem}; re-save the file as UTF-8")
        text = text.replace("\x00", "")
        warnings.append(f"caption {name}: {problem}; NULs removed (lossy_captions)")
    return text, warnings


def normalize_caption(text: str) -> str:
    """One line: lines joined with ", " (a trailing comma of a line is dropped first), whitespace
    runs collapsed, ends trimmed."""
    lines = [re.sub(r"\s+", " ", line).strip().rstrip(",").rstrip() for line in text.splitlines()]
    return ", ".join(line for line in lines if line)


def _name_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![{_WORD_CHARS}]){re.escape(name)}(?![{_WORD_CHARS}])", re.IGNORECASE)


def apply_trigger(caption: str, names: Sequence[str]) -> tuple[str, str]:
    """``(caption, trigger)``: brackets around names removed; all names prepended when the
    caption contains none of them. ``trigger`` is the names the result contains, space-separated
    in order of first appearance (what caption dropout leaves)."""
    for name in names:
        caption = re.sub(rf"\[\s*{re.escape(name)}\s*\]", lambda _m: name, caption, flags=re.IGNORECASE)
    found = []
    for name in names:
        match = _name_pattern(name).search(caption)
        if match:
            found.append((match.start(), name))
    if found:
        return caption, " ".join(name for _, name in sorted(found))
    trigger = " ".join(names)
    if not caption:
        return trigger, trigger
    return (f"{trigger}, {caption}" if trigger else caption), trigger


def split_tags(caption: str) -> list[str]:
    """Tags of a caption: split on ",", stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def shuffle_tags(caption: str, keep: int, rng: Any) -> str:
    """The caption with every tag after the first ``keep`` shuffled by ``rng.shuffle``."""
    tags = split_tags(caption)
    head, tail = tags[:keep], tags[keep:]
    rng.shuffle(tail)
    return ", ".join(head + tail)


def caption_for_step(
    caption: str,
    trigger: str,
    *,
    seed: int,
    step: int,
    index: int,
    shuffle: bool = False,
    keep_tags: int = 1,
    dropout: float = 0.0,
) -> str:
    """The caption item ``index`` trains with at ``step``: dropout first (-> ``trigger``), then
    tag shuffling; a pure function of its arguments."""
    rng = seeded_rng("caption", seed, step, index)
    # Always draw, so the shuffle below sees the same stream whatever the dropout setting.
    if rng.random() < dropout:
        return trigger
    if shuffle:
        return shuffle_tags(caption, keep_tags, rng)
    return caption


def token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Token strings of ``ids`` (``mychar`` -> ``["my", "char</w>"]`` with CLIP's BPE)."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    if callable(convert):
        return [str(t) for t in convert(list(ids))]
    decoder = getattr(tokenizer, "decoder", None)  # open_clip's SimpleTokenizer: id -> token
    if isinstance(decoder, Mapping):
        return [str(decoder.get(i, i)) for i in ids]
    return [str(i) for i in ids]


class TokenCounter:
    """Counts a caption's tokens as training will see them: each embedding name counts as its
    N vectors (``vectors`` = {name: N}), not as the tokens of its spelling.

    ``warnings`` holds the name warnings of :class:`PromptTokenizer` (e.g. a name that is one
    ordinary vocabulary word); names that clash raise EmbeddingNameError from it.
    """

    def __init__(self, tokenizer: Any, vectors: Mapping[str, int]) -> None:
        # pad_id does not matter for counting; EOS is what HF CLIP pads with.
        self._prompts = PromptTokenizer(tokenizer, vectors, pad_id=CLIP_EOS_ID)
        self.tokenizer = tokenizer
        self.warnings = list(self._prompts.warnings)
        self._by_first: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name, ids in sorted(self._prompts.name_ids.items(), key=lambda kv: -len(kv[1])):
            self._by_first.setdefault(ids[0], []).append((ids, name))

    def name_tokens(self) -> dict[str, list[str]]:
        """{name: token strings of its spelling}."""
        return {name: token_strings(self.tokenizer, ids) for name, ids in self._prompts.name_ids.items()}

    def count(self, caption: str) -> int:
        """Tokens between BOS and EOS, names expanded to their vector counts (longest name first,
        the same matching :class:`PromptTokenizer` does)."""
        tokens = encode_plain(self.tokenizer, caption)
        total, i = 0, 0
        while i < len(tokens):
            for ids, name in self._by_first.get(tokens[i], ()):
                if tuple(tokens[i : i + len(ids)]) == ids:
                    total += self._prompts.num_vectors[name]
                    i += len(ids)
                    break
            else:
                total += 1
                i += 1
        return total


class CaptionFinder:
    """Finds the caption file of an image among the folder's non-image files.

    For ``dir/photo.png`` and each extension in order: ``dir/photo<ext>`` exactly, else the
    same name in another letter case (``photo.TXT`` copied from Windows to a Linux drive).
    ``used`` collects the files found, so the rest can be reported as ignored.
    """

    def __init__(self, files: Sequence[Path], extensions: Sequence[str]) -> None:
        self.extensions = tuple(extensions)
        self._exact = set(files)
        self._folded: dict[tuple[Path, str], Path] = {}
        for p in sorted(files):
            self._folded.setdefault((p.parent, p.name.lower()), p)
        self.used: set[Path] = set()

    def find(self, image: Path) -> Path | None:
        """The caption file of ``image``, or None."""
        for ext in self.extensions:
            wanted = image.with_name(image.stem + ext)
            hit = wanted if wanted in self._exact else self._folded.get((image.parent, wanted.name.lower()))
            if hit is not None:
                self.used.add(hit)
                return hit
        return None
