"""Build CLIP's BPE tokenizer files (vocab.json + merges.txt) offline.

OpenAI's CLIP tokenizer is fully determined by ``bpe_simple_vocab_16e6.txt.gz``, which
open_clip ships inside its package folder. From it we write the two files that
``transformers.CLIPTokenizer`` reads, so tests and the standalone host never need a hub download.

Layout (facts of the original tokenizer, reproduced here, not guessed):

* merges = lines ``[1 : 49152 - 256 - 2 + 1]`` of the decoded text (line 0 is a header);
* vocab order = the 256 byte-to-unicode characters, the same 256 with ``</w>``, every merge
  joined, then ``<|startoftext|>`` and ``<|endoftext|>``: 49408 entries in all.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# 49152 BPE symbols in the original vocab, minus the 256 byte symbols and the 2 specials.
_MERGE_COUNT = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte value 0..255 to a printable unicode character, in CLIP's order.

    Printable Latin-1 bytes map to themselves; the rest (control chars, space, ...) are moved to
    code points 256 and up so BPE never sees whitespace or control characters. The dict's
    insertion order is the order the vocabulary lists them in.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    byte_values = list(printable)
    code_points = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, code_points)}


def read_merges(bpe_gz_path: str | Path) -> list[tuple[str, str]]:
    """The 48894 merge pairs of the gzipped BPE file, in rank order."""
    with gzip.open(bpe_gz_path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGE_COUNT + 1]]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if len(merges) != _MERGE_COUNT or bad:
        raise ValueError(
            f"{bpe_gz_path}: expected {_MERGE_COUNT} merge lines of two symbols each, got "
            f"{len(merges)} lines ({len(bad)} malformed); is this OpenAI's {BPE_FILE_NAME}?"
        )
    return [(m[0], m[1]) for m in merges]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Token string -> id, in CLIP's order (49408 entries for the full merge list)."""
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer_files(bpe_gz_path: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for ``transformers.CLIPTokenizer`` into ``out_dir``.

    Returns ``(vocab_json_path, merges_txt_path)``. ``out_dir`` is created if missing; existing
    files of those names are overwritten.
    """
    merges = read_merges(bpe_gz_path)
    vocab = build_vocab(merges)
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_gz_path}: built {len(vocab)} vocabulary entries, expected {VOCAB_SIZE}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_path = out / "vocab.json"
    merges_path = out / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # transformers 4.x skips the first line of merges.txt and `tokenizers` skips a '#version'
    # line, so the conventional header keeps both readers aligned on the first real merge.
    body = "\n".join(f"{a} {b}" for a, b in merges)
    merges_path.write_text("#version: 0.2\n" + body + "\n", encoding="utf-8")
    return vocab_path, merges_path


def find_open_clip_bpe() -> Path | None:
    """Locate open_clip's ``bpe_simple_vocab_16e6.txt.gz`` without importing open_clip.

    Importing ``open_clip`` pulls in torchvision (not installable in every environment), so the
    package folder is found through import metadata only. Returns None when it is not installed.
    """
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        folders = list(spec.submodule_search_locations or [])
        if spec.origin:
            folders.append(str(Path(spec.origin).parent))
        for folder in folders:
            candidate = Path(folder) / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    for dist_name in ("open_clip_torch", "open-clip-torch"):
        try:
            files = importlib.metadata.files(dist_name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == BPE_FILE_NAME:
                located = Path(str(f.locate()))
                if located.is_file():
                    return located
    return None
