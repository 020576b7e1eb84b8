"""A small synthetic captioned dataset for the demo and for tests: coloured shapes on plain
backgrounds, drawn with PIL, deterministic from the seed.

Each image ``demo_NNN.png`` has a caption ``demo_NNN.txt`` (UTF-8) such as
``"[mychar] a red circle on a blue background, top left"`` (one ``[name]`` per embedding name).
Image 1 is landscape (3:2) and image 2 portrait (2:3), when there are that many, so bucketing
is exercised; the rest are ``size`` x ``size``. The non-square ones are larger than ``size`` on
their long side, so none needs upscaling at ``resolution=size``; train at a larger resolution
with ``upscale_small=True``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from pivotal.errors import DatasetError
from pivotal.names import validate_embedding_name

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
#: Caption phrase -> shape centre as fractions of (width, height).
PLACES: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7), "in the centre": (0.5, 0.5),
}


def make_demo_dataset(folder: str | os.PathLike[str], names: Sequence[str], count: int = 8, size: int = 64,
                      seed: int = 0) -> list[Path]:
    """Write ``count`` images and captions into ``folder`` (created if needed; files of the same
    names are overwritten) and return the image paths in order."""
    names = [validate_embedding_name(n) for n in names]
    if count < 1 or size < 16:
        raise DatasetError(f"demo dataset: count {count} must be >= 1 and size {size} >= 16")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"pivotal-demo:{seed}")
    prefix = " ".join(f"[{n}]" for n in names)
    paths = []
    for index in range(count):
        shape = rng.choice(SHAPES)
        fg, bg = rng.sample(sorted(COLOURS), 2)
        place = rng.choice(sorted(PLACES))
        width, height = {1: (size * 3 // 2, size), 2: (size, size * 3 // 2)}.get(index, (size, size))
        image = Image.new("RGB", (width, height), COLOURS[bg])
        _draw(ImageDraw.Draw(image), shape, COLOURS[fg], PLACES[place], width, height)
        path = out / f"demo_{index:03d}.png"
        image.save(path, format="PNG")
        article = "an" if fg[0] in "aeiou" else "a"
        caption = f"{article} {fg} {shape} on a {bg} background, {place}"
        path.with_suffix(".txt").write_text(f"{prefix} {caption}\n" if prefix else f"{caption}\n", encoding="utf-8")
        paths.append(path)
    return paths


def _draw(draw: ImageDraw.ImageDraw, shape: str, colour: tuple[int, int, int], place: tuple[float, float],
          width: int, height: int) -> None:
    radius = min(width, height) // 5
    cx, cy = int(place[0] * width), int(place[1] * height)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)], fill=colour)
