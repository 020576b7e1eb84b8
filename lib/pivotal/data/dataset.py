"""The training dataset: folder scan, pre-flight check, and the batches the trainer reads.

``prepare_dataset(options, embedding_vectors, tokenizer)`` scans the folder, opens and decodes
every image and reads every caption *before* training, then either refuses with one
DatasetError listing every problem (its ``report`` attribute keeps the full report) or returns
the :class:`Dataset` and the :class:`~pivotal.data.report.PreflightReport`. Whatever the
pre-flight accepted decodes the same way mid-run. :func:`run_preflight` gives the report
without refusing (for a UI's "check dataset" button).

The scan is recursive; see :func:`pivotal.data.images.scan_folder` for hidden files and links.
With ``folder_repeats`` a kohya-style ``10_name`` sub-folder repeats its images and a
``loss_scale.txt`` weights its folder's loss (:mod:`pivotal.data.weighting`); with ``masked`` each
image gets a loss mask (:mod:`pivotal.data.masks`).

An image smaller than its bucket, and one over ``max_pixels`` or ``max_aspect``, is a bad image
like an unreadable one: the run refuses unless ``skip_bad_images`` (``upscale_small`` allows
small ones). See :mod:`pivotal.data.captions` for captions and the trigger,
:mod:`pivotal.data.buckets` for buckets and batch order, :mod:`pivotal.data.images` for decoding.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import torch

from pivotal.data.buckets import BucketBatches, closest_bucket, make_buckets, plan_crop, seeded_rng, upscale_factor
from pivotal.data.captions import (
    TOKEN_LIMIT,
    CaptionFinder,
    TokenCounter,
    apply_trigger,
    caption_for_step,
    normalize_caption,
    read_caption,
    split_tags,
)
from pivotal.data.images import (
    FolderScan,
    ImageItem,
    ImageRejected,
    count_extensions,
    decode_image,
    is_image_name,
    load_pixels,
    read_image_bytes,
    relative_name,
    scan_folder,
)
from pivotal.data.masks import ALPHA, MaskRef, find_mask, index_masks, load_mask, summarise_masks
from pivotal.data.report import LongCaption, PreflightReport, SkippedImage
from pivotal.data.weighting import LossScales, folder_repeats
from pivotal.errors import DatasetError
from pivotal.host_api import SizeInfo
from pivotal.text.names import validate_embedding_name

#: Bad images listed in a refusal message (all of them are in the report).
LIST_IN_ERROR = 20


@dataclass
class DatasetOptions:
    """Dataset settings; :meth:`validate` raises DatasetError naming a bad one.

    ``folder``: the images (searched recursively). ``resolution``: bucket area is
    resolution² (512 for SD1, 1024 for SDXL); a multiple of ``bucket_step`` (64; sides of every
    bucket are multiples of it, and of 8 for the VAE). ``bucketing`` (True): aspect-ratio
    buckets; False: every image is resized and centre-cropped to resolution². ``min_side`` /
    ``max_side`` (None: resolution/2 and resolution*2). ``batch_size`` (1). ``shuffle_tags``
    (False), ``keep_tags`` (1: the first tag, e.g. the prepended trigger, stays first).
    ``caption_dropout`` (0.0: probability that a caption becomes just the trigger). ``flip``
    (False: asymmetric subjects would be learned mirrored). ``skip_bad_images`` (False: a bad
    image refuses the run). ``upscale_small`` (False: an image smaller than its bucket is bad).
    ``max_pixels`` (64 MP, checked before decoding). ``max_aspect`` (8.0: wider or taller images
    are bad). ``background`` (white: what transparency is composited on). ``caption_extensions``
    ((".txt", ".caption"), in order of preference). ``seed`` (0: batch order, flips, shuffles).
    ``lossy_captions`` (False: a caption that is not valid UTF-8 refuses the run).
    ``folder_repeats`` (False: ``N_name`` folders and ``loss_scale.txt`` files mean nothing).
    ``masked`` (False): every image gets a loss mask, from ``mask_dir`` (a folder) or, when that
    is empty, from its alpha channel.
    """

    folder: str | os.PathLike[str]
    resolution: int = 512
    bucket_step: int = 64
    bucketing: bool = True
    min_side: int | None = None
    max_side: int | None = None
    batch_size: int = 1
    shuffle_tags: bool = False
    keep_tags: int = 1
    caption_dropout: float = 0.0
    flip: bool = False
    skip_bad_images: bool = False
    upscale_small: bool = False
    max_pixels: int = 64_000_000
    max_aspect: float = 8.0
    background: tuple[int, int, int] = (255, 255, 255)
    caption_extensions: tuple[str, ...] = (".txt", ".caption")
    seed: int = 0
    lossy_captions: bool = False
    folder_repeats: bool = False
    masked: bool = False
    mask_dir: str | os.PathLike[str] = ""

    def validate(self) -> "DatasetOptions":
        """Return self when every setting is usable, else raise DatasetError naming it."""
        def bad(setting: str, rule: str) -> DatasetError:
            return DatasetError(f"dataset setting {setting} = {getattr(self, setting)!r}: {rule}")

        if not str(self.folder):
            raise bad("folder", "no folder given")
        for name in ("bucketing", "shuffle_tags", "flip", "skip_bad_images", "upscale_small", "lossy_captions",
                     "folder_repeats", "masked"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        for name, low in (("resolution", 8), ("bucket_step", 8), ("batch_size", 1), ("keep_tags", 0),
                          ("max_pixels", 1), ("seed", None)):
            value = getattr(self, name)
            if not _is_int(value) or (low is not None and value < low):
                raise bad(name, "must be a whole number" + (f" >= {low}" if low is not None else ""))
        if self.bucket_step % 8:
            raise bad("bucket_step", "must be a multiple of 8 (the VAE downsamples by 8); 64 is usual")
        if self.resolution % self.bucket_step:
            raise bad("resolution", f"must be a multiple of bucket_step {self.bucket_step}")
        for name in ("min_side", "max_side"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < self.bucket_step or value % self.bucket_step):
                raise bad(name, f"must be None or a multiple of bucket_step {self.bucket_step}")
        if (self.min_side or 0) > self.resolution or (self.max_side or self.resolution) < self.resolution:
            raise DatasetError(f"dataset settings min_side {self.min_side} / max_side {self.max_side} must "
                               f"leave resolution {self.resolution} in between")
        if self.mask_dir and not Path(self.mask_dir).is_dir():
            raise bad("mask_dir", "is not a folder; give the folder of masks (or leave it empty for alpha channels)")
        if not _is_number(self.caption_dropout) or not 0.0 <= self.caption_dropout <= 1.0:
            raise bad("caption_dropout", "must be a probability between 0 and 1")
        if not _is_number(self.max_aspect) or not self.max_aspect >= 1.0:
            raise bad("max_aspect", "must be a number >= 1")
        bg = self.background
        if not isinstance(bg, (tuple, list)) or len(bg) != 3 or not all(_is_int(c) and 0 <= c <= 255 for c in bg):
            raise bad("background", "must be three whole numbers 0-255 (R, G, B)")
        exts = self.caption_extensions
        if (isinstance(exts, str) or not exts
                or not all(isinstance(e, str) and e.startswith(".") and len(e) > 1 for e in exts)
                or any(is_image_name(e) for e in exts)):
            raise bad("caption_extensions", 'must be a non-empty list like (".txt", ".caption")')
        return self


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class DatasetItem(ImageItem):
    """One training image: its pixel recipe (:class:`ImageItem`) plus its caption.

    ``caption``: with the trigger applied, before per-step shuffling/dropout. ``trigger``: the
    names it contains. ``caption_file``: relative path, None when missing or empty.
    ``tokens``: caption length in tokens (names as their vectors); None without a tokenizer.
    ``repeats``: times per epoch; ``loss_weight``: multiplies its loss; ``mask``: its loss mask
    (None: no masking, or no mask found: the whole image counts).
    """

    caption: str
    trigger: str
    caption_file: str | None
    tokens: int | None
    repeats: int = 1
    loss_weight: float = 1.0
    mask: MaskRef | None = None


def run_preflight(options: DatasetOptions, embedding_vectors: Mapping[str, int],
                  tokenizer: Any = None) -> tuple[list[DatasetItem], PreflightReport]:
    """Check the whole dataset; return the usable items and the report (refusals are in
    ``report.errors``, not raised, except for a bad setting or a folder without images)."""
    opts = options.validate()
    names = [validate_embedding_name(n) for n in embedding_vectors]
    for name, count in embedding_vectors.items():
        if not _is_int(count) or count < 1:
            raise DatasetError(f"embedding {name!r}: vector count {count!r} must be a whole number >= 1")
    folder = Path(opts.folder)
    scan = scan_folder(folder)
    report = PreflightReport(folder=str(folder), images_found=len(scan.images), hidden_files=scan.hidden,
                             skipped_links=list(scan.skipped_links), token_limit=TOKEN_LIMIT)
    report.warnings += [f"sub-folder {d} cannot be read; its files are not used" for d in scan.unreadable_folders]
    counter = TokenCounter(tokenizer, embedding_vectors) if tokenizer is not None else None
    if counter is not None:
        report.name_tokens = counter.name_tokens()
        report.warnings += counter.warnings
    buckets = (make_buckets(opts.resolution, opts.bucket_step, opts.min_side, opts.max_side) if opts.bucketing
               else [(opts.resolution, opts.resolution)])
    captions = CaptionFinder(scan.others, tuple(opts.caption_extensions))
    scales = LossScales(folder, scan.others) if opts.folder_repeats else None
    if scales is not None:
        report.errors += scales.errors
        report.loss_scales = dict(scales.values)
    mask_index = index_masks(Path(opts.mask_dir)) if opts.masked and opts.mask_dir else {}
    if opts.masked:
        report.mask_source = str(opts.mask_dir) if opts.mask_dir else ALPHA
    first_of: dict[str, str] = {}
    items: list[DatasetItem] = []
    background = (int(opts.background[0]), int(opts.background[1]), int(opts.background[2]))
    for path in scan.images:
        rel = relative_name(path, folder)
        try:
            decoded = decode_image(read_image_bytes(path, rel), rel, background, opts.max_pixels, opts.max_aspect)
        except ImageRejected as e:
            report.skipped.append(SkippedImage(rel, e.reason))
            continue
        report.warnings += decoded.notes
        w, h = decoded.rgb.size
        bw, bh = closest_bucket((w, h), buckets)
        factor = upscale_factor((h, w), (bh, bw))
        if factor > 1.0 and not opts.upscale_small:
            report.skipped.append(SkippedImage(rel, f"{w}x{h} is smaller than its {bw}x{bh} bucket "
                                                    f"(needs {factor:.2f}x upscaling); set upscale_small=True "
                                                    "or lower the resolution"))
            continue
        resized_hw, crop_yx = plan_crop((h, w), (bh, bw))
        caption_path = captions.find(path)
        text, caption_file = "", None
        if caption_path is not None:
            caption_rel = relative_name(caption_path, folder)
            try:
                raw, notes = read_caption(caption_path, caption_rel, opts.lossy_captions)
            except DatasetError as e:
                report.errors.append(str(e))  # all caption errors are collected, then refused at once
                raw, notes = "", []
            else:
                if not normalize_caption(raw):
                    report.empty_captions.append(caption_rel)
            report.warnings += notes
            text = normalize_caption(raw)
            caption_file = caption_rel if text else None
        if not text:
            report.missing_captions.append(rel)
        caption, trigger = apply_trigger(text, names)
        tokens = counter.count(caption) if counter is not None else None
        if tokens is not None and tokens > TOKEN_LIMIT:
            report.long_captions.append(LongCaption(caption_file or rel, tokens))
            report.warnings.append(f"caption {caption_file or rel} is {tokens} tokens, over the {TOKEN_LIMIT}-token "
                                   f"limit; training cuts it after token {TOKEN_LIMIT}")
        if decoded.sha256 in first_of:
            report.duplicates.append((first_of[decoded.sha256], rel))
            report.warnings.append(f"duplicate images (identical bytes): {first_of[decoded.sha256]} and {rel}")
        first_of.setdefault(decoded.sha256, rel)
        repeats, weight = 1, 1.0
        if scales is not None:
            try:
                found = folder_repeats(rel)
            except DatasetError as e:
                if str(e) not in report.errors:  # once per folder
                    report.errors.append(str(e))
                found = None
            if found is not None:
                repeats = report.repeats[found[0]] = found[1]
            weight = scales.of(path)
        mask = (find_mask(opts.mask_dir, mask_index, rel, decoded.has_alpha, (h, w), report) if opts.masked
                else None)
        items.append(DatasetItem(path=path, name=rel, sha256=decoded.sha256, original_hw=(h, w), resized_hw=resized_hw,
                                 crop_yx=crop_yx, target_hw=(bh, bw), background=background, caption=caption,
                                 trigger=trigger, caption_file=caption_file, tokens=tokens, repeats=repeats,
                                 loss_weight=weight, mask=mask))
    used = captions.used | (set(scales.files.values()) if scales is not None else set())
    _summarise(report, opts, items, scan, used, " ".join(names))
    if opts.masked:
        summarise_masks(report, len(items), LIST_IN_ERROR)
    return items, report


def _summarise(report: PreflightReport, opts: DatasetOptions, items: list[DatasetItem], scan: FolderScan,
               used: set[Path], trigger: str) -> None:
    report.images_usable = len(items)
    report.caption_files = len(used)
    report.ignored_files = count_extensions([p for p in scan.others if p not in used])
    for item in sorted(items, key=lambda i: (i.target_hw[1] / i.target_hw[0], i.target_hw)):
        key = f"{item.target_hw[1]}x{item.target_hw[0]}"
        report.buckets[key] = report.buckets.get(key, 0) + 1
    if report.empty_captions:
        more = " ..." if len(report.empty_captions) > 5 else ""
        report.warnings.append(f"{len(report.empty_captions)} empty caption file(s) treated as missing: "
                               + ", ".join(report.empty_captions[:5]) + more)
    missing = report.missing_captions
    if items and len(missing) >= len(items):
        report.warnings.append(f"no image has a caption ({'/'.join(opts.caption_extensions)} next to it); every image "
                               f"trains with just the trigger {trigger!r}")
    elif missing:
        report.warnings.append(f"{len(missing)} image(s) have no caption and train with just the trigger {trigger!r}: "
                               + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    if report.skipped:
        listed = "\n".join(f"  {s.path}: {s.reason}" for s in report.skipped[:LIST_IN_ERROR])
        more = f"\n  ... and {len(report.skipped) - LIST_IN_ERROR} more" if len(report.skipped) > LIST_IN_ERROR else ""
        if opts.skip_bad_images:
            report.warnings.append(f"{len(report.skipped)} image(s) skipped (skip_bad_images):\n{listed}{more}")
        else:
            report.errors.append(f"{len(report.skipped)} image(s) cannot be used:\n{listed}{more}\nfix or remove them, "
                                 "or set skip_bad_images=True to train without them")
    if not items:
        report.errors.append(f"no usable image in {report.folder}: all {report.images_found} were rejected")


def prepare_dataset(options: DatasetOptions, embedding_vectors: Mapping[str, int],
                    tokenizer: Any = None) -> tuple["Dataset", PreflightReport]:
    """Run the pre-flight and build the :class:`Dataset`; DatasetError (with ``.report``) for
    any refusal. ``embedding_vectors``: {name: N vectors}; the names are the trigger."""
    items, report = run_preflight(options, embedding_vectors, tokenizer)
    if report.errors:
        raise DatasetError(f"dataset {report.folder} refused:\n" + "\n".join(report.errors), report=report)
    return Dataset(items, options), report


@dataclass
class Batch:
    """One step's batch. ``sizes``/``flipped``/``captions`` are per item; all items share one
    bucket, so ``pixels`` (B, 3, H, W) float32 in [-1, 1] stacks; it is decoded on first access
    (not at all when the latents come from a cache)."""

    step: int
    indices: list[int]
    items: list[DatasetItem]
    captions: list[str]
    sizes: list[SizeInfo]
    flipped: list[bool]

    @cached_property
    def pixels(self) -> torch.Tensor:
        return torch.stack([load_pixels(item, flip) for item, flip in zip(self.items, self.flipped)])

    @property
    def loss_weights(self) -> torch.Tensor:
        """(B,) float32: each item's loss weight (its folder's ``loss_scale.txt``, else 1)."""
        return torch.tensor([item.loss_weight for item in self.items], dtype=torch.float32)


def item_mask(item: DatasetItem, flip: bool) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1]: the item's loss mask through its crop and flip; all ones for an
    item without one (it trains on the whole picture)."""
    if item.mask is None:
        return torch.ones(1, *item.target_hw)
    return load_mask(item.mask, item, flip)


class Dataset:
    """The images the trainer reads, with a batch order that is a pure function of (seed, step)."""

    def __init__(self, items: list[DatasetItem], options: DatasetOptions) -> None:
        if not items:
            raise DatasetError(f"dataset {options.folder}: no usable image")
        self.items = list(items)
        self.options = options
        self.order = BucketBatches([item.target_hw for item in self.items], options.batch_size, options.seed,
                                   [item.repeats for item in self.items])

    def __len__(self) -> int:
        return len(self.items)

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch

    def caption_at(self, index: int, step: int) -> str:
        """Item ``index``'s caption at ``step`` (dropout and tag shuffling applied)."""
        item, o = self.items[index], self.options
        return caption_for_step(item.caption, item.trigger, seed=o.seed, step=step, index=index,
                                shuffle=o.shuffle_tags, keep_tags=o.keep_tags, dropout=o.caption_dropout)

    def flip_at(self, index: int, step: int) -> bool:
        """Whether item ``index`` is mirrored at ``step`` (p = 0.5 when ``flip`` is on)."""
        return self.options.flip and seeded_rng("flip", self.options.seed, step, index).random() < 0.5

    def size_info(self, index: int, flipped: bool) -> SizeInfo:
        """SDXL size conditioning; when flipped, the crop is mirrored: x -> resized_w - target_w - x."""
        item = self.items[index]
        y, x = item.crop_yx
        if flipped:
            x = item.resized_hw[1] - item.target_hw[1] - x
        return SizeInfo(original=item.original_hw, crop_top_left=(y, x), target=item.target_hw)

    def batch_at(self, step: int) -> Batch:
        """The batch of ``step`` (0-based); the same for the same (seed, step), always."""
        indices = self.order.batch_at(step)
        flipped = [self.flip_at(i, step) for i in indices]
        return Batch(step=step, indices=indices, items=[self.items[i] for i in indices],
                     captions=[self.caption_at(i, step) for i in indices],
                     sizes=[self.size_info(i, f) for i, f in zip(indices, flipped)], flipped=flipped)

    def tag_frequency(self) -> dict[str, int]:
        """{tag: images whose caption has it} over the base captions (for ss_tag_frequency)."""
        counts: dict[str, int] = {}
        for item in self.items:
            for tag in set(split_tags(item.caption)):
                counts[tag] = counts.get(tag, 0) + 1
        return counts
