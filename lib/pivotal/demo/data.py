"""A small synthetic captioned dataset for the demo and for tests: pictures of the procedural
world (:mod:`pivotal.demo.world`), one object each, deterministic from the seed.

Each image ``demo_NNN.png`` has a caption ``demo_NNN.txt`` (UTF-8) such as
``"[mychar] a red circle on a blue background, top left"`` (one ``[name]`` per embedding name).
Image 1 is landscape (3:2) and image 2 portrait (2:3), when there are that many, so bucketing
is exercised; the rest are ``size`` x ``size``. The non-square ones are larger than ``size`` on
their long side, so none needs upscaling at ``resolution=size``; train at a larger resolution
with ``upscale_small=True``.

With ``character`` set, every picture shows that :class:`~pivotal.demo.world.Character` (a look
built from shapes / fills the pre-trained demo model never saw) and the caption names it only by
the embedding names: ``"[mychar] on a red background, top left"``; the backgrounds take turns
from :data:`CHARACTER_BACKGROUNDS`, so blue and green stay unseen.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Sequence

from pivotal.demo.world import (
    BASE_WORLD,
    COLOURS,
    PLACES,
    Character,
    Scene,
    background_words,
    caption,
    render,
    sample_scene,
)
from pivotal.errors import DatasetError
from pivotal.text.names import validate_embedding_name

SHAPES = BASE_WORLD.shapes
#: Backgrounds of the character pictures, in turn. Blue and green are left out on purpose: the
#: demo then shows the character on a background it never saw it on ("mychar on a blue background").
CHARACTER_BACKGROUNDS = ("white", "red", "yellow", "black")
#: Grid rows for a bundle trained on the demo data: the two backgrounds its pictures never had
#: (green, blue), each at two places, in the words the tiny-world model knows (see
#: :func:`pivotal.inference.grid.novel_prompts`). Not purple or orange: those are the character's own
#: colours, so on them neither the eye nor the reader can tell the character from the background.
GRID_CONTEXTS = tuple(f"{{names}} {background_words(c)}, {place}"
                      for c, place in (("green", "top left"), ("blue", "bottom right"),
                                       ("green", "bottom right"), ("blue", "top left")))
__all__ = ["COLOURS", "PLACES", "SHAPES", "make_demo_dataset"]


def make_demo_dataset(folder: str | os.PathLike[str], names: Sequence[str], count: int = 8, size: int = 64,
                      seed: int = 0, character: Character | None = None) -> list[Path]:
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
        scene = sample_scene(rng, BASE_WORLD, objects=1)
        text = caption(scene)
        if character is not None:
            obj = scene.objects[0]
            choices = [c for c in CHARACTER_BACKGROUNDS if c not in (character.colour, character.accent)]
            background = choices[index % len(choices)]
            scene = Scene(background, (character.at(obj.place, obj.scale, obj.offset),))
            # The embedding names in front are the subject; the character's own name is not said.
            text = f"{background_words(background)}, {obj.place}"
        width, height = {1: (size * 3 // 2, size), 2: (size, size * 3 // 2)}.get(index, (size, size))
        image = render(scene, width, height)
        path = out / f"demo_{index:03d}.png"
        image.save(path, format="PNG")
        path.with_suffix(".txt").write_text(f"{prefix} {text}\n" if prefix else f"{text}\n", encoding="utf-8")
        paths.append(path)
    return paths
