"""The dataset's loss masks (mask folder / alpha, crop and flip, pre-flight lists), kohya's N_name
repeats and EveryDream2's loss_scale.txt."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pivotal.data.dataset import Dataset, DatasetOptions, item_mask, prepare_dataset, run_preflight
from pivotal.data.images import load_pixels
from pivotal.data.masks import latent_mask
from pivotal.errors import DatasetError

NAMES = {"mychar": 2}


def halves(path: Path, size: tuple[int, int], left: int, right: int, mode: str = "L") -> Path:
    """An image whose left half has grey level ``left`` and right half ``right``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.full((h, w), right, np.uint8)
    arr[:, : w // 2] = left
    img = Image.fromarray(arr, "L")
    (img.convert("RGB") if mode == "RGB" else img).save(path)
    return path


def rgba(path: Path, size: tuple[int, int], alpha_left: int) -> Path:
    """A red picture whose left half has alpha ``alpha_left`` and right half alpha 0."""
    w, h = size
    arr = np.zeros((h, w, 4), np.uint8)
    arr[..., 0] = 200
    arr[:, : w // 2, 3] = alpha_left
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGBA").save(path)
    return path


def opts(folder: Path, **kw: object) -> DatasetOptions:
    return DatasetOptions(folder=folder, **{"resolution": 64, "bucket_step": 16, **kw})  # type: ignore[arg-type]


# -- masks ------------------------------------------------------------------------------------
def test_preflight_lists_masks_found_missing_and_of_another_size(tmp_path: Path) -> None:
    data, masks = tmp_path / "data", tmp_path / "masks"
    for name in ("a", "b", "c"):
        halves(data / f"{name}.png", (64, 64), 255, 0, "RGB")
    halves(masks / "a.png", (64, 64), 255, 0)
    halves(masks / "c.jpg", (32, 64), 255, 0)   # another size
    items, report = run_preflight(opts(data, masked=True, mask_dir=masks), NAMES)
    assert report.mask_source == str(masks) and report.masks_found == 1
    assert report.masks_missing == ["b.png"]
    assert len(report.masks_mismatched) == 1 and "c.jpg: 32x64, its image c.png is 64x64" in report.masks_mismatched[0]
    assert any("not the size of their image" in e for e in report.errors)
    text = report.format()
    assert "masks (" in text and "1 found, 1 missing, 1 of another size" in text and "missing: b.png" in text
    assert report.to_dict()["masks_missing"] == ["b.png"]
    # without the bad one the run may start; the image without a mask trains on the whole picture
    (masks / "c.jpg").unlink()
    dataset, report = prepare_dataset(opts(data, masked=True, mask_dir=masks), NAMES)
    assert [i.mask is not None for i in dataset.items] == [True, False, False]
    assert any("have no mask" in w for w in report.warnings)
    assert torch.equal(item_mask(dataset.items[1], False), torch.ones(1, 64, 64))


def test_masked_loss_with_no_mask_at_all_is_refused(tmp_path: Path) -> None:
    halves(tmp_path / "a.png", (64, 64), 255, 0, "RGB")   # no alpha channel
    with pytest.raises(DatasetError, match="masked_loss: no mask found .*no image has an alpha channel"):
        prepare_dataset(opts(tmp_path, masked=True), NAMES)
    with pytest.raises(DatasetError, match="mask_dir .* is not a folder"):
        prepare_dataset(opts(tmp_path, masked=True, mask_dir=tmp_path / "nope"), NAMES)


def test_alpha_channel_is_the_mask_with_soft_weights(tmp_path: Path) -> None:
    rgba(tmp_path / "a.png", (64, 64), alpha_left=128)
    dataset, report = prepare_dataset(opts(tmp_path, masked=True), NAMES)
    assert report.mask_source == "alpha" and report.masks_found == 1
    m = item_mask(dataset.items[0], False)
    assert m.shape == (1, 64, 64)
    assert torch.allclose(m[:, :, :32], torch.full((1, 64, 32), 128 / 255)) and float(m[:, :, 32:].max()) == 0.0


def test_mask_follows_its_image_through_resize_crop_and_flip(tmp_path: Path) -> None:
    """A 96x64 picture in a 64x64 square (no buckets: resized and centre-cropped) and mirrored:
    the mask, drawn like the picture, lands where the picture's pixels do."""
    data, masks = tmp_path / "data", tmp_path / "masks"
    w, h = 96, 64
    arr = np.zeros((h, w), np.uint8)
    arr[:, 20:44] = 255      # a bar off-centre, so a flip or a wrong crop moves it
    Image.fromarray(arr, "L").convert("RGB").save(_mk(data) / "a.png")
    Image.fromarray(arr, "L").save(_mk(masks) / "a.png")
    dataset, _ = prepare_dataset(opts(data, masked=True, mask_dir=masks, bucketing=False), NAMES)
    item = dataset.items[0]
    assert item.crop_yx != (0, 0)
    for flip in (False, True):
        picture = (load_pixels(item, flip).mean(0, keepdim=True) + 1) / 2   # (1, 64, 64) in [0, 1]
        mask = item_mask(item, flip)
        assert mask.shape == picture.shape
        assert float((mask - picture).abs().mean()) < 0.02, flip   # LANCZOS vs area: edges differ slightly
        assert float((mask - item_mask(item, not flip)).abs().mean()) > 0.2   # the flip moved it
    # at latent size (area average, 8x8 pixels per latent pixel) the bar keeps its share
    small = latent_mask(item_mask(item, False).unsqueeze(0), (8, 8))
    assert small.shape == (1, 1, 8, 8)
    assert abs(float(small.mean()) - float(item_mask(item, False).mean())) < 1e-5


def _mk(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# -- repeats and loss scales --------------------------------------------------------------------
def test_n_name_folder_repeats_its_images_each_epoch(tmp_path: Path) -> None:
    halves(tmp_path / "3_mychar" / "a.png", (64, 64), 255, 0, "RGB")
    halves(tmp_path / "other" / "b.png", (64, 64), 0, 255, "RGB")
    dataset, report = prepare_dataset(opts(tmp_path, folder_repeats=True), NAMES)
    assert [(i.name, i.repeats) for i in dataset.items] == [("3_mychar/a.png", 3), ("other/b.png", 1)]
    assert dataset.batches_per_epoch == 4
    seen = Counter(dataset.items[dataset.batch_at(s).indices[0]].name for s in range(8))  # two epochs
    assert seen == {"3_mychar/a.png": 6, "other/b.png": 2}
    assert report.repeats == {"3_mychar": 3} and "repeats (N_name folders): 3_mychar: x3" in report.format()
    # off: the prefix means nothing (the order is the one without repeats)
    plain, report = prepare_dataset(opts(tmp_path, folder_repeats=False), NAMES)
    assert plain.batches_per_epoch == 2 and not report.repeats
    assert [b for s in range(2) for b in plain.batch_at(s).indices] == \
        [b for s in range(2) for b in Dataset(plain.items, opts(tmp_path)).batch_at(s).indices]


def test_loss_scale_txt_weights_its_folder_only(tmp_path: Path) -> None:
    halves(tmp_path / "weak" / "a.png", (64, 64), 255, 0, "RGB")
    halves(tmp_path / "weak" / "deeper" / "c.png", (64, 64), 255, 0, "RGB")
    halves(tmp_path / "b.png", (64, 64), 0, 255, "RGB")
    (tmp_path / "weak" / "loss_scale.txt").write_text("0.5\n", encoding="utf-8")
    dataset, report = prepare_dataset(opts(tmp_path, folder_repeats=True), NAMES)
    assert {i.name: i.loss_weight for i in dataset.items} == {"b.png": 1.0, "weak/a.png": 0.5, "weak/deeper/c.png": 1.0}
    assert report.loss_scales == {"weak/loss_scale.txt": 0.5} and "weak/loss_scale.txt: 0.5" in report.format()
    assert ".txt" not in report.ignored_files   # the file was used, not ignored
    batch = dataset.batch_at(0)
    assert batch.loss_weights.tolist() == [i.loss_weight for i in batch.items]


@pytest.mark.parametrize("text, message", [("0", "must be a finite number > 0"), ("abc", "is not a number"),
                                           ("-1", "must be a finite number > 0")])
def test_a_bad_loss_scale_refuses_the_run_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    halves(tmp_path / "x" / "a.png", (64, 64), 255, 0, "RGB")
    (tmp_path / "x" / "loss_scale.txt").write_text(text, encoding="utf-8")
    with pytest.raises(DatasetError, match=f"x/loss_scale.txt: .*{message}"):
        prepare_dataset(opts(tmp_path, folder_repeats=True), NAMES)


def test_zero_repeats_folder_is_refused(tmp_path: Path) -> None:
    halves(tmp_path / "0_mychar" / "a.png", (64, 64), 255, 0, "RGB")
    with pytest.raises(DatasetError, match="folder 0_mychar: 0 repeats"):
        prepare_dataset(opts(tmp_path, folder_repeats=True), NAMES)
