"""Aspect-ratio buckets, the resize/crop plan and the deterministic batch order."""

from __future__ import annotations

import math

import pytest

from pivotal.data.buckets import (
    BucketBatches,
    closest_bucket,
    default_side_limits,
    make_buckets,
    plan_crop,
    seeded_rng,
    upscale_factor,
)
from pivotal.errors import DatasetError


@pytest.mark.parametrize("resolution,step", [(512, 64), (1024, 64), (64, 16), (768, 32)])
def test_bucket_rules(resolution: int, step: int) -> None:
    buckets = make_buckets(resolution, step)
    lo, hi = default_side_limits(resolution, step)
    assert (resolution, resolution) in buckets
    for w, h in buckets:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution * resolution
        assert lo <= w <= hi and lo <= h <= hi
        assert max(w / h, h / w) <= 4
        assert (h, w) in buckets  # symmetric
        # maximal in height or in width: one more step would break the area or side limit
        taller = w * (h + step) > resolution * resolution or h + step > hi
        wider = (w + step) * h > resolution * resolution or w + step > hi
        assert taller or wider
    assert len(set(buckets)) == len(buckets)


def test_sd1_buckets_are_the_familiar_ones() -> None:
    buckets = make_buckets(512, 64)
    assert default_side_limits(512, 64) == (256, 1024)
    for expected in [(512, 512), (576, 448), (640, 384), (768, 320), (1024, 256), (448, 576)]:
        assert expected in buckets
    assert (320, 256) not in buckets  # small, non-maximal buckets would steal 5:4 photos


def test_side_limits_can_be_narrowed() -> None:
    assert make_buckets(512, 64, min_side=448, max_side=576) == [(448, 576), (512, 512), (576, 448)]
    with pytest.raises(DatasetError, match="no bucket fits"):
        make_buckets(512, 64, min_side=640, max_side=1024)


@pytest.mark.parametrize("size,expected", [
    ((1000, 1000), (512, 512)), ((1200, 900), (576, 448)), ((900, 1200), (448, 576)),
    ((1920, 1080), (640, 384)), ((3000, 600), (1024, 256)), ((64, 64), (512, 512)),
])
def test_closest_aspect_bucket(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert closest_bucket(size, make_buckets(512, 64)) == expected


def test_closest_bucket_never_divides_by_zero() -> None:
    assert closest_bucket((1, 1), [(64, 64)]) == (64, 64)
    with pytest.raises(DatasetError, match="has no pixels"):
        closest_bucket((0, 5), [(64, 64)])


@pytest.mark.parametrize("original,target", [((900, 1200), (448, 576)), ((1080, 1920), (384, 640)),
                                             ((64, 64), (64, 64)), ((333, 777), (256, 640)), ((1, 1), (64, 64))])
def test_crop_plan_covers_the_target_and_is_centred(original: tuple[int, int], target: tuple[int, int]) -> None:
    (rh, rw), (y, x) = plan_crop(original, target)
    th, tw = target
    assert rh >= th and rw >= tw
    assert y + th <= rh and x + tw <= rw
    assert abs((rh - th) - 2 * y) <= 1 and abs((rw - tw) - 2 * x) <= 1
    assert abs(rw / rh - original[1] / original[0]) < 0.02 or rh == th or rw == tw
    assert min(abs(rh - th), abs(rw - tw)) == 0  # one side fits exactly


def test_upscale_factor() -> None:
    assert upscale_factor((1, 1), (64, 64)) == 64
    assert upscale_factor((128, 256), (64, 64)) == 0.5
    assert math.isclose(upscale_factor((40, 40), (64, 64)), 1.6)


def test_seeded_rng_is_stable() -> None:
    assert seeded_rng("x", 1, 2).random() == seeded_rng("x", 1, 2).random()
    assert seeded_rng("x", 1, 2).random() != seeded_rng("x", 1, 3).random()


# ------------------------------------------------------------------ batch order


def _buckets() -> list[tuple[int, int]]:
    return [(64, 64)] * 7 + [(48, 80)] * 4 + [(80, 48)] * 1


def test_each_epoch_sees_every_item_once_in_same_bucket_batches() -> None:
    items = _buckets()
    order = BucketBatches(items, batch_size=3, seed=0)
    assert len(order) == 3 + 2 + 1  # 7 -> 3+3+1, 4 -> 3+1, 1 -> 1: remainders kept
    for epoch in range(3):
        batches = [order.batch_at(epoch * len(order) + k) for k in range(len(order))]
        assert sorted(i for b in batches for i in b) == list(range(len(items)))
        assert all(len({items[i] for i in b}) == 1 for b in batches)
        assert sorted(len(b) for b in batches) == [1, 1, 1, 3, 3, 3]


def test_batch_at_is_a_pure_function_of_seed_and_step() -> None:
    a = BucketBatches(_buckets(), 2, seed=9)
    forward = [a.batch_at(s) for s in range(40)]
    b = BucketBatches(_buckets(), 2, seed=9)
    backward = [b.batch_at(s) for s in reversed(range(40))][::-1]
    assert forward == backward
    other = BucketBatches(_buckets(), 2, seed=10)
    assert forward != [other.batch_at(s) for s in range(40)]
    assert a.epoch_batches(0) != a.epoch_batches(1)  # reshuffled per epoch


def test_insertion_order_of_buckets_does_not_matter() -> None:
    items = _buckets()
    reordered = BucketBatches(list(items), 2, seed=1)
    assert reordered.epoch_batches(0) == BucketBatches(items, 2, seed=1).epoch_batches(0)


def test_batch_errors() -> None:
    with pytest.raises(DatasetError, match="batch_size 0 must be >= 1"):
        BucketBatches([(1, 1)], 0, 0)
    with pytest.raises(DatasetError, match="no images"):
        BucketBatches([], 1, 0)
    with pytest.raises(DatasetError, match="step -1"):
        BucketBatches([(1, 1)], 1, 0).batch_at(-1)
