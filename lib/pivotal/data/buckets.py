"""Aspect-ratio buckets, the resize/crop plan per image, and the deterministic batch order.

Conventions: a *bucket* is ``(w, h)`` (how bucket lists are usually written); everything that
describes one image (``original_hw``, ``target_hw``, ``resized_hw``) is ``(h, w)`` and crops
are ``(y, x)``, matching tensors (3, H, W) and SDXL's size conditioning.

Bucket set: for every width ``w`` (a multiple of ``step`` between ``min_side`` and
``max_side``) the tallest ``h`` with ``w * h <= resolution**2``, plus the transposes, keeping
those with aspect ratio <= ``max_aspect``. Only these maximal buckets are kept: with *every*
bucket under the area limit, "closest aspect ratio" would often pick a small bucket whose ratio
happens to be exact (e.g. 320x256 for a 5:4 photo at 512) and throw most pixels away.

Randomness comes from :func:`seeded_rng`, a local ``random.Random`` seeded from a string of its
parts, so results depend only on the arguments (never on global state, process or platform):
a run resumed at step N sees exactly the batches, captions and flips it would have seen.
"""

from __future__ import annotations

import math
import random
from typing import Hashable, Sequence

from pivotal.errors import DatasetError


def seeded_rng(*parts: object) -> random.Random:
    """A ``random.Random`` that depends only on ``parts`` (e.g. ``("flip", seed, step, index)``).

    A ``str`` seed is hashed with SHA-512 by ``random.seed``, so it is stable across processes
    (unlike ``hash()``), platforms and Python versions.
    """
    return random.Random("pivotal:" + ":".join(str(p) for p in parts))


def default_side_limits(resolution: int, step: int) -> tuple[int, int]:
    """``(min_side, max_side)``: half the resolution rounded to ``step`` (at least ``step``), and
    twice the resolution."""
    return max(step, int(round(resolution / 2 / step)) * step), resolution * 2


def make_buckets(
    resolution: int,
    step: int,
    min_side: int | None = None,
    max_side: int | None = None,
    max_aspect: float = 4.0,
) -> list[tuple[int, int]]:
    """The bucket list ``[(w, h), ...]`` sorted by aspect ratio w/h (see the module docstring).

    Every side is a multiple of ``step`` in ``[min_side, max_side]``; ``w * h <= resolution**2``;
    ``max(w/h, h/w) <= max_aspect``. Always contains ``(resolution, resolution)`` when
    ``resolution`` is a multiple of ``step``.
    """
    if step < 1 or resolution < step:
        raise DatasetError(f"bucket step {step} and resolution {resolution}: need 1 <= step <= resolution")
    lo_default, hi_default = default_side_limits(resolution, step)
    lo = lo_default if min_side is None else min_side
    hi = hi_default if max_side is None else max_side
    area = resolution * resolution
    found: set[tuple[int, int]] = set()
    for w in range(_round_up(lo, step), hi + 1, step):
        h = min(hi, area // w // step * step)
        if h < lo or h < step:
            continue
        if max(w / h, h / w) <= max_aspect:
            found.add((w, h))
            found.add((h, w))
    buckets = sorted(((w, h) for w, h in found if lo <= w <= hi and lo <= h <= hi), key=lambda b: (b[0] / b[1], b))
    if not buckets:
        raise DatasetError(
            f"no bucket fits resolution {resolution}, step {step}, sides {lo}..{hi}, aspect <= {max_aspect}; "
            "widen min_side/max_side"
        )
    return buckets


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def closest_bucket(size_wh: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket ``(w, h)`` whose aspect ratio is closest to the image's ``(w, h)``.

    Distance is measured in log space, so 2:1 and 1:2 are equally far from 1:1; ties go to the
    larger bucket. Sizes must be >= 1 (the caller rejects empty images first).
    """
    w, h = size_wh
    if w < 1 or h < 1:
        raise DatasetError(f"image size {w}x{h} has no pixels")
    target = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def upscale_factor(original_hw: tuple[int, int], target_hw: tuple[int, int]) -> float:
    """How much an image must be scaled so that it covers the target: > 1 means upscaling."""
    (oh, ow), (th, tw) = original_hw, target_hw
    return max(th / oh, tw / ow)


def plan_crop(original_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(resized_hw, crop_yx)``: resize the image to ``resized_hw`` (aspect kept, covering the
    target), then take the centred ``target_hw`` window whose top-left corner is ``crop_yx``."""
    (oh, ow), (th, tw) = original_hw, target_hw
    scale = upscale_factor(original_hw, target_hw)
    # max(): rounding may land one pixel short of the target on the covering side.
    rh, rw = max(th, int(round(oh * scale))), max(tw, int(round(ow * scale)))
    return (rh, rw), ((rh - th) // 2, (rw - tw) // 2)


class BucketBatches:
    """Deterministic batch order over items grouped by bucket.

    ``bucket_of_item[i]`` is the bucket (any hashable, e.g. ``(h, w)``) of item ``i``. Each epoch
    every bucket's items are shuffled with ``seeded_rng("bucket", seed, epoch, bucket)`` and cut
    into batches of ``batch_size``; the last batch of a bucket keeps the remainder (a smaller
    batch rather than dropped images or a batch mixing sizes). The batches of all buckets are then
    shuffled with ``seeded_rng("epoch", seed, epoch)``. Every image is seen once per epoch.

    ``repeats[i]`` (default 1 each) puts item ``i`` that many times into every epoch (kohya's
    ``N_name`` folders); with all ones the order is exactly the one without repeats.

    ``batch_at(step)`` (item indices) is a pure function of ``(seed, step)``, so training can
    resume at any step.
    """

    def __init__(self, bucket_of_item: Sequence[Hashable], batch_size: int, seed: int,
                 repeats: Sequence[int] | None = None) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch_size {batch_size} must be >= 1")
        if len(bucket_of_item) == 0:
            raise DatasetError("no images to make batches from")
        if repeats is not None and (len(repeats) != len(bucket_of_item) or min(repeats) < 1):
            raise DatasetError(f"repeats: need one count >= 1 per item ({len(bucket_of_item)} items)")
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(bucket_of_item):
            groups.setdefault(bucket, []).extend([index] * (1 if repeats is None else repeats[index]))
        # Sorted by repr: a fixed order whatever the insertion order or hash seed.
        self._groups = [(key, groups[key]) for key in sorted(groups, key=repr)]
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = sum(-(-len(members) // batch_size) for _, members in self._groups)
        self._cached: tuple[int, list[list[int]]] | None = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.batches_per_epoch

    def epoch_of(self, step: int) -> int:
        """The epoch (0-based) that ``step`` (0-based) falls in."""
        return step // self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, in training order (lists of item indices)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        batches: list[list[int]] = []
        for key, members in self._groups:
            order = list(members)
            seeded_rng("bucket", self.seed, epoch, repr(key)).shuffle(order)
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        seeded_rng("epoch", self.seed, epoch).shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    def batch_at(self, step: int) -> list[int]:
        """Item indices of the batch trained at ``step`` (0-based, any step of any epoch)."""
        if step < 0:
            raise DatasetError(f"step {step} must be >= 0")
        return list(self.epoch_batches(self.epoch_of(step))[step % self.batches_per_epoch])
