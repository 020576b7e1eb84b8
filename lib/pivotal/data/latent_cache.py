"""Cache of VAE latents per (image, crop, flip, model), in memory and optionally on disk.

The key is the SHA-256 of: the image file's SHA-256 (its bytes, not its path), the resize and
crop (resized size, crop corner, target size), the background transparency is composited on,
the flip, and a model id string the caller gives (e.g. the VAE's hash plus its dtype). So a
different model, crop or flip never reuses a latent, and an edited image gets a new one.

Disk entries are ``<folder>/<key>.safetensors`` with one tensor ``latent`` (1, C, h, w) fp32,
written atomically with :func:`pivotal.formats.safetensors_io.atomic_save` and read back through the
validating :func:`~pivotal.formats.safetensors_io.read_header`. An unreadable or mismatching entry is
re-encoded (and rewritten) with a warning in ``warnings``; a failed write only warns, because
the memory cache still works.

Memory entries are fp32 on the ``store`` device, kept for the cache's lifetime: about 64 KB per
SD1 512px latent, 256 KB per SDXL 1024px one (×2 with flips). The trainer keeps them in CPU memory
(``store="cpu"``, as kohya's ``cache_latents`` does): on a GPU, VRAM is what a webui runs short of
(a 1,000-image SDXL set with flips would hold 0.5 GB of it for the whole run), while copying one
step's batch to the GPU (SDXL, batch 4: 1 MB) takes well under a millisecond of a step that takes
hundreds. On a CPU host the store *is* the device: no copy at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from pivotal.data.images import ImageItem, load_pixels
from pivotal.errors import BundleError, DatasetError, ModelLayoutError, SaveError
from pivotal.formats.safetensors_io import atomic_save, load_tensors, read_header

LATENT_FORMAT = "pivotal-latent-1"
LATENT_KEY = "latent"

EncodeFn = Callable[[torch.Tensor], torch.Tensor]


class LatentCache:
    """``encode_batch(items, flips, encode_fn, device)`` -> latents (B, C, h, w) fp32 on ``device``;
    ``get_or_encode(item, flip, encode_fn)`` -> one latent (1, C, h, w) fp32 on ``store``.

    ``model_id`` must change whenever the encoder would give different latents (other VAE,
    other scale factor, other dtype). ``folder``: None for memory only. ``store``: the device the
    memory entries live on. ``hits`` / ``loaded`` / ``encoded`` count where latents came from.
    """

    def __init__(self, model_id: str, folder: str | os.PathLike[str] | None = None,
                 store: str | torch.device = "cpu") -> None:
        if not isinstance(model_id, str) or not model_id:
            raise DatasetError("latent cache: model_id must be a non-empty string identifying the encoder")
        self.model_id = model_id
        self.store = torch.device(store)
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DatasetError(f"latent cache folder {self.folder} cannot be created ({e.strerror or e})") from e
        self.warnings: list[str] = []
        self.hits = self.loaded = self.encoded = 0
        self._memory: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._memory)

    def key(self, item: ImageItem, flip: bool) -> str:
        """The hex SHA-256 naming this (image, crop, flip, model) latent."""
        parts = {
            "format": LATENT_FORMAT, "image_sha256": item.sha256, "resized_hw": list(item.resized_hw),
            "crop_yx": list(item.crop_yx), "target_hw": list(item.target_hw), "background": list(item.background),
            "flip": bool(flip), "model_id": self.model_id,
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()

    def path_of(self, key: str) -> Path | None:
        """The disk file of ``key`` (None for a memory-only cache)."""
        return None if self.folder is None else self.folder / f"{key}.safetensors"

    def get_or_encode(self, item: ImageItem, flip: bool, encode_fn: EncodeFn) -> torch.Tensor:
        """The latent (1, C, h, w), fp32 on ``store``, of ``item`` (mirrored when ``flip``): from
        memory, else disk, else ``encode_fn(pixels (1, 3, H, W) in [-1, 1], on the CPU)`` under
        ``torch.no_grad`` (``encode_fn`` moves the pixels to its device itself). Returns a copy."""
        return self._fetch(item, flip, encode_fn).to(self.store, copy=True)

    def encode_batch(self, items: Sequence[ImageItem], flips: Sequence[bool], encode_fn: EncodeFn,
                     device: str | torch.device | None = None) -> torch.Tensor:
        """Latents (B, C, h, w) fp32 on ``device`` (default: ``store``) of same-bucket ``items``, a
        new tensor (a caller's in-place op never reaches the cache). Cached latents cross from
        ``store`` to ``device`` in one copy; one just encoded on ``device`` is used where it is."""
        sizes = {item.target_hw for item in items}
        if len(sizes) > 1:
            raise DatasetError(f"latent batch mixes images of different buckets {sorted(sizes)}; batch per bucket")
        target = self.store if device is None else torch.device(device)
        parts = [self._fetch(item, flip, encode_fn) for item, flip in zip(items, flips)]
        if all(p.device == parts[0].device for p in parts):
            return torch.cat(parts, dim=0).to(target)  # cat copies: the result never aliases an entry
        return torch.cat([p.to(target) for p in parts], dim=0)  # a batch with first-seen images

    def _fetch(self, item: ImageItem, flip: bool, encode_fn: EncodeFn) -> torch.Tensor:
        """The memory entry (on ``store``: do not modify), or a just-encoded latent on the encoder's
        device after storing a copy."""
        key = self.key(item, flip)
        latent = self._memory.get(key)
        if latent is not None:
            self.hits += 1
            return latent
        latent = self._read_disk(key, item)
        if latent is not None:
            self._memory[key] = latent.to(self.store)
            return self._memory[key]
        fresh = self._encode(item, flip, encode_fn)
        stored = fresh.to(self.store)  # the same tensor when store is the encoder's device
        self._write_disk(key, item, stored)
        self._memory[key] = stored
        return fresh

    def _encode(self, item: ImageItem, flip: bool, encode_fn: EncodeFn) -> torch.Tensor:
        pixels = load_pixels(item, flip).unsqueeze(0)
        with torch.no_grad():
            out = encode_fn(pixels)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 1:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelLayoutError(f"latent encoder returned {shape} for {item.name}; expected (1, C, h, w)")
        latent = out.detach().to(torch.float32).contiguous()
        if not torch.isfinite(latent).all():
            # Caching NaN would poison every later epoch; an fp16 VAE overflow is the usual cause.
            raise DatasetError(f"encoding {item.name} gave non-finite latents (NaN/inf); "
                               "the VAE may need to run in fp32")
        self.encoded += 1
        return latent

    def _read_disk(self, key: str, item: ImageItem) -> torch.Tensor | None:
        path = self.path_of(key)
        if path is None or not path.is_file():
            return None
        try:
            header = read_header(path)
            if header.metadata.get("key") != key or set(header.tensors) != {LATENT_KEY}:
                raise BundleError(path, "not the latent this file name promises")
            latent = load_tensors(header)[LATENT_KEY]
            if latent.dim() != 4 or latent.shape[0] != 1 or latent.dtype != torch.float32 \
                    or not torch.isfinite(latent).all():
                raise BundleError(path, f"latent {tuple(latent.shape)} {latent.dtype} "
                                        "is not a finite fp32 (1, C, h, w)")
        except BundleError as e:
            self.warnings.append(f"latent cache entry for {item.name} is unusable ({e}); re-encoding it")
            return None
        self.loaded += 1
        return latent

    def _write_disk(self, key: str, item: ImageItem, latent: torch.Tensor) -> None:
        path = self.path_of(key)
        if path is None:
            return
        meta = {"format": LATENT_FORMAT, "key": key, "model_id": self.model_id, "image": item.name}
        try:
            atomic_save(path, {LATENT_KEY: latent.cpu()}, meta)
        except SaveError as e:
            self.warnings.append(f"latent cache: {e}; continuing with the memory cache only")
