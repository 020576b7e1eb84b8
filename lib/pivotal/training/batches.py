"""What the trainer reads each micro-step: latents, captions and SDXL size info.

Wraps the dataset (pre-flight, batch order) and the latent cache. Everything returned for a
micro-step index is a pure function of (settings, index), so a resumed run reads exactly what the
uninterrupted run would have.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pivotal.data.dataset import DatasetOptions, prepare_dataset
from pivotal.data.latent_cache import LatentCache
from pivotal.host_api import SizeInfo, TrainingHost
from pivotal.training.config import TrainConfig


class BatchSource:
    """``get(i)`` → (latents (B, C, h, w) fp32 on the host's device, captions, sizes)."""

    def __init__(self, config: TrainConfig, host: TrainingHost) -> None:
        self.host = host
        self.config = config
        options = DatasetOptions(
            folder=config.data_dir, resolution=config.resolution, bucket_step=config.bucket_step,
            bucketing=config.bucketing, batch_size=config.batch_size, shuffle_tags=config.shuffle_tags,
            keep_tags=config.keep_tags, caption_dropout=config.caption_dropout, flip=config.flip,
            skip_bad_images=config.skip_bad_images, seed=config.seed)
        vectors = {e.name: e.vectors for e in config.embeddings}
        self.dataset, self.report = prepare_dataset(options, vectors, host.tokenizer("clip_l"))
        self.warnings: list[str] = list(getattr(self.report, "warnings", []))
        self.cache: LatentCache | None = None
        if config.latent_cache != "off":
            # The id must change with the VAE, or a disk cache would hand one model's latents to another.
            model_id = f"{host.base_model}:{getattr(host, 'model_id', getattr(host, 'label', 'unknown'))}"
            folder = Path(config.out_dir) / "latent_cache" if config.latent_cache == "disk" else None
            self.cache = LatentCache(model_id, folder)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.host.encode_images(pixels.to(self.host.device)).float().cpu()

    def get(self, index: int) -> tuple[torch.Tensor, list[str], list[SizeInfo]]:
        batch = self.dataset.batch_at(index)
        if self.cache is not None:
            latents = self.cache.encode_batch(batch.items, batch.flipped, self._encode)
        else:
            latents = self._encode(batch.pixels)
        return latents.to(self.host.device), list(batch.captions), list(batch.sizes)

    def get_shard(self, index: int, shard: Callable[[int], slice]
                  ) -> tuple[torch.Tensor, list[str], list[SizeInfo], int, slice]:
        """This process's part of micro-step ``index``'s batch: ``(latents, captions, sizes, global
        count, part)`` where ``part = shard(global count)`` and only those samples are encoded
        (latents (n, C, h, w), or (0,) when the part is empty)."""
        batch = self.dataset.batch_at(index)
        count = len(batch.items)
        part = shard(count)
        items, flipped = batch.items[part], batch.flipped[part]
        if not items:
            return torch.zeros(0), [], [], count, part
        if self.cache is not None:
            latents = self.cache.encode_batch(items, flipped, self._encode)
        else:
            latents = self._encode(batch.pixels[part])
        return latents.to(self.host.device), list(batch.captions[part]), list(batch.sizes[part]), count, part

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{dataset folder name: {tag: count}} as kohya records it (``ss_tag_frequency``)."""
        return {Path(self.config.data_dir).name: self.dataset.tag_frequency()}
