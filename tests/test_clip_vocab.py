"""The offline CLIP tokenizer files and the open_clip text-tower loader."""

from __future__ import annotations

import gzip
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pivotal.text.clip_vocab import (
    BOS_TOKEN,
    EOS_TOKEN,
    VOCAB_SIZE,
    bytes_to_unicode,
    find_open_clip_bpe,
    write_clip_tokenizer_files,
)
from tiny_text import clip_tokenizer, open_clip_transformer_module, openclip_text_tower

BPE = find_open_clip_bpe()
needs_bpe = pytest.mark.skipif(BPE is None, reason="open_clip_torch (its BPE file) is not installed")
LIB = str(Path(__file__).resolve().parents[1] / "lib")


def test_bytes_to_unicode_covers_all_bytes_once() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert list(table.values())[0] == "!"  # printable bytes first, in byte order
    assert table[ord(" ")] == chr(256 + 32)  # space is moved out of the printable range


@needs_bpe
def test_find_bpe_does_not_import_open_clip() -> None:
    # A fresh interpreter, so modules other tests imported do not hide an import made here.
    code = (
        "import sys; from pivotal.text.clip_vocab import find_open_clip_bpe; p = find_open_clip_bpe(); "
        "print(p is not None and p.is_file(), 'open_clip' in sys.modules, 'torchvision' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": LIB}, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "False", "False"]


@needs_bpe
def test_written_files_have_clip_layout(tmp_path: Path) -> None:
    vocab_path, merges_path = write_clip_tokenizer_files(BPE, tmp_path / "tok")
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    assert len(vocab) == VOCAB_SIZE
    assert vocab[BOS_TOKEN] == 49406 and vocab[EOS_TOKEN] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    lines = merges_path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#version")
    assert len(lines) == 1 + 49152 - 256 - 2
    with gzip.open(BPE, "rt", encoding="utf-8") as fh:
        source = fh.read().split("\n")
    assert lines[1] == source[1] and lines[-1] == source[49152 - 256 - 2]
    # Every merge's joined form is a vocabulary entry, at 512 + its rank.
    first = "".join(lines[1].split())
    assert vocab[first] == 512


@needs_bpe
def test_clip_tokenizer_matches_reference_ids() -> None:
    tok = clip_tokenizer()
    assert len(tok) == VOCAB_SIZE
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.encode("a photo of a cat", add_special_tokens=False) == [320, 1125, 539, 320, 2368]
    assert tok.convert_ids_to_tokens([1152, 2368]) == ["my", "cat</w>"]
    assert tok.encode("mycat", add_special_tokens=False) == [1152, 2368]


@needs_bpe
def test_open_clip_tower_loads_without_torchvision_left_behind() -> None:
    tower = openclip_text_tower()
    module = open_clip_transformer_module()
    assert type(tower) is module.TextTransformer
    assert Path(module.__file__).parent == BPE.parent  # the real open_clip source file
    if importlib.util.find_spec("torchvision") is None:
        # The stand-in existed only during the import.
        assert not any(name.split(".")[0] == "torchvision" for name in sys.modules)
        assert "open_clip" not in sys.modules
