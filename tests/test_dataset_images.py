"""Image decoding: formats, modes, orientation, animation, bad files, size caps, pixels."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pivotal.data.images import (
    ImageItem,
    ImageRejected,
    decode_image,
    deep_to_8bit,
    load_pixels,
    read_image_bytes,
    to_rgb,
)
from pivotal.errors import DatasetError

WHITE = (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def mean_rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64).reshape(-1, 3).mean(axis=0)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose pixel data is garbage."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


# ------------------------------------------------------------------ formats and bad files


def test_extension_lie_is_decoded_by_content(tmp_path: Path) -> None:
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(Image.new("RGB", (8, 6), (10, 200, 30)), "PNG"))
    decoded = decode_image(read_image_bytes(path, path.name), path.name, WHITE)
    assert decoded.rgb.size == (8, 6)
    assert tuple(decoded.rgb.getpixel((0, 0))) == (10, 200, 30)  # exact: it was lossless PNG


def test_truncated_jpeg_is_rejected_with_reason() -> None:
    data = encode(Image.effect_noise((64, 64), 60).convert("RGB"), "JPEG")[:-200]
    with pytest.raises(ImageRejected, match=r"^broken\.jpg: cannot decode: image file is truncated") as info:
        decode_image(data, "broken.jpg", WHITE)
    assert info.value.name == "broken.jpg"


def test_zero_byte_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageRejected, match=r"^empty\.png: the file is empty \(0 bytes\)$"):
        read_image_bytes(path, "empty.png")


def test_garbage_is_rejected_as_not_an_image() -> None:
    with pytest.raises(ImageRejected, match=r"^x\.png: not an image Pillow can read"):
        decode_image(b"this is text, not a picture", "x.png", WHITE)


def test_rejected_error_is_a_dataset_error() -> None:
    assert issubclass(ImageRejected, DatasetError)


# ------------------------------------------------------------------ orientation


def test_exif_orientation_6_swaps_width_and_height_and_rotates() -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # red marker at the stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(stored, "PNG", exif=exif.tobytes())
    decoded = decode_image(data, "rot.png", WHITE)
    assert decoded.rgb.size == (20, 40)
    # After a 90 degree clockwise turn, the stored top-left is the displayed top-right.
    assert decoded.rgb.getpixel((19, 0)) == (255, 0, 0)
    assert decoded.rgb.getpixel((0, 0)) == (0, 0, 255)


# ------------------------------------------------------------------ transparency


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 0, 0), (12, 34, 56)])
def test_rgba_hidden_colour_under_zero_alpha_never_shows(background: tuple[int, int, int]) -> None:
    img = Image.new("RGBA", (8, 8), (255, 0, 255, 0))  # magenta, fully transparent
    img.paste((0, 255, 0, 255), (0, 0, 4, 8))  # left half opaque green
    decoded = decode_image(encode(img, "PNG"), "a.png", background)
    assert decoded.rgb.mode == "RGB"
    assert decoded.rgb.getpixel((6, 4)) == background
    assert decoded.rgb.getpixel((1, 4)) == (0, 255, 0)
    assert img.convert("RGB").getpixel((6, 4)) == (255, 0, 255)  # what a plain convert would show


def test_half_alpha_blends_with_background() -> None:
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    out = to_rgb(img, (255, 255, 255))
    assert all(abs(c - 127) <= 1 for c in out.getpixel((0, 0)))


def test_la_and_palette_transparency_are_composited() -> None:
    la = Image.new("LA", (4, 4), (0, 0))  # black, transparent
    assert decode_image(encode(la, "PNG"), "la.png", (9, 9, 9)).rgb.getpixel((0, 0)) == (9, 9, 9)
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 255, 0, 255] + [0] * 762)
    data = encode(p, "PNG", transparency=1)  # palette entry 1 (magenta) is transparent
    assert decode_image(data, "p.png", (9, 9, 9)).rgb.getpixel((0, 0)) == (9, 9, 9)


# ------------------------------------------------------------------ colour modes


def test_cmyk_jpeg_colours_match_the_rgb_reference() -> None:
    reference = Image.new("RGB", (32, 32), (200, 40, 90))
    reference.paste((20, 180, 240), (0, 0, 16, 32))
    data = encode(reference.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data, "cmyk.jpg", WHITE).rgb
    diff = np.abs(np.asarray(decoded, dtype=np.int32) - np.asarray(reference, dtype=np.int32))
    assert diff.mean() < 4, "colours are off (inverted CMYK?)"


@pytest.mark.parametrize("mode,dtype,value,expected", [
    ("I;16", "<u2", 30000, 30000 / 65535 * 255),
    ("I;16B", ">u2", 30000, 30000 / 65535 * 255),
    ("I", "<i4", 30000, 30000 / 65535 * 255),
    ("I", "<i4", 100, 100),  # an "I" image holding 8-bit values stays 8-bit
    ("F", "<f4", 0.25, 0.25 * 255),
    ("F", "<f4", 30000.0, 30000 / 65535 * 255),
])
def test_deep_images_are_scaled_by_range_not_clamped(mode: str, dtype: str, value: float, expected: float) -> None:
    arr = np.full((6, 6), value, dtype=dtype)
    img = Image.frombytes(mode, (6, 6), arr.tobytes())
    out = to_rgb(img)
    assert out.mode == "RGB"
    assert abs(mean_rgb(out).mean() - expected) <= 1.0


def test_sixteen_bit_png_file_mean_brightness() -> None:
    arr = np.linspace(0, 65535, 64 * 64).astype("<u2").reshape(64, 64)
    data = encode(Image.frombytes("I;16", (64, 64), arr.tobytes()), "PNG")
    decoded = decode_image(data, "deep.png", WHITE).rgb
    assert abs(mean_rgb(decoded).mean() - 127.5) < 1.5  # clamping would give ~254


def test_float_image_with_nan_and_outside_range_is_normalised() -> None:
    arr = np.array([[-5.0, 5.0], [np.nan, 0.0]], dtype="<f4")
    out = np.asarray(deep_to_8bit(Image.frombytes("F", (2, 2), arr.tobytes())))
    assert out[0, 0] == 0 and out[0, 1] == 255 and out[1, 1] == 128 and out[1, 0] == 128  # NaN -> 0.0 -> mid


def test_constant_deep_image_has_no_division_by_zero() -> None:
    arr = np.full((3, 3), -7.0, dtype="<f4")
    assert np.asarray(deep_to_8bit(Image.frombytes("F", (3, 3), arr.tobytes()))).max() == 0


@pytest.mark.parametrize("mode,colour,expected", [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255))])
def test_grey_and_bilevel_become_rgb(mode: str, colour: int, expected: tuple[int, int, int]) -> None:
    decoded = decode_image(encode(Image.new(mode, (4, 4), colour), "PNG"), "g.png", WHITE)
    assert decoded.rgb.mode == "RGB" and decoded.rgb.getpixel((2, 2)) == expected


# ------------------------------------------------------------------ animation


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_image_uses_first_frame_and_warns(fmt: str) -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
    decoded = decode_image(data, "anim." + fmt.lower(), WHITE)
    assert decoded.animated
    red, green, blue = decoded.rgb.getpixel((8, 8))
    assert red > 200 and green < 50 and blue < 50
    assert decoded.notes == (f"anim.{fmt.lower()}: animated image; only the first frame is used",)


# ------------------------------------------------------------------ size caps


def test_over_pixel_cap_is_rejected_from_the_header_before_decoding() -> None:
    data = png_header_only(9000, 9000)  # 81 MP: over our 64 MP cap, under Pillow's error limit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ImageRejected, match=r"^big\.png: 9000x9000 is 81\.0 megapixels, over the 64-megapixel"):
            decode_image(data, "big.png", WHITE, max_pixels=64_000_000)
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_decompression_bomb_error_is_a_rejection_and_global_limit_is_untouched() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected,
                       match=r"^bomb\.png: refused by Pillow's decompression-bomb limit: .*400000000 pixels"):
        decode_image(png_header_only(20000, 20000), "bomb.png", WHITE, max_pixels=10**12)
    assert Image.MAX_IMAGE_PIXELS == before


def test_extreme_aspect_is_rejected_with_size() -> None:
    data = encode(Image.new("RGB", (90, 10)), "PNG")
    with pytest.raises(ImageRejected, match=r"^strip\.png: 90x10 has an aspect ratio of 9\.0:1, over the 8:1 limit"):
        decode_image(data, "strip.png", WHITE, max_aspect=8.0)
    assert decode_image(data, "strip.png", WHITE, max_aspect=9.0).rgb.size == (90, 10)


# ------------------------------------------------------------------ pixels


def _item(path: Path, sha: str, original_hw: tuple[int, int], resized_hw: tuple[int, int],
          crop_yx: tuple[int, int], target_hw: tuple[int, int]) -> ImageItem:
    return ImageItem(path=path, name=path.name, sha256=sha, original_hw=original_hw, resized_hw=resized_hw,
                     crop_yx=crop_yx, target_hw=target_hw, background=WHITE)


def test_load_pixels_shape_range_and_flip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    arr[0, 0] = (0, 0, 0)
    arr[0, 29] = (255, 255, 255)
    path = tmp_path / "p.png"
    path.write_bytes(encode(Image.fromarray(arr), "PNG"))
    sha = decode_image(path.read_bytes(), "p.png", WHITE).sha256
    item = _item(path, sha, (20, 30), (20, 30), (0, 0), (20, 30))
    pixels = load_pixels(item, flip=False)
    assert pixels.shape == (3, 20, 30) and pixels.dtype == torch.float32
    assert float(pixels.min()) == -1.0 and float(pixels.max()) == 1.0
    expected = torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(pixels, expected)
    assert torch.equal(load_pixels(item, flip=True), torch.flip(pixels, dims=[2]))


def test_load_pixels_resizes_and_crops(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # left quarter red
    path = tmp_path / "wide.png"
    path.write_bytes(encode(img, "PNG"))
    sha = decode_image(path.read_bytes(), "wide.png", WHITE).sha256
    item = _item(path, sha, (20, 40), (16, 32), (0, 8), (16, 16))  # centre window of the 32x16 resize
    pixels = load_pixels(item, flip=False)
    assert pixels.shape == (3, 16, 16)
    assert float(pixels[2].mean()) > 0.9  # blue: the red quarter was cropped away


def test_changed_file_is_refused_mid_run(tmp_path: Path) -> None:
    path = tmp_path / "c.png"
    path.write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    item = _item(path, "0" * 64, (4, 4), (4, 4), (0, 0), (4, 4))
    with pytest.raises(DatasetError, match=r"changed since the pre-flight check"):
        load_pixels(item, flip=False)
