"""Folder scan, pre-flight refusals and warnings, the report, options and the Dataset's batches."""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from pivotal.data.dataset import Dataset, DatasetOptions, prepare_dataset, run_preflight
from pivotal.data.images import IMAGE_EXTENSIONS, load_pixels
from pivotal.errors import DatasetError
from tiny_text import bpe_path, clip_tokenizer

needs_bpe = pytest.mark.skipif(bpe_path() is None, reason="open_clip_torch (its BPE file) is not installed")
ACCEPTED = ".png .jpg .jpeg .webp .bmp .gif .tif .tiff"
NAMES = {"mychar": 2}


def png(path: Path, size: tuple[int, int] = (64, 64), colour: tuple[int, int, int] = (200, 30, 30),
        **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "PNG", **kw)
    return path


def opts(folder: Path, **kw: object) -> DatasetOptions:
    settings: dict = {"resolution": 64, "bucket_step": 16, **kw}
    return DatasetOptions(folder=folder, **settings)


def jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, "JPEG")
    return buf.getvalue()


# ------------------------------------------------------------------ folder problems


def test_accepted_extensions() -> None:
    assert " ".join(IMAGE_EXTENSIONS) == ACCEPTED


def test_missing_folder(tmp_path: Path) -> None:
    folder = tmp_path / "nope"
    with pytest.raises(DatasetError, match=re.escape(f"dataset folder {folder} does not exist; "
                                                     f"give a folder of images ({ACCEPTED})")):
        prepare_dataset(opts(folder), NAMES)


def test_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(f"dataset folder {png(tmp_path / 'a.png')} is not a folder")):
        prepare_dataset(opts(tmp_path / "a.png"), NAMES)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(f"dataset folder {tmp_path} is empty; add images ({ACCEPTED})")):
        prepare_dataset(opts(tmp_path), NAMES)


def test_folder_without_images_lists_what_it_found(tmp_path: Path) -> None:
    for name in ("a.txt", "b.json", "c.fits", "Thumbs.db", ".DS_Store", "README"):
        (tmp_path / name).write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match=re.escape(
            f"dataset folder {tmp_path} has no supported images (accepted: {ACCEPTED}); "
            "found: (no extension) x1, .db x1, .fits x1, .json x1, .txt x1")):
        prepare_dataset(opts(tmp_path), NAMES)


def test_scan_is_recursive_ignores_non_images_and_hidden(tmp_path: Path) -> None:
    png(tmp_path / "top.png")
    png(tmp_path / "10_mychar" / "nested.png", colour=(1, 2, 3))
    (tmp_path / "10_mychar" / "nested.txt").write_text("mychar in a hat", encoding="utf-8")
    png(tmp_path / ".hidden.png", colour=(4, 5, 6))
    png(tmp_path / ".cache" / "inside_hidden.png", colour=(7, 8, 9))
    for name in ("notes.txt", "meta.json", "scan.fits", "Thumbs.db", ".DS_Store", "x.caption"):
        (tmp_path / name).write_bytes(b"\xff\x00 never opened")
    items, report = run_preflight(opts(tmp_path), NAMES)
    assert [i.name for i in items] == ["10_mychar/nested.png", "top.png"]
    assert report.images_found == 2 and report.images_usable == 2
    assert report.ignored_files == {".caption": 1, ".db": 1, ".fits": 1, ".json": 1, ".txt": 1}
    assert report.hidden_files == 3 and report.caption_files == 1
    assert not report.skipped and report.ok


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks")
def test_symlinks_outside_the_folder_are_not_followed(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    png(data / "a.png")
    png(outside / "secret.png", colour=(0, 0, 0))
    try:
        os.symlink(outside / "secret.png", data / "link.png")
        os.symlink(outside, data / "linkdir", target_is_directory=True)
        os.symlink(data / "a.png", data / "inner.png")
    except OSError:
        pytest.skip("symlinks cannot be created here")
    items, report = run_preflight(opts(data), NAMES)
    assert [i.name for i in items] == ["a.png", "inner.png"]
    assert report.skipped_links == ["link.png (points outside the folder)", "linkdir (points outside the folder)"]
    assert report.duplicates == [("a.png", "inner.png")]


# ------------------------------------------------------------------ bad images


def _bad_folder(tmp_path: Path) -> Path:
    png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("mychar", encoding="utf-8")
    (tmp_path / "cut.jpg").write_bytes(jpeg_bytes()[:-300])
    (tmp_path / "zero.png").write_bytes(b"")
    return tmp_path


def test_bad_images_refuse_the_run_listing_each(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        prepare_dataset(opts(_bad_folder(tmp_path)), NAMES)
    message = str(info.value)
    assert "2 image(s) cannot be used:" in message
    assert "  cut.jpg: cannot decode: image file is truncated" in message
    assert "  zero.png: the file is empty (0 bytes)" in message
    assert "set skip_bad_images=True to train without them" in message
    report = info.value.report
    assert [s.path for s in report.skipped] == ["cut.jpg", "zero.png"] and not report.ok


def test_skip_bad_images_trains_on_the_rest_without_crashing(tmp_path: Path) -> None:
    dataset, report = prepare_dataset(opts(_bad_folder(tmp_path), skip_bad_images=True), NAMES)
    assert len(dataset) == 1 and report.images_usable == 1 and report.ok
    assert any(w.startswith("2 image(s) skipped (skip_bad_images):") and "cut.jpg" in w for w in report.warnings)
    for step in range(3):
        assert dataset.batch_at(step).pixels.shape == (1, 3, 64, 64)


def test_all_images_bad_is_refused_even_when_skipping(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="no usable image in"):
        prepare_dataset(opts(tmp_path, skip_bad_images=True), NAMES)


def test_tiny_images_rejected_unless_upscale_small(tmp_path: Path) -> None:
    png(tmp_path / "dot.png", size=(1, 1))
    png(tmp_path / "small.png", size=(40, 40))
    with pytest.raises(DatasetError) as info:
        prepare_dataset(opts(tmp_path), NAMES)
    assert ("dot.png: 1x1 is smaller than its 64x64 bucket (needs 64.00x upscaling); set upscale_small=True"
            in str(info.value))
    assert "small.png: 40x40 is smaller than its 64x64 bucket (needs 1.60x upscaling)" in str(info.value)
    dataset, _ = prepare_dataset(opts(tmp_path, upscale_small=True), NAMES)
    pixels = dataset.batch_at(0).pixels
    assert pixels.shape == (1, 3, 64, 64) and torch.isfinite(pixels).all()


def test_huge_and_extreme_images_rejected_with_size(tmp_path: Path) -> None:
    png(tmp_path / "ok.png")
    png(tmp_path / "strip.png", size=(180, 20))
    png(tmp_path / "big.png", size=(100, 100))
    items, report = run_preflight(opts(tmp_path, max_pixels=5000), NAMES)
    reasons = {s.path: s.reason for s in report.skipped}
    assert reasons["big.png"].startswith("100x100 is 0.0 megapixels, over the 0.005-megapixel limit (max_pixels)")
    assert reasons["strip.png"].startswith("180x20 has an aspect ratio of 9.0:1, over the 8:1 limit")
    assert [i.name for i in items] == ["ok.png"]


def test_animated_and_mislabelled_images_in_the_preflight(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    png(tmp_path / "lie.jpg")  # PNG bytes behind a .jpg name
    items, report = run_preflight(opts(tmp_path), NAMES)
    assert [i.name for i in items] == ["anim.gif", "lie.jpg"] and report.ok
    assert "anim.gif: animated image; only the first frame is used" in report.warnings


def test_exif_orientation_decides_the_bucket(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    png(tmp_path / "rotated.png", size=(96, 64), exif=exif.tobytes())
    items, _ = run_preflight(opts(tmp_path), NAMES)
    assert items[0].original_hw == (96, 64)
    assert items[0].target_hw[0] > items[0].target_hw[1]  # portrait bucket


def test_duplicates_warn_naming_both(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "sub" / "copy.png")
    items, report = run_preflight(opts(tmp_path), NAMES)
    assert len(items) == 2 and report.ok
    assert report.duplicates == [("a.png", "sub/copy.png")]
    assert "duplicate images (identical bytes): a.png and sub/copy.png" in report.warnings


# ------------------------------------------------------------------ captions in the pre-flight


def test_captions_trigger_and_missing_ones(tmp_path: Path) -> None:
    for name, colour in (("a", (1, 0, 0)), ("b", (2, 0, 0)), ("c", (3, 0, 0)), ("d", (4, 0, 0))):
        png(tmp_path / f"{name}.png", colour=colour)
    (tmp_path / "a.txt").write_text("[mychar] waving", encoding="utf-8")
    (tmp_path / "b.caption").write_text("a red hat", encoding="utf-8")
    (tmp_path / "c.txt").write_text("  \n\t", encoding="utf-8")
    items, report = run_preflight(opts(tmp_path), NAMES)
    assert [i.caption for i in items] == ["mychar waving", "mychar, a red hat", "mychar", "mychar"]
    assert [i.caption_file for i in items] == ["a.txt", "b.caption", None, None]
    assert report.missing_captions == ["c.png", "d.png"] and report.empty_captions == ["c.txt"]
    assert "1 empty caption file(s) treated as missing: c.txt" in report.warnings
    assert "2 image(s) have no caption and train with just the trigger 'mychar': c.png, d.png" in report.warnings


def test_all_captions_missing_is_an_explicit_warning(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    items, report = run_preflight(opts(tmp_path), {"hero": 1, "style": 3})
    assert items[0].caption == "hero style"
    assert "no image has a caption (.txt/.caption next to it); every image trains with just the trigger " \
           "'hero style'" in report.warnings


def test_caption_extension_order_is_configurable(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("from txt", encoding="utf-8")
    (tmp_path / "a.caption").write_text("from caption", encoding="utf-8")
    items, _ = run_preflight(opts(tmp_path, caption_extensions=(".caption", ".txt")), NAMES)
    assert items[0].caption == "mychar, from caption"


def test_bad_caption_encoding_refuses_unless_lossy(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    with pytest.raises(DatasetError,
                       match=r"caption a\.txt: not valid UTF-8 at byte 3 \(0xe9\); re-save the file as UTF-8"):
        prepare_dataset(opts(tmp_path), NAMES)
    dataset, report = prepare_dataset(opts(tmp_path, lossy_captions=True), NAMES)
    assert dataset.items[0].caption == "mychar, caf\ufffd"
    assert any("bad bytes replaced with U+FFFD" in w for w in report.warnings)


@needs_bpe
def test_long_caption_warns_with_file_and_count(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("mychar, " + ", ".join(["red hat"] * 30), encoding="utf-8")
    _, report = run_preflight(opts(tmp_path), {"mychar": 8}, clip_tokenizer())
    expected = 8 + 1 + 30 * 2 + 29  # name as 8 vectors, commas, "red hat" x30
    assert [(c.path, c.tokens) for c in report.long_captions] == [("a.txt", expected)]
    assert (f"caption a.txt is {expected} tokens, over the 75-token limit; training cuts it after token 75"
            in report.warnings)


# ------------------------------------------------------------------ report


@needs_bpe
def test_report_dict_text_and_name_tokens(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", size=(96, 64))
    (tmp_path / "notes.json").write_text("{}", encoding="utf-8")
    _, report = run_preflight(opts(tmp_path), {"mychar": 2, "cat": 1}, clip_tokenizer())
    data = json.loads(json.dumps(report.to_dict()))
    assert data["name_tokens"] == {"mychar": ["my", "char</w>"], "cat": ["cat</w>"]}
    assert data["buckets"] == {"64x64": 1, "80x48": 1} and data["ok"] is True
    assert data["ignored_files"] == {".json": 1} and data["images_found"] == 2
    assert any("single vocabulary token 'cat</w>'" in w for w in data["warnings"])
    text = report.format()
    assert "images: 2 found, 2 usable, 0 skipped" in text and "'mychar' tokenizes as my | char</w>" in text
    assert "buckets (w x h): 64x64: 1, 80x48: 1" in text


def test_report_without_tokenizer(tmp_path: Path) -> None:
    png(tmp_path / "a.png")
    items, report = run_preflight(opts(tmp_path), NAMES, tokenizer=None)
    assert report.name_tokens == {} and items[0].tokens is None
    json.dumps(report.to_dict())


# ------------------------------------------------------------------ options


@pytest.mark.parametrize("change,message", [
    ({"resolution": 100}, "dataset setting resolution = 100: must be a multiple of bucket_step 16"),
    ({"bucket_step": 12}, "dataset setting bucket_step = 12: must be a multiple of 8"),
    ({"caption_dropout": 1.5}, "dataset setting caption_dropout = 1.5: must be a probability between 0 and 1"),
    ({"caption_dropout": -0.1}, "dataset setting caption_dropout = -0.1: must be a probability"),
    ({"batch_size": 0}, "dataset setting batch_size = 0: must be a whole number >= 1"),
    ({"keep_tags": -1}, "dataset setting keep_tags = -1: must be a whole number >= 0"),
    ({"flip": "yes"}, "dataset setting flip = 'yes': must be True or False"),
    ({"background": (300, 0, 0)}, "dataset setting background = (300, 0, 0): must be three whole numbers 0-255"),
    ({"caption_extensions": (".png",)}, "dataset setting caption_extensions = ('.png',): must be a non-empty list"),
    ({"max_aspect": 0.5}, "dataset setting max_aspect = 0.5: must be a number >= 1"),
    ({"min_side": 80}, "min_side 80 / max_side None must leave resolution 64 in between"),
    ({"max_pixels": True}, "dataset setting max_pixels = True: must be a whole number >= 1"),
])
def test_bad_options_are_named(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(DatasetError, match=re.escape(message)):
        opts(tmp_path, **change).validate()


def test_defaults_and_bad_vector_count(tmp_path: Path) -> None:
    o = DatasetOptions(folder=tmp_path)
    assert (o.resolution, o.bucket_step, o.bucketing, o.batch_size, o.keep_tags, o.caption_dropout,
            o.max_pixels, o.background, o.caption_extensions) == \
           (512, 64, True, 1, 1, 0.0, 64_000_000, (255, 255, 255), (".txt", ".caption"))
    png(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"embedding 'mychar': vector count 0 must be a whole number >= 1"):
        run_preflight(opts(tmp_path), {"mychar": 0})


# ------------------------------------------------------------------ the Dataset


def _mixed_folder(tmp_path: Path) -> Path:
    for i in range(5):
        png(tmp_path / f"sq{i}.png", colour=(i * 40, 0, 0))
    for i in range(3):
        png(tmp_path / f"wide{i}.png", size=(96, 64), colour=(0, i * 40, 0))
        (tmp_path / f"wide{i}.txt").write_text("mychar, red, blue, green, tall", encoding="utf-8")
    return tmp_path


def test_batches_mix_one_bucket_and_resume_exactly(tmp_path: Path) -> None:
    options = opts(_mixed_folder(tmp_path), batch_size=2, flip=True, shuffle_tags=True, caption_dropout=0.2, seed=4)
    dataset, _ = prepare_dataset(options, NAMES)
    assert dataset.batches_per_epoch == 3 + 2
    for step in range(12):
        batch = dataset.batch_at(step)
        assert len({item.target_hw for item in batch.items}) == 1
        assert batch.indices == [dataset.items.index(item) for item in batch.items]
    resumed, _ = prepare_dataset(options, NAMES)
    for step in (11, 3, 7):  # any order: a pure function of (seed, step)
        a, b = dataset.batch_at(step), resumed.batch_at(step)
        assert (a.indices, a.captions, a.flipped, a.sizes) == (b.indices, b.captions, b.flipped, b.sizes)


def test_flip_mirrors_pixels_and_crop(tmp_path: Path) -> None:
    dataset, _ = prepare_dataset(opts(_mixed_folder(tmp_path), flip=True), NAMES)
    wide = next(i for i, item in enumerate(dataset.items) if item.name == "wide0.png")
    item = dataset.items[wide]
    plain, mirrored = dataset.size_info(wide, False), dataset.size_info(wide, True)
    assert plain.target == mirrored.target == item.target_hw == (48, 80)
    assert plain.original == (64, 96)
    assert mirrored.crop_top_left[1] == item.resized_hw[1] - 80 - plain.crop_top_left[1]
    flips = [dataset.flip_at(0, s) for s in range(400)]
    assert 150 < sum(flips) < 250
    batch = next(dataset.batch_at(s) for s in range(100) if dataset.batch_at(s).flipped[0])
    assert torch.equal(batch.pixels[0], torch.flip(load_pixels(batch.items[0], False), dims=[2]))
    assert batch.sizes[0] == dataset.size_info(batch.indices[0], True)


def test_no_bucketing_uses_square_crops(tmp_path: Path) -> None:
    dataset, report = prepare_dataset(opts(_mixed_folder(tmp_path), bucketing=False), NAMES)
    assert {item.target_hw for item in dataset.items} == {(64, 64)}
    assert report.buckets == {"64x64": 8}
    wide = next(item for item in dataset.items if item.name == "wide0.png")
    assert wide.resized_hw == (64, 96) and wide.crop_yx == (0, 16)


def test_tag_frequency_and_empty_dataset(tmp_path: Path) -> None:
    dataset, _ = prepare_dataset(opts(_mixed_folder(tmp_path)), NAMES)
    assert dataset.tag_frequency() == {"mychar": 8, "red": 3, "blue": 3, "green": 3, "tall": 3}
    with pytest.raises(DatasetError, match="no usable image"):
        Dataset([], opts(tmp_path))
