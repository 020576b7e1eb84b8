"""``<lora:…>`` prompt tags, read exactly as the webui's built-in Lora extension reads them.

``<lora:NAME>`` (strength 1), ``<lora:NAME:W>`` (text encoder and UNet both W),
``<lora:NAME:TE:UNET>`` (positional), and the named form ``<lora:NAME:te=T:unet=U>`` (named values
win over positional ones; a missing UNet strength follows the text encoder's, as in A1111 1.10).
These named multipliers are what the ablation grid's columns are made of: ``unet=0`` keeps only
the text-encoder part, ``te=0`` only the UNet part, and strength 0 keeps only the embeddings.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pivotal.errors import ConfigError

LORA_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)
#: any other ``<kind:…>`` tag of the webui's extra-networks syntax (hypernet, …): left as text here
OTHER_TAG = re.compile(r"<([A-Za-z_]\w*):[^<>]*>")


@dataclass(frozen=True)
class LoraTag:
    """One tag: the bundle's file name (without ``.safetensors``) and its two strengths."""

    name: str
    te: float = 1.0
    unet: float = 1.0

    @property
    def weight(self) -> float:
        """The single strength of ``<lora:NAME:W>`` (the text encoder's when they differ)."""
        return self.te

    def text(self) -> str:
        """The tag, written back in the shortest form that means the same."""
        if self.te == self.unet:
            return f"<lora:{self.name}:{self.te:g}>"
        return f"<lora:{self.name}:te={self.te:g}:unet={self.unet:g}>"


def _number(tag: str, what: str, text: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ConfigError(f"prompt tag {tag!r}: {what} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"prompt tag {tag!r}: {what} must be a finite number")
    return value


def parse_tag(tag: str, body: str) -> LoraTag:
    """The :class:`LoraTag` of one tag's inside (``NAME:…``); ConfigError naming the tag when bad."""
    name, *args = body.split(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"prompt tag {tag!r} has no LoRA name; write <lora:NAME:WEIGHT>")
    positional: list[float] = []
    named: dict[str, float] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq:
            if named:
                raise ConfigError(f"prompt tag {tag!r}: a plain weight cannot follow te=/unet=")
            positional.append(_number(tag, "weight", arg))
            continue
        key = key.strip().lower()
        if key == "dyn":
            raise ConfigError(f"prompt tag {tag!r}: dyn= (dynamic rank) is not supported by Pivotal")
        if key not in ("te", "unet"):
            raise ConfigError(f"prompt tag {tag!r}: unknown setting {key!r} (only te= and unet=)")
        if key in named:
            raise ConfigError(f"prompt tag {tag!r}: {key}= is given twice")
        named[key] = _number(tag, f"{key}=", value)
    if len(positional) > 2:
        raise ConfigError(f"prompt tag {tag!r}: at most two weights, <lora:NAME:TE:UNET>; "
                          "dynamic rank (a third) is not supported")
    te = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else te)
    return LoraTag(name, te, unet)


def parse_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """``(prompt without the tags, [LoraTag, ...])`` in prompt order.

    The tag word is case-insensitive, spaces around names and numbers are ignored, and spaces left
    where a tag was are collapsed. ConfigError for a tag without a name, a weight that is not a
    finite number, or a name given twice (case-insensitively).
    """
    tags: list[LoraTag] = []
    seen: dict[str, str] = {}

    def take(match: re.Match[str]) -> str:
        tag = parse_tag(match.group(0), match.group(1))
        if tag.name.lower() in seen:
            raise ConfigError(f"LoRA {tag.name!r} is tagged twice ({seen[tag.name.lower()]!r} and "
                              f"{match.group(0)!r}); give it once, with the weight you want")
        seen[tag.name.lower()] = match.group(0)
        tags.append(tag)
        return " "

    clean = LORA_TAG.sub(take, prompt)
    clean = re.sub(r"[ \t]{2,}", " ", clean)
    clean = "\n".join(line.strip() for line in clean.split("\n")).strip()
    return clean, tags
