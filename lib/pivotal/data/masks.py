"""Loss masks: which part of each training image the loss looks at (``masked_loss``).

A mask comes from a mask folder (``mask_dir``: the image's relative path with the same stem and
any image extension, e.g. ``sub/a.jpg`` -> ``MASKS/sub/a.png``) or, without a mask folder, from the
image's own alpha channel. Grey levels are soft weights: white (255) = fully trained, black (0) =
the ``unmasked_weight``. A mask file is read as grey levels after EXIF orientation; its
transparent pixels count as black.

A mask goes through its image's geometry exactly (:func:`load_mask`): the resize to
``resized_hw``, the crop at ``crop_yx``, the flip. It must have the image's size (after
orientation); the pre-flight lists masks found, missing and of another size
(:mod:`pivotal.data.dataset`). The trainer then averages it down to the latent size
(:func:`latent_mask`).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pivotal.data.images import (
    DECODE_ERRORS,
    IMAGE_EXTENSIONS,
    ImageItem,
    ImageRejected,
    has_alpha,
    read_image_bytes,
    relative_name,
    to_rgb,
)
from pivotal.data.report import PreflightReport
from pivotal.errors import DatasetError

ALPHA = "alpha"


@dataclass(frozen=True)
class MaskRef:
    """Where an image's mask is: a file (``path``, relative ``name``, bytes' ``sha256``) or the
    image's own alpha channel (``path`` None, ``name`` "alpha")."""

    path: Path | None
    name: str
    sha256: str = ""


def index_masks(mask_dir: Path) -> dict[str, Path]:
    """{relative path without extension ("sub/a"): mask file} of every image file under
    ``mask_dir`` (hidden files skipped; of two masks with one stem, the first by name)."""
    index: dict[str, Path] = {}
    for path in sorted(mask_dir.rglob("*")):
        rel = path.relative_to(mask_dir)
        if any(part.startswith(".") for part in rel.parts) or not path.name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if path.is_file():
            index.setdefault(rel.with_suffix("").as_posix(), path)
    return index


def _grey(img: Image.Image) -> Image.Image:
    """8-bit grey levels of a mask file: transparency counts as black (not trained)."""
    return to_rgb(img, (0, 0, 0)).convert("L")


def alpha_of(img: Image.Image) -> Image.Image | None:
    """The alpha channel ("L") of ``img``, or None when it has none."""
    if has_alpha(img):
        return img.convert("RGBA").getchannel("A")
    return None


def decode_mask(data: bytes, name: str, from_alpha: bool) -> Image.Image:
    """The mask ("L", EXIF-oriented) in ``data``: a mask file's grey levels, or, when
    ``from_alpha``, the image's alpha channel. ImageRejected naming ``name`` when it cannot be read
    (or, from alpha, has none)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            oriented = ImageOps.exif_transpose(img)
            mask = alpha_of(oriented) if from_alpha else _grey(oriented)
    except DECODE_ERRORS as e:
        raise ImageRejected(name, f"the mask cannot be decoded: {e}") from e
    if mask is None:
        raise ImageRejected(name, "has no alpha channel to use as its mask")
    return mask


def read_mask(ref: MaskRef, item: ImageItem) -> Image.Image:
    """The mask of ``item`` ("L", the image's original orientation and size). DatasetError if the
    mask file (or, for an alpha mask, the image) changed since the pre-flight."""
    if ref.path is None:
        data = read_image_bytes(item.path, item.name)
        expect, name = item.sha256, item.name
    else:
        data = read_image_bytes(ref.path, ref.name)
        expect, name = ref.sha256, ref.name
    if hashlib.sha256(data).hexdigest() != expect:
        raise DatasetError(f"{name}: the file changed since the pre-flight check; run the pre-flight again")
    return decode_mask(data, name, ref.path is None)


def load_mask(ref: MaskRef, item: ImageItem, flip: bool) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1], H, W = ``item.target_hw``: the mask resized, cropped and
    flipped exactly as :func:`pivotal.data.images.crop_to_target` does the image (area average
    when shrinking, bilinear when enlarging: no ringing outside [0, 1])."""
    mask = read_mask(ref, item)
    (rh, rw), (y, x), (th, tw) = item.resized_hw, item.crop_yx, item.target_hw
    if mask.size != (rw, rh):
        shrink = rw <= mask.size[0] and rh <= mask.size[1]
        mask = mask.resize((rw, rh), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
    mask = mask.crop((x, y, x + tw, y + th))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(mask, dtype=np.float32) / 255.0).unsqueeze(0)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) averaged over each latent pixel's area: (B, 1, h, w)."""
    return F.interpolate(mask, size=latent_hw, mode="area")


def find_mask(mask_dir: str | os.PathLike[str], index: dict[str, Path], rel: str, has_alpha: bool,
              image_hw: tuple[int, int], report: PreflightReport) -> MaskRef | None:
    """Dataset image ``rel``'s mask: in ``mask_dir`` (``index``: :func:`index_masks` of it), or its
    alpha channel when ``mask_dir`` is empty; recorded in ``report`` (found, missing, or of another
    size: then None)."""
    if not mask_dir:
        if not has_alpha:
            report.masks_missing.append(rel)
            return None
        report.masks_found += 1
        return MaskRef(None, ALPHA)
    folder = Path(mask_dir)
    path = index.get(Path(rel).with_suffix("").as_posix())
    if path is None:
        report.masks_missing.append(rel)
        return None
    name = relative_name(path, folder)
    try:
        data = read_image_bytes(path, name)
        w, h = decode_mask(data, name, from_alpha=False).size
    except ImageRejected as e:
        report.errors.append(f"mask of {rel}: {e}")
        return None
    if (h, w) != image_hw:
        report.masks_mismatched.append(f"{name}: {w}x{h}, its image {rel} is {image_hw[1]}x{image_hw[0]}")
        return None
    report.masks_found += 1
    return MaskRef(path, name, hashlib.sha256(data).hexdigest())


def summarise_masks(report: PreflightReport, usable: int, list_first: int) -> None:
    """Refusals and warnings of the masks: sizes that differ, no mask at all, some missing."""
    if report.masks_mismatched:
        report.errors.append(f"{len(report.masks_mismatched)} mask(s) are not the size of their image:\n  "
                             + "\n  ".join(report.masks_mismatched[:list_first])
                             + "\nresize each mask to its image's size (after EXIF rotation)")
    if usable and not report.masks_found and not report.masks_mismatched:
        where = f"in {report.mask_source}" if report.mask_source != ALPHA else "(no image has an alpha channel)"
        report.errors.append(f"masked_loss: no mask found {where}; give mask_dir a folder of masks named like the "
                             "images, or set masked_loss to false")
    elif report.masks_missing:
        missing = report.masks_missing
        report.warnings.append(f"{len(missing)} image(s) have no mask and train on the whole picture: "
                               + ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
