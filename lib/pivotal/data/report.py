"""The pre-flight report: what the dataset check found, as JSON (``to_dict``) and text (``format``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: How many files a text list shows before "... and N more".
SHOW_FIRST = 5


@dataclass
class SkippedImage:
    """An image that cannot be used: ``path`` relative to the dataset folder, and why."""

    path: str
    reason: str


@dataclass
class LongCaption:
    """A caption over the token limit; ``path`` is its caption file (or the image, for a caption
    that is only the trigger), ``tokens`` its count with names expanded to their vectors."""

    path: str
    tokens: int


@dataclass
class PreflightReport:
    """Everything the pre-flight check found. Paths are relative to ``folder``, with "/".

    ``errors`` are refusals (the run does not start while there is one); ``warnings`` are
    worth reading but do not stop it. ``name_tokens`` is empty when no tokenizer was given.
    ``repeats``: {``N_name`` folder: N}; ``loss_scales``: {``loss_scale.txt`` file: value}.
    ``mask_source``: the mask folder, "alpha", or "" (no masked loss); masks ``found`` (count),
    ``missing`` (images) and ``mismatched`` (mask and image sizes).
    """

    folder: str
    images_found: int = 0
    images_usable: int = 0
    skipped: list[SkippedImage] = field(default_factory=list)
    ignored_files: dict[str, int] = field(default_factory=dict)
    hidden_files: int = 0
    skipped_links: list[str] = field(default_factory=list)
    caption_files: int = 0
    missing_captions: list[str] = field(default_factory=list)
    empty_captions: list[str] = field(default_factory=list)
    long_captions: list[LongCaption] = field(default_factory=list)
    token_limit: int = 75
    duplicates: list[tuple[str, str]] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    name_tokens: dict[str, list[str]] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    loss_scales: dict[str, float] = field(default_factory=dict)
    mask_source: str = ""
    masks_found: int = 0
    masks_missing: list[str] = field(default_factory=list)
    masks_mismatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing refuses the run."""
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict of every field, plus ``ok``."""
        out = asdict(self)
        out["duplicates"] = [list(pair) for pair in self.duplicates]
        out["ok"] = self.ok
        return out

    def format(self) -> str:
        """A human-readable multi-line summary."""
        lines = [f"Dataset pre-flight: {self.folder}",
                 f"  images: {self.images_found} found, {self.images_usable} usable, {len(self.skipped)} skipped"]
        lines += [f"    skipped {s.path}: {s.reason}" for s in self.skipped[:SHOW_FIRST]]
        lines += _more(self.skipped)
        if self.ignored_files or self.hidden_files:
            ignored = ", ".join(f"{ext} x{n}" for ext, n in sorted(self.ignored_files.items())) or "none"
            lines.append(f"  ignored files: {ignored}; hidden: {self.hidden_files}")
        if self.skipped_links:
            lines.append(f"  links not followed: {', '.join(self.skipped_links[:SHOW_FIRST])}"
                         + _tail(self.skipped_links))
        lines.append(f"  captions: {self.caption_files} file(s), {len(self.missing_captions)} image(s) "
                     "without a caption (trained with the trigger only)")
        if self.missing_captions:
            lines.append(f"    without: {', '.join(self.missing_captions[:SHOW_FIRST])}" + _tail(self.missing_captions))
        if self.long_captions:
            lines.append(f"  captions over {self.token_limit} tokens (cut there in training):")
            lines += [f"    {c.path}: {c.tokens} tokens" for c in self.long_captions[:SHOW_FIRST]]
            lines += _more(self.long_captions)
        if self.duplicates:
            lines.append("  duplicates (identical files): "
                         + "; ".join(f"{a} = {b}" for a, b in self.duplicates[:SHOW_FIRST]) + _tail(self.duplicates))
        if self.buckets:
            lines.append("  buckets (w x h): " + ", ".join(f"{b}: {n}" for b, n in self.buckets.items()))
        if self.repeats:
            lines.append("  repeats (N_name folders): " + ", ".join(f"{f}: x{n}" for f, n in self.repeats.items()))
        if self.loss_scales:
            lines.append("  loss weights (loss_scale.txt): "
                         + ", ".join(f"{f}: {v:g}" for f, v in self.loss_scales.items()))
        if self.mask_source:
            lines.append(f"  masks ({self.mask_source}): {self.masks_found} found, {len(self.masks_missing)} missing, "
                         f"{len(self.masks_mismatched)} of another size")
            if self.masks_missing:
                lines.append(f"    missing: {', '.join(self.masks_missing[:SHOW_FIRST])}" + _tail(self.masks_missing))
            lines += [f"    size: {m}" for m in self.masks_mismatched[:SHOW_FIRST]]
            lines += _more(self.masks_mismatched)
        for name, tokens in self.name_tokens.items():
            lines.append(f"  {name!r} tokenizes as {' | '.join(tokens)}")
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  ERROR: {e}" for e in self.errors]
        return "\n".join(lines)


def _tail(items: list[Any]) -> str:
    return f" ... and {len(items) - SHOW_FIRST} more" if len(items) > SHOW_FIRST else ""


def _more(items: list[Any]) -> list[str]:
    return [f"    ... and {len(items) - SHOW_FIRST} more"] if len(items) > SHOW_FIRST else []
