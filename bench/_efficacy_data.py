"""The held-out concepts of the efficacy benchmark and their pictures.

Three concepts the tiny-world base model never saw in a caption (``pivotal.demo.world`` keeps
them out of its training world):

* ``shape``: a new shape (the star), in any solid colour;
* ``texture``: a new fill (diagonal stripes), on the shapes the model knows;
* ``character``: one specific look built only from held-out parts (an orange and purple striped
  star), captioned by its name alone, like a person's name;
* ``style``: a look painted on every object of the picture (``world.EXAMPLE_LOOK``: pastel with
  darker checks), on the shapes and colours the model knows, one or two objects a picture; the
  caption is the world's own with ", in NAME style" after it.

Each concept has a small training set (``TRAIN_COUNT`` pictures) in some compositions and a
held-out set in compositions the training set never shows: other places on the canvas, other
background colours and, for the shape and texture, other object colours. Captions use the world's
own wording with the concept's trigger where its words would be, e.g. "a red mystar on a blue
background, top left", "mychar on a white background, in the centre" or "a red circle, top
left, and a green square, top right, on a blue background, in mypaint style".
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pivotal.demo.world import (
    BASE_STYLE,
    BASE_WORLD,
    EXAMPLE_CHARACTER,
    EXAMPLE_LOOK,
    Scene,
    SceneObject,
    WorldStyle,
    background_words,
    caption,
    render,
    world_item,
)

TRAIN_COUNT = 12
HELD_OUT_COUNT = 16
BASE_PROMPT_COUNT = 32
#: Training compositions use these places and backgrounds; held-out ones use the others.
TRAIN_PLACES = ("top left", "top right", "in the centre")
HELD_OUT_PLACES = ("bottom left", "bottom right")
TRAIN_BACKGROUNDS = ("blue", "green", "white", "black")
HELD_OUT_BACKGROUNDS = ("red", "yellow", "purple", "orange")
TRAIN_COLOURS = ("red", "yellow", "white", "green")
HELD_OUT_COLOURS = ("blue", "purple", "orange", "black")
#: World seed of the base-prompt pictures (drift): none of them shows a held-out concept.
BASE_PROMPT_SEED = 9101


@dataclass(frozen=True)
class Concept:
    """A held-out concept: its embedding name (``trigger``), the class word its vectors start
    from (``init``), and the rare word a plain LoRA would use as its trigger instead."""

    key: str
    trigger: str
    init: str
    rare: str
    label: str

    def obj(self, rng: random.Random, place: str, colours: Sequence[str], background: str) -> SceneObject:
        """One object of the concept at ``place``, coloured from ``colours`` (not the background)."""
        if self.key == "character":
            return EXAMPLE_CHARACTER.at(place)
        colour = rng.choice([c for c in colours if c != background])
        if self.key == "shape":
            return SceneObject("star", colour, place)
        if self.key == "style":  # a plain object of the base world; the look comes from world_style
            return SceneObject(rng.choice(("circle", "square", "triangle")), colour, place)
        accent = rng.choice([c for c in ("white", "black", "yellow", "purple") if c not in (colour, background)])
        return SceneObject(rng.choice(("circle", "square", "triangle")), colour, place, fill="striped",
                           accent=accent)

    def words(self, obj: SceneObject, trigger: str) -> str:
        """The object's words with ``trigger`` standing for the concept (article included)."""
        if self.key == "character":
            return trigger
        if self.key == "style":
            return f"{'an' if obj.colour[0] in 'aeiou' else 'a'} {obj.colour} {obj.shape}"
        if self.key == "shape":
            words = f"{obj.colour} {trigger}"
        else:
            words = f"{obj.colour} and {obj.accent} {trigger} {obj.shape}"
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"

    def caption(self, scene: Scene, trigger: str | None = None) -> str:
        if self.key == "style":
            return f"{caption(scene)}, in {trigger or self.trigger} style"
        obj = scene.objects[0]
        return f"{self.words(obj, trigger or self.trigger)} {background_words(scene.background)}, {obj.place}"

    def world_style(self, style: WorldStyle) -> WorldStyle:
        """The style the concept's pictures are drawn in: ``style``, with the look for the style concept."""
        return dataclasses.replace(style, look=EXAMPLE_LOOK) if self.key == "style" else style


CONCEPTS: dict[str, Concept] = {
    "shape": Concept("shape", "mystar", "circle", "zwx", "new shape (star)"),
    "texture": Concept("texture", "mystripes", "", "qwv", "new texture (stripes)"),
    "character": Concept("character", "mychar", "circle", "vkz", "character (striped star)"),
    "style": Concept("style", "mypaint", "", "xjq", "style (pastel checks on every object)"),
}


@dataclass(frozen=True)
class Picture:
    image: Image.Image
    scene: Scene

    def caption(self, concept: Concept, trigger: str | None = None) -> str:
        return concept.caption(self.scene, trigger)


def _scenes(concept: Concept, count: int, seed: int, places: Sequence[str], backgrounds: Sequence[str],
            colours: Sequence[str]) -> list[Scene]:
    rng = random.Random(f"pivotal-efficacy:{concept.key}:{seed}")
    scenes = []
    for i in range(count):
        # the character's own colours never serve as its background
        allowed = [b for b in backgrounds if concept.key != "character" or b not in ("orange", "purple")]
        background = allowed[i % len(allowed)]
        place = places[(i // len(backgrounds)) % len(places)]
        if concept.key == "style" and i % 3 == 2:  # every third picture: two objects, both in the look
            a, b = (p for p in places if p != "in the centre")
            first = dataclasses.replace(concept.obj(rng, a, colours, background), scale=0.8)
            second = concept.obj(rng, b, [c for c in colours if c != first.colour], background)
            scenes.append(Scene(background, (first, dataclasses.replace(second, scale=0.8))))
            continue
        scenes.append(Scene(background, (concept.obj(rng, place, colours, background),)))
    return scenes


def training_pictures(concept: Concept, seed: int = 0, style: WorldStyle = BASE_STYLE) -> list[Picture]:
    """``TRAIN_COUNT`` pictures of the concept in the training compositions."""
    scenes = _scenes(concept, TRAIN_COUNT, seed, TRAIN_PLACES, TRAIN_BACKGROUNDS, TRAIN_COLOURS)
    look = concept.world_style(style)
    return [Picture(render(s, style=look, noise_seed=seed * 1000 + i), s) for i, s in enumerate(scenes)]


def held_out_pictures(concept: Concept, style: WorldStyle = BASE_STYLE) -> list[Picture]:
    """``HELD_OUT_COUNT`` pictures of the concept in compositions no training picture has."""
    scenes = _scenes(concept, HELD_OUT_COUNT, 777, HELD_OUT_PLACES, HELD_OUT_BACKGROUNDS, HELD_OUT_COLOURS)
    look = concept.world_style(style)
    return [Picture(render(s, style=look, noise_seed=50_000 + i), s) for i, s in enumerate(scenes)]


def base_prompt_items(style: WorldStyle = BASE_STYLE) -> list[tuple[Image.Image, str]]:
    """Ordinary pictures of the base world with their captions (no trigger): for drift."""
    return [(item.image, item.caption) for item in
            (world_item(BASE_PROMPT_SEED, i, BASE_WORLD, style) for i in range(BASE_PROMPT_COUNT))]


def object_mask(scene: Scene, style: WorldStyle = BASE_STYLE, size: int = 64) -> Image.Image:
    """The grey-level mask ("L") of the scene's objects: each pixel's coverage by them, from two
    renders on a black and a white background (an edge pixel a share ``a`` covered differs by
    ``(1 - a) * 255`` between the two)."""
    dark = np.asarray(render(Scene("black", scene.objects), size, size, style), dtype=np.float64)
    light = np.asarray(render(Scene("white", scene.objects), size, size, style), dtype=np.float64)
    span = np.asarray(style.colour("white"), np.float64) - np.asarray(style.colour("black"), np.float64)
    coverage = 1.0 - ((light - dark) / span).mean(axis=2)
    return Image.fromarray(np.clip(np.rint(coverage * 255), 0, 255).astype(np.uint8), "L")


def write_mask_folder(folder: Path, concept: Concept, seed: int = 0) -> Path:
    """Masks of the training set (``NNN.png``, the concept's region), as ``mask_dir`` reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, pic in enumerate(training_pictures(concept, seed)):
        object_mask(pic.scene).save(folder / f"{i:03d}.png")
    return folder


def write_training_folder(folder: Path, concept: Concept, trigger: str, seed: int = 0) -> Path:
    """The training set as a Pivotal dataset folder: ``NNN.png`` + ``NNN.txt`` (caption with ``trigger``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, pic in enumerate(training_pictures(concept, seed)):
        pic.image.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(pic.caption(concept, trigger) + "\n", encoding="utf-8")
    return folder
