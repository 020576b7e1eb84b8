"""What the trainer reads each micro-step: latents, captions and SDXL size info.

Wraps the dataset (pre-flight, batch order) and the latent cache. Everything returned for a
micro-step index is a pure function of (settings, index), so a resumed run reads exactly what the
uninterrupted run would have. The validation images (``validation_count`` held back from the
dataset, chosen by seed, or the ``validation_dir`` folder) are found here too, in the pre-flight,
and never reach a training batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pivotal.data.buckets import seeded_rng
from pivotal.data.dataset import Dataset, DatasetItem, DatasetOptions, item_mask, prepare_dataset
from pivotal.data.latent_cache import LatentCache
from pivotal.data.masks import latent_mask
from pivotal.errors import ConfigError, DatasetError
from pivotal.host_api import SizeInfo, TrainingHost
from pivotal.training.config import TrainConfig


class Batches:
    """``get(i)`` → (latents (B, C, h, w) fp32 on the host's device, captions, sizes) of a
    :class:`Dataset`'s batch ``i``, through the latent cache when there is one."""

    dataset: Dataset
    host: TrainingHost
    cache: LatentCache | None
    #: the masked loss's weight outside the mask (used when the dataset's options ask for masks)
    unmasked_weight: float = 0.0

    def __init__(self, dataset: Dataset, host: TrainingHost, cache: LatentCache | None) -> None:
        self.dataset, self.host, self.cache = dataset, host, cache
        self._masks: dict[tuple, torch.Tensor] = {}

    def get(self, index: int) -> tuple[torch.Tensor, list[str], list[SizeInfo]]:
        """Latents (B, C, h, w) fp32 on the host's device: encoded there, or copied there once from
        the latent cache (which keeps its entries in CPU memory, see :mod:`pivotal.data.latent_cache`)."""
        batch = self.dataset.batch_at(index)
        if self.cache is not None:
            latents = self.cache.encode_batch(batch.items, batch.flipped, self.host.encode_images, self.host.device)
        else:
            latents = self.host.encode_images(batch.pixels).float()
        return latents, list(batch.captions), list(batch.sizes)

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
            latents = self.cache.encode_batch(items, flipped, self.host.encode_images, self.host.device)
        else:
            latents = self.host.encode_images(batch.pixels[part]).float()
        return latents, list(batch.captions[part]), list(batch.sizes[part]), count, part

    def loss_weights(self, index: int, latent_hw: tuple[int, int], part: slice = slice(None)
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Micro-step ``index``'s (samples ``part``) loss weights: per sample (B,) float32 on the CPU
        (``loss_scale.txt``), and the masked-loss weight map (B, 1, h, w) on the host's device,
        ``unmasked_weight + (1 - unmasked_weight) * mask`` at latent size (None: no masked loss)."""
        batch = self.dataset.batch_at(index)
        weights = batch.loss_weights[part]
        if not self.dataset.options.masked:
            return weights, None
        maps = []
        for item, flip in zip(batch.items[part], batch.flipped[part]):
            key = (item.name, item.sha256, item.mask, flip, latent_hw)
            m = self._masks.get(key)
            if m is None:
                m = self._masks[key] = latent_mask(item_mask(item, flip).unsqueeze(0), latent_hw)
            maps.append(m)
        mask = torch.cat(maps).to(self.host.device)
        return weights, self.unmasked_weight + (1.0 - self.unmasked_weight) * mask


class BatchSource(Batches):
    """The training images' :class:`Batches`, built from the settings: the pre-flight, the
    validation images held back, and the latent cache (which the class images share)."""

    def __init__(self, config: TrainConfig, host: TrainingHost) -> None:
        self.host = host
        self.config = config
        options = DatasetOptions(
            folder=config.data_dir, resolution=config.resolution, bucket_step=config.bucket_step,
            bucketing=config.bucketing, batch_size=config.batch_size, shuffle_tags=config.shuffle_tags,
            keep_tags=config.keep_tags, caption_dropout=config.caption_dropout, flip=config.flip,
            skip_bad_images=config.skip_bad_images, seed=config.seed, folder_repeats=config.folder_repeats,
            masked=config.masked_loss, mask_dir=config.mask_dir)
        self.unmasked_weight = config.unmasked_weight
        #: {(image, mask, flip, latent size): (1, 1, h, w) latent-size mask}: decoded once per run
        self._masks: dict[tuple, torch.Tensor] = {}
        vectors = {e.name: e.vectors for e in config.embeddings}
        self.dataset, self.report = prepare_dataset(options, vectors, host.tokenizer("clip_l"))
        self.warnings: list[str] = list(getattr(self.report, "warnings", []))
        #: the images whose loss is measured and never trained on (empty: no validation)
        self.validation_items: list[DatasetItem] = []
        if config.validation_count:
            kept, self.validation_items = hold_back(self.dataset.items, config.validation_count, config.seed)
            self.dataset = Dataset(kept, options)
        elif config.validation_dir:
            try:
                val_set, _ = prepare_dataset(
                    DatasetOptions(folder=config.validation_dir, resolution=config.resolution,
                                   bucket_step=config.bucket_step, bucketing=config.bucketing,
                                   skip_bad_images=config.skip_bad_images, seed=config.seed),
                    vectors, host.tokenizer("clip_l"))
            except DatasetError as err:
                raise DatasetError(f"validation_dir: {err}", report=err.report) from err
            self.validation_items = val_set.items
        self.cache: LatentCache | None = None
        if config.latent_cache != "off":
            # The id changes with the VAE, or a disk cache would hand one model's latents to another.
            model_id = host.model_id()
            folder = Path(config.out_dir) / "latent_cache" if config.latent_cache == "disk" else None
            if model_id is None:
                # This host cannot name its VAE: latents are kept for this run, in memory only.
                if folder is not None:
                    self.warnings.append("latent_cache 'disk': this model has no stable id, so its latents "
                                         "are cached in memory for this run only")
                model_id, folder = f"{host.base_model}:this run only", None
            self.cache = LatentCache(model_id, folder, store="cpu")

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """{dataset folder name: {tag: count}} as kohya records it (``ss_tag_frequency``)."""
        return {Path(self.config.data_dir).name: self.dataset.tag_frequency()}


def hold_back(items: list[DatasetItem], count: int, seed: int) -> tuple[list[DatasetItem], list[DatasetItem]]:
    """(training items, held-back items): ``count`` items chosen by ``seed`` alone (the same seed
    holds back the same images), each list in the dataset's order. ConfigError when nothing would
    be left to train on."""
    if count >= len(items):
        raise ConfigError(f"validation_count: {count} would hold back every one of the {len(items)} usable "
                          f"image(s); hold back at most {len(items) - 1}, or use a validation_dir folder")
    chosen = set(seeded_rng("validation", seed).sample(range(len(items)), count))
    return ([it for i, it in enumerate(items) if i not in chosen], [it for i, it in enumerate(items) if i in chosen])
