"""Finding training images in a folder, decoding them safely, and turning one into pixels.

One pipeline serves the pre-flight check and training, so an image that passed the pre-flight
decodes the same way mid-run:

1. read the file's bytes once (its SHA-256 is the image's identity for duplicates and latents);
2. ``Image.open`` from those bytes: the format is detected by content, so a PNG named ``.jpg``
   is fine. Pillow's decompression-bomb warning is silenced *for this call only*
   (``warnings.catch_warnings``); our own cap (``max_pixels``) is checked on the header size
   before any pixel is decoded. ``Image.MAX_IMAGE_PIXELS`` is never changed;
3. refuse empty or extreme-aspect images from the header size;
4. first frame only (animated GIF/WebP/APNG, multi-page TIFF), then ``load()``;
5. ``ImageOps.exif_transpose`` before anything else looks at the pixels;
6. to 8-bit RGB with :func:`to_rgb` (alpha composited on a flat background, 16-bit and float
   scaled by their range, CMYK converted by Pillow, which undoes Adobe's inverted CMYK JPEGs).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from pivotal.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
RGB = tuple[int, int, int]

#: Errors Pillow raises for a file it cannot open or decode (plugins differ: SyntaxError for a
#: broken PNG chunk, EOFError/struct.error for a short header, OSError for truncated data).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_DEEP_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


class ImageRejected(DatasetError):
    """One image cannot be used; ``name`` is the file (relative to the dataset), ``reason`` why."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")


@dataclass(frozen=True)
class DecodedImage:
    """An image ready to crop: ``rgb`` is 8-bit RGB, EXIF-oriented; ``notes`` are warnings."""

    rgb: Image.Image
    sha256: str
    animated: bool
    notes: tuple[str, ...]
    #: the file has an alpha channel or a transparent colour (usable as a loss mask)
    has_alpha: bool = False


@dataclass(frozen=True)
class ImageItem:
    """Everything needed to rebuild one training image's pixels exactly.

    Sizes are ``(h, w)``, the crop corner ``(y, x)``: decode, resize to ``resized_hw``
    (LANCZOS), crop ``target_hw`` at ``crop_yx``. ``original_hw`` is after EXIF orientation.
    ``background`` is the RGB that transparent pixels are composited on.
    """

    path: Path
    name: str
    sha256: str
    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_yx: tuple[int, int]
    target_hw: tuple[int, int]
    background: RGB


def is_image_name(name: str) -> bool:
    """True when the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def read_image_bytes(path: Path, name: str) -> bytes:
    """The file's bytes; ImageRejected for an unreadable or empty file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageRejected(name, f"cannot read the file ({e.strerror or e})") from e
    if not data:
        raise ImageRejected(name, "the file is empty (0 bytes)")
    return data


def decode_image(
    data: bytes,
    name: str,
    background: RGB,
    max_pixels: int | None = None,
    max_aspect: float | None = None,
) -> DecodedImage:
    """Decode ``data`` through the whole pipeline of the module docstring.

    Raises ImageRejected (naming ``name`` and the reason) for anything that cannot be used;
    ``max_pixels`` / ``max_aspect`` are checked on the header, before decoding pixels.
    """
    digest = hashlib.sha256(data).hexdigest()
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            # Per call only: our own max_pixels is the limit that applies (checked below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_header(img.size, name, max_pixels, max_aspect)
                animated = bool(getattr(img, "is_animated", False))
                if animated:
                    img.seek(0)
                img.load()
                alpha = has_alpha(img)
                rgb = _orient_and_convert(img, name, background, notes)
    except Image.UnidentifiedImageError as e:
        raise ImageRejected(name, "not an image Pillow can read (unknown format or a damaged header)") from e
    except Image.DecompressionBombError as e:
        # Only above max_pixels set past Pillow's own hard limit; that limit is never changed.
        raise ImageRejected(name, f"refused by Pillow's decompression-bomb limit: {e}") from e
    except DECODE_ERRORS as e:
        raise ImageRejected(name, f"cannot decode: {e}") from e
    if animated:
        notes.append(f"{name}: animated image; only the first frame is used")
    return DecodedImage(rgb, digest, animated, tuple(notes), alpha)


def _check_header(size: tuple[int, int], name: str, max_pixels: int | None, max_aspect: float | None) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageRejected(name, f"size {w}x{h} has no pixels")
    if max_pixels is not None and w * h > max_pixels:
        raise ImageRejected(
            name,
            f"{w}x{h} is {w * h / 1e6:.1f} megapixels, over the {max_pixels / 1e6:g}-megapixel limit "
            "(max_pixels); downscale it first",
        )
    aspect = max(w / h, h / w)
    if max_aspect is not None and aspect > max_aspect:
        raise ImageRejected(
            name, f"{w}x{h} has an aspect ratio of {aspect:.1f}:1, over the {max_aspect:g}:1 limit; crop it first"
        )


def _orient_and_convert(img: Image.Image, name: str, background: RGB, notes: list[str]) -> Image.Image:
    try:
        oriented = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError, struct.error) as e:
        # Broken EXIF is common (phone editors); the pixels are still good, so use them as stored.
        notes.append(f"{name}: EXIF orientation unreadable ({e}); image used as stored")
        oriented = img.copy()  # a copy: the caller closes ``img`` (and its file) on return
    try:
        return to_rgb(oriented, background)
    except ValueError as e:
        raise ImageRejected(name, f"colour mode {oriented.mode} cannot be converted to RGB ({e})") from e


def has_alpha(img: Image.Image) -> bool:
    """True when ``img`` has an alpha channel or a ``transparency`` entry."""
    return img.mode in _ALPHA_MODES or "transparency" in img.info


def to_rgb(img: Image.Image, background: RGB = (255, 255, 255)) -> Image.Image:
    """8-bit RGB from any Pillow mode.

    * alpha (RGBA, LA, PA, premultiplied) or a ``transparency`` entry (P, L, RGB with tRNS):
      alpha-composited on ``background``, so colour hidden under alpha 0 never shows (a plain
      ``convert("RGB")`` would drop the alpha and reveal it);
    * 16-bit and 32-bit integer (I;16*, I) and float (F): scaled to 0..255 by their range, see
      :func:`deep_to_8bit` (``convert`` would clamp everything above 255 to white);
    * everything else (L, 1, P, CMYK, YCbCr, RGBX): ``convert("RGB")``.
    """
    if img.mode in _DEEP_MODES:
        img = deep_to_8bit(img)
    if has_alpha(img):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    return img.convert("RGB")


def deep_to_8bit(img: Image.Image) -> Image.Image:
    """An ``L`` image from a 16/32-bit integer or float one, scaled by the range its values use.

    I;16*: 0..65535. I: 0..255 if all values fit, else 0..65535 if they fit, else min..max.
    F: 0..1 if all values fit, else 0..255, else 0..65535, else min..max. Non-finite floats
    become 0 (NaN must not reach the VAE). A constant image outside those ranges becomes black.
    """
    arr = np.asarray(img).astype(np.float64)
    arr = np.where(np.isfinite(arr), arr, 0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        ranges = [65535.0]
    elif img.mode == "I":
        ranges = [255.0, 65535.0]
    else:
        ranges = [1.0, 255.0, 65535.0]
    top = next((r for r in ranges if lo >= 0 and hi <= r), None)
    if top is None:
        span = hi - lo
        scaled = (arr - lo) / span * 255.0 if span > 0 else np.zeros_like(arr)
    else:
        scaled = arr / top * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


@dataclass
class FolderScan:
    """Files found under a dataset folder by :func:`scan_folder`: images, other visible files
    (captions among them), and what was left out."""

    images: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)
    hidden: int = 0
    skipped_links: list[str] = field(default_factory=list)
    unreadable_folders: list[str] = field(default_factory=list)


def relative_name(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder``, with "/" on every platform (how reports name files)."""
    return path.relative_to(folder).as_posix()


def _is_hidden(entry: os.DirEntry) -> bool:
    if entry.name.startswith("."):
        return True
    if os.name != "nt":  # the hidden attribute exists on Windows only; spare an lstat per file
        return False
    try:
        attributes = getattr(entry.stat(follow_symlinks=False), "st_file_attributes", 0)
    except OSError:
        return False
    return bool(attributes & getattr(stat, "FILE_ATTRIBUTE_HIDDEN", 2))


def scan_folder(folder: Path) -> FolderScan:
    """Walk ``folder`` recursively (images sorted by relative path); DatasetError naming it and
    the accepted extensions when it is missing, empty or has no supported image.

    Hidden files and folders (name starting with "." or the Windows hidden attribute) are
    skipped. A symlinked file is followed only when it points inside the folder; a symlinked
    folder never (one inside is scanned anyway, one outside is not part of the dataset). Other
    files are never opened, only listed, so ``Thumbs.db`` or ``.fits`` cannot fail the scan.
    """
    accepted = " ".join(IMAGE_EXTENSIONS)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise DatasetError(f"dataset folder {folder} {what}; give a folder of images ({accepted})")
    root, scan, pending = folder.resolve(), FolderScan(), [folder]
    while pending:
        current = pending.pop()
        try:
            with os.scandir(current) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            if current == folder:
                raise DatasetError(f"dataset folder {folder} cannot be read ({e.strerror or e})") from e
            scan.unreadable_folders.append(relative_name(current, folder))
            continue
        for entry in entries:
            path = Path(entry.path)
            if _is_hidden(entry):
                scan.hidden += 1
                continue
            if entry.is_symlink():
                try:
                    target = path.resolve()
                except (OSError, RuntimeError):  # a link loop: RuntimeError before Python 3.13
                    scan.skipped_links.append(f"{relative_name(path, folder)} (cannot be resolved)")
                    continue
                if target != root and root not in target.parents:
                    scan.skipped_links.append(f"{relative_name(path, folder)} (points outside the folder)")
                    continue
                if not target.is_file():
                    scan.skipped_links.append(f"{relative_name(path, folder)} (folder link or broken link)")
                    continue
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif entry.is_file():
                (scan.images if is_image_name(entry.name) else scan.others).append(path)
    scan.images.sort(key=lambda p: relative_name(p, folder))
    if not scan.images:
        if not scan.others and not scan.hidden:
            raise DatasetError(f"dataset folder {folder} is empty; add images ({accepted}) with .txt captions")
        counts = sorted(count_extensions(scan.others).items())
        found = ", ".join(f"{ext} x{n}" for ext, n in counts) or "hidden files only"
        raise DatasetError(f"dataset folder {folder} has no supported images (accepted: {accepted}); found: {found}")
    return scan


def count_extensions(paths: list[Path]) -> dict[str, int]:
    """{lower-case extension or "(no extension)": number of files}."""
    counts: dict[str, int] = {}
    for p in paths:
        key = p.suffix.lower() or "(no extension)"
        counts[key] = counts.get(key, 0) + 1
    return counts


def load_rgb(item: ImageItem) -> Image.Image:
    """The item's image, decoded and converted (not yet resized); DatasetError if the file
    changed since the pre-flight (a different file must not train under the old latents)."""
    data = read_image_bytes(item.path, item.name)
    decoded = decode_image(data, item.name, item.background)
    if decoded.sha256 != item.sha256:
        raise DatasetError(
            f"{item.path}: the file changed since the pre-flight check; run the pre-flight again"
        )
    return decoded.rgb


def crop_to_target(img: Image.Image, item: ImageItem, flip: bool) -> Image.Image:
    """Resize ``img`` to ``item.resized_hw`` (LANCZOS), crop ``item.target_hw`` at
    ``item.crop_yx``, then mirror left-right when ``flip``."""
    (rh, rw), (y, x), (th, tw) = item.resized_hw, item.crop_yx, item.target_hw
    if img.size != (rw, rh):
        # reducing_gap: a cheap box-reduce first for big downscales; same look, much faster.
        img = img.resize((rw, rh), Image.Resampling.LANCZOS, reducing_gap=3.0)
    img = img.crop((x, y, x + tw, y + th))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] from an 8-bit RGB image."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8)  # np.array: a writable copy for torch
    return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(127.5).sub_(1.0)


def load_pixels(item: ImageItem, flip: bool) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], H, W = ``item.target_hw``; mirrored left-right when ``flip``."""
    return pil_to_tensor(crop_to_target(load_rgb(item), item, flip))
