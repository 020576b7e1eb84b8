"""``<lora:…>`` tags as the webui's built-in Lora extension reads them (A1111 1.10
``extra_networks_lora.activate``): positional TE and UNet strengths, named ``te=`` / ``unet=``."""

from __future__ import annotations

import pytest

from pivotal.errors import ConfigError
from pivotal.inference.lora_tags import LoraTag, parse_lora_tags


@pytest.mark.parametrize("prompt, clean, tags", [
    ("a cat", "a cat", []),
    ("<lora:style>", "", [LoraTag("style", 1.0, 1.0)]),
    ("a <lora:style:0.6> cat", "a cat", [LoraTag("style", 0.6, 0.6)]),
    ("a cat, <lora: my style v2 : -0.25 >", "a cat,", [LoraTag("my style v2", -0.25, -0.25)]),
    ("<LoRA:A:1e-1>x<lora:b.v1:2>", "x", [LoraTag("A", 0.1, 0.1), LoraTag("b.v1", 2.0, 2.0)]),
    ("line one <lora:a>\n  line two", "line one\nline two", [LoraTag("a")]),
    ("<hypernet:h:1> <lora:a", "<hypernet:h:1> <lora:a", []),  # not a lora tag / unterminated: text
    # A1111: the second positional is the UNet's; named values win; UNet follows TE when not given
    ("<lora:a:1:0.5>", "", [LoraTag("a", 1.0, 0.5)]),
    ("<lora:a:te=0:unet=0.8>", "", [LoraTag("a", 0.0, 0.8)]),
    ("<lora:a:unet=0>", "", [LoraTag("a", 1.0, 0.0)]),
    ("<lora:a:0.7:unet=0>", "", [LoraTag("a", 0.7, 0.0)]),
    ("<lora:a:TE=0.3>", "", [LoraTag("a", 0.3, 0.3)]),
])
def test_parse_lora_tags(prompt: str, clean: str, tags: list) -> None:
    assert parse_lora_tags(prompt) == (clean, tags)


@pytest.mark.parametrize("prompt, message", [
    ("<lora:>", "no LoRA name"),
    ("<lora: :1>", "no LoRA name"),
    ("<lora:a:strong>", "'strong' is not a number"),
    ("<lora:a:>", "is not a number"),
    ("<lora:a:inf>", "finite"),
    ("<lora:a:nan>", "finite"),
    ("<lora:a:1:0.5:4>", "at most two weights"),
    ("<lora:a:dyn=4>", "dyn= .dynamic rank. is not supported"),
    ("<lora:a:clip=1>", "unknown setting 'clip'"),
    ("<lora:a:te=1:te=2>", "te= is given twice"),
    ("<lora:a:unet=1:0.5>", "a plain weight cannot follow"),
    ("<lora:a:1> <lora:A:0.5>", "tagged twice"),
])
def test_parse_lora_tag_errors(prompt: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_lora_tags(prompt)


@pytest.mark.parametrize("tag", [LoraTag("x", 0.5, 0.5), LoraTag("x", 0.0, 1.0), LoraTag("x", 1.0, 0.0)])
def test_tag_text_reads_back_the_same(tag: LoraTag) -> None:
    assert parse_lora_tags(tag.text()) == ("", [tag])
