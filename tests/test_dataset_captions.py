"""Caption files (encodings), the trigger, tag shuffling, dropout and token counting."""

from __future__ import annotations

import codecs
import random
from pathlib import Path

import pytest

from pivotal.data.buckets import seeded_rng
from pivotal.data.captions import (
    TOKEN_LIMIT,
    CaptionFinder,
    TokenCounter,
    apply_trigger,
    caption_for_step,
    normalize_caption,
    read_caption,
    shuffle_tags,
    split_tags,
)
from pivotal.errors import DatasetError
from tiny_text import bpe_path, clip_tokenizer

needs_bpe = pytest.mark.skipif(bpe_path() is None, reason="open_clip_torch (its BPE file) is not installed")
TEXT = "mychar, café ☕, smiling"


# ------------------------------------------------------------------ encodings


@pytest.mark.parametrize("data", [
    TEXT.encode("utf-8"),
    codecs.BOM_UTF8 + TEXT.encode("utf-8"),
    codecs.BOM_UTF16_LE + TEXT.encode("utf-16-le"),
    codecs.BOM_UTF16_BE + TEXT.encode("utf-16-be"),
    codecs.BOM_UTF32_LE + TEXT.encode("utf-32-le"),
], ids=["utf8", "utf8-bom", "utf16-le-bom", "utf16-be-bom", "utf32-le-bom"])
def test_caption_encodings_are_detected(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    assert read_caption(path, "a.txt") == (TEXT, [])


def test_invalid_utf8_names_file_and_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("mychar, caf".encode() + b"\xe9, smiling")  # Latin-1 e-acute
    with pytest.raises(DatasetError, match=r"^caption sub/latin1\.txt: not valid UTF-8 at byte 11 \(0xe9\); "
                                           r"re-save the file as UTF-8, or set lossy_captions=True"):
        read_caption(path, "sub/latin1.txt")


def test_offset_counts_from_the_first_byte_with_a_bom(tmp_path: Path) -> None:
    path = tmp_path / "b.txt"
    path.write_bytes(codecs.BOM_UTF8 + b"ab\xff")
    with pytest.raises(DatasetError, match=r"at byte 5 \(0xff\)"):
        read_caption(path, "b.txt")


def test_lossy_captions_replace_and_warn(tmp_path: Path) -> None:
    path = tmp_path / "c.txt"
    path.write_bytes(b"caf\xe9 au lait")
    text, warnings = read_caption(path, "c.txt", lossy=True)
    assert text == "caf\ufffd au lait"
    assert warnings == ["caption c.txt: not valid UTF-8 at byte 3 (0xe9); "
                        "bad bytes replaced with U+FFFD (lossy_captions)"]


def test_utf16_without_bom_is_refused_not_misread(tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes("smiling".encode("utf-16-le"))
    with pytest.raises(DatasetError, match=r"^caption d\.txt: contains NUL characters .* re-save the file as UTF-8$"):
        read_caption(path, "d.txt")


def test_normalize_joins_lines_and_collapses_space() -> None:
    assert normalize_caption("  a photo,\r\n\n of   mychar \t\n") == "a photo, of mychar"
    assert normalize_caption(" \n\t ") == ""


def test_caption_finder_order_and_case(tmp_path: Path) -> None:
    image = tmp_path / "img.png"
    txt, cap, upper = tmp_path / "img.txt", tmp_path / "img.caption", tmp_path / "other.TXT"
    assert CaptionFinder([cap, txt], (".txt", ".caption")).find(image) == txt
    assert CaptionFinder([cap, txt], (".caption", ".txt")).find(image) == cap
    assert CaptionFinder([upper], (".txt",)).find(tmp_path / "other.jpg") == upper
    finder = CaptionFinder([txt], (".caption",))
    assert finder.find(image) is None and finder.used == set()


# ------------------------------------------------------------------ trigger


@pytest.mark.parametrize("caption,expected,trigger", [
    ("a photo of mychar smiling", "a photo of mychar smiling", "mychar"),
    ("[mychar] smiling", "mychar smiling", "mychar"),
    ("[ MyChar ] smiling", "mychar smiling", "mychar"),
    ("MyChar's hat", "MyChar's hat", "mychar"),
    ("a smiling woman", "mychar, a smiling woman", "mychar"),
    ("mychar2 on a bench", "mychar, mychar2 on a bench", "mychar"),  # not a whole-word match
    ("", "mychar", "mychar"),
])
def test_trigger_single_name(caption: str, expected: str, trigger: str) -> None:
    assert apply_trigger(caption, ["mychar"]) == (expected, trigger)


def test_trigger_several_names() -> None:
    assert apply_trigger("a cat", ["hero", "style"]) == ("hero style, a cat", "hero style")
    assert apply_trigger("[style] painting of hero", ["hero", "style"]) == ("style painting of hero", "style hero")
    assert apply_trigger("", ["hero", "style"]) == ("hero style", "hero style")
    assert apply_trigger("just text", []) == ("just text", "")


# ------------------------------------------------------------------ shuffle and dropout


def test_shuffle_keeps_first_tags_in_place() -> None:
    caption = "mychar, " + ", ".join(f"tag{i}" for i in range(12))
    seen = set()
    for step in range(20):
        out = caption_for_step(caption, "mychar", seed=3, step=step, index=0, shuffle=True, keep_tags=1)
        tags = split_tags(out)
        assert tags[0] == "mychar" and sorted(tags) == sorted(split_tags(caption))
        seen.add(out)
    assert len(seen) > 10
    kept = shuffle_tags("a, b, c, d, e, f", 3, random.Random(0))
    assert kept.startswith("a, b, c, ")
    assert shuffle_tags(" a ,, b ,", 0, random.Random(0)) in ("a, b", "b, a")


def test_caption_for_step_is_a_pure_function() -> None:
    caption = "mychar, red, blue, green, yellow, tall"
    args = dict(seed=5, shuffle=True, keep_tags=1, dropout=0.3)
    first = [caption_for_step(caption, "mychar", step=s, index=i, **args) for s in range(30) for i in range(3)]
    again = [caption_for_step(caption, "mychar", step=s, index=i, **args) for s in range(30) for i in range(3)]
    assert first == again
    other_seed = [caption_for_step(caption, "mychar", step=s, index=i, **{**args, "seed": 6})
                  for s in range(30) for i in range(3)]
    assert first != other_seed


def test_caption_dropout_rate_and_result() -> None:
    outs = [caption_for_step("mychar, smiling", "mychar", seed=0, step=s, index=0, dropout=0.25) for s in range(2000)]
    dropped = sum(o == "mychar" for o in outs)
    assert 400 < dropped < 600
    assert {o for o in outs} == {"mychar", "mychar, smiling"}
    assert all(caption_for_step("x", "t", seed=0, step=s, index=1, dropout=1.0) == "t" for s in range(20))
    assert all(caption_for_step("x", "t", seed=0, step=s, index=1, dropout=0.0) == "x" for s in range(20))


def test_global_random_state_is_untouched() -> None:
    random.seed(1234)
    state = random.getstate()
    caption_for_step("a, b, c, d", "a", seed=0, step=7, index=2, shuffle=True, dropout=0.5)
    seeded_rng("flip", 0, 1, 2).random()
    assert random.getstate() == state


# ------------------------------------------------------------------ tokens


@needs_bpe
def test_token_counter_expands_names_to_their_vectors() -> None:
    tok = clip_tokenizer()
    plain = len(tok.encode("a photo of mychar", add_special_tokens=False))
    assert TokenCounter(tok, {"mychar": 1}).count("a photo of mychar") == plain - 1  # 2 name tokens -> 1 vector
    assert TokenCounter(tok, {"mychar": 10}).count("a photo of mychar") == plain - 2 + 10
    assert TokenCounter(tok, {"mychar": 4}).count("mychar and mychar") == 4 + 1 + 4


@needs_bpe
def test_token_counter_name_tokens_and_warnings() -> None:
    counter = TokenCounter(clip_tokenizer(), {"mychar": 2, "cat": 1})
    assert counter.name_tokens() == {"mychar": ["my", "char</w>"], "cat": ["cat</w>"]}
    assert len(counter.warnings) == 1 and "'cat'" in counter.warnings[0]


def test_token_limit_is_75() -> None:
    assert TOKEN_LIMIT == 75
