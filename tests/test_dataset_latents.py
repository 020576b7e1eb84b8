"""The latent cache (memory and disk) and the synthetic demo dataset."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pivotal.data.dataset import DatasetOptions, prepare_dataset
from pivotal.data.latent_cache import LatentCache
from pivotal.demo.data import make_demo_dataset
from pivotal.errors import DatasetError, ModelLayoutError
from pivotal.formats.safetensors_io import stray_temp_files


class CountingEncoder:
    """A stand-in VAE: (1, 3, H, W) -> (1, 4, H/8, W/8), counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


@pytest.fixture()
def dataset(tmp_path: Path):
    make_demo_dataset(tmp_path / "data", ["mychar"], count=3, size=64)
    ds, _ = prepare_dataset(DatasetOptions(folder=tmp_path / "data", resolution=64, bucket_step=16), {"mychar": 1})
    return ds


def test_memory_cache_encodes_once(dataset) -> None:
    cache, enc = LatentCache("vae-a"), CountingEncoder()
    item = dataset.items[0]
    first = cache.get_or_encode(item, False, enc)
    assert first.shape == (1, 4, 8, 8) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.equal(cache.get_or_encode(item, False, enc), first)
    cache.get_or_encode(item, False, enc).mul_(0)  # a caller's in-place op ...
    assert torch.equal(cache.get_or_encode(item, False, enc), first)  # ... leaves the cache intact
    assert enc.calls == 1 and cache.hits == 3
    flipped = cache.get_or_encode(item, True, enc)
    assert enc.calls == 2 and torch.allclose(flipped, torch.flip(first, dims=[3]), atol=1e-6)


def test_batches_come_on_the_asked_device_and_never_alias_the_cache(dataset) -> None:
    """The trainer's path (``encode_batch`` to the host's device): entries stay on ``store``; what
    is handed out is a new tensor, whether just encoded or from memory, so in-place ops are safe."""
    cache, enc = LatentCache("vae-a", store="cpu"), CountingEncoder()
    square = dataset.items[0]
    encoded = cache.encode_batch([square], [False], enc, device="cpu")  # encoded now
    remembered = cache.encode_batch([square], [False], enc, device=torch.device("cpu"))  # from memory
    assert torch.equal(encoded, remembered) and enc.calls == 1 and cache.hits == 1
    expected = encoded.clone()
    encoded.mul_(0)
    remembered.mul_(0)
    assert torch.equal(cache.encode_batch([square], [False], enc), expected)
    mixed = cache.encode_batch([square, square], [False, True], enc, device="cpu")  # one known, one new
    assert mixed.shape == (2, 4, 8, 8) and torch.equal(mixed[:1], expected) and enc.calls == 2
    assert all(t.device == cache.store for t in cache._memory.values()) and len(cache) == 2


def test_key_depends_on_model_crop_flip_and_content(dataset) -> None:
    item = dataset.items[0]
    a, b = LatentCache("vae-a"), LatentCache("vae-b")
    assert a.key(item, False) == LatentCache("vae-a").key(item, False)
    assert a.key(item, False) != b.key(item, False)
    assert a.key(item, False) != a.key(item, True)
    assert a.key(item, False) != a.key(dataclasses.replace(item, crop_yx=(1, 0)), False)
    assert a.key(item, False) != a.key(dataclasses.replace(item, sha256="0" * 64), False)
    assert a.key(item, False) == a.key(dataclasses.replace(item, path=Path("/elsewhere.png")), False)


def test_disk_cache_survives_a_new_process(dataset, tmp_path: Path) -> None:
    folder = tmp_path / "latents"
    enc = CountingEncoder()
    flips = [False, True, False]
    cache = LatentCache("vae-a", folder)
    first = [cache.get_or_encode(item, flip, enc) for item, flip in zip(dataset.items, flips)]
    assert [t.shape[2:] for t in first] == [(8, 8), (6, 10), (10, 6)] and enc.calls == 3
    assert len(list(folder.glob("*.safetensors"))) == 3 and not stray_temp_files(folder)
    again = LatentCache("vae-a", folder)
    for item, flip, latent in zip(dataset.items, flips, first):
        assert torch.equal(again.get_or_encode(item, flip, enc), latent)
    assert enc.calls == 3 and again.loaded == 3
    with pytest.raises(DatasetError, match="different buckets"):
        again.encode_batch(dataset.items, flips, enc)
    square = dataset.items[0]
    assert again.encode_batch([square, square], [False, True], enc).shape == (2, 4, 8, 8)
    assert enc.calls == 4  # only (square, flipped) was new
    other_model = LatentCache("vae-b", folder)
    other_model.get_or_encode(square, False, enc)
    assert enc.calls == 5 and other_model.loaded == 0


def test_corrupt_disk_entry_is_re_encoded_with_a_warning(dataset, tmp_path: Path) -> None:
    folder, enc = tmp_path / "latents", CountingEncoder()
    cache = LatentCache("vae-a", folder)
    good = cache.get_or_encode(dataset.items[0], False, enc)
    path = cache.path_of(cache.key(dataset.items[0], False))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    fresh = LatentCache("vae-a", folder)
    assert torch.equal(fresh.get_or_encode(dataset.items[0], False, enc), good)
    assert enc.calls == 2 and len(fresh.warnings) == 1
    assert fresh.warnings[0].startswith(f"latent cache entry for {dataset.items[0].name} is unusable (")
    assert fresh.warnings[0].endswith("re-encoding it")
    assert LatentCache("vae-a", folder).get_or_encode(dataset.items[0], False, enc) is not None and enc.calls == 2


def test_bad_encoder_output_is_refused(dataset) -> None:
    with pytest.raises(ModelLayoutError, match=r"latent encoder returned \(4, 8, 8\)"):
        LatentCache("m").get_or_encode(dataset.items[0], False, lambda x: torch.zeros(4, 8, 8))
    with pytest.raises(DatasetError, match="non-finite latents"):
        LatentCache("m").get_or_encode(dataset.items[0], False, lambda x: torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(DatasetError, match="model_id"):
        LatentCache("")


# ------------------------------------------------------------------ demo data


def test_demo_dataset_is_deterministic_and_usable(tmp_path: Path) -> None:
    paths = make_demo_dataset(tmp_path / "a", ["mychar"], count=8, size=64, seed=3)
    again = make_demo_dataset(tmp_path / "b", ["mychar"], count=8, size=64, seed=3)
    assert [p.name for p in paths] == [f"demo_{i:03d}.png" for i in range(8)]
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert [p.with_suffix(".txt").read_text(encoding="utf-8") for p in paths] == \
           [p.with_suffix(".txt").read_text(encoding="utf-8") for p in again]
    other = make_demo_dataset(tmp_path / "c", ["mychar"], count=8, size=64, seed=4)
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in other]
    caption = paths[0].with_suffix(".txt").read_text(encoding="utf-8")
    assert caption.startswith("[mychar] a") and " background, " in caption and caption.endswith("\n")
    dataset, report = prepare_dataset(DatasetOptions(folder=tmp_path / "a", resolution=64, bucket_step=16),
                                      {"mychar": 2})
    assert len(dataset) == 8 and report.ok and len(report.buckets) == 3 and not report.missing_captions
    assert all(item.caption.startswith("mychar a") for item in dataset.items)


def test_demo_dataset_at_a_larger_resolution_needs_upscale_small(tmp_path: Path) -> None:
    make_demo_dataset(tmp_path, ["hero", "style"], count=2, size=32)
    assert (tmp_path / "demo_000.txt").read_text(encoding="utf-8").startswith("[hero] [style] ")
    with pytest.raises(DatasetError, match="set upscale_small=True"):
        prepare_dataset(DatasetOptions(folder=tmp_path, resolution=64, bucket_step=16), {"hero": 1, "style": 1})
    dataset, _ = prepare_dataset(DatasetOptions(folder=tmp_path, resolution=64, bucket_step=16, upscale_small=True),
                                 {"hero": 1, "style": 1})
    assert len(dataset) == 2
