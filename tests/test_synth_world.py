"""The procedural world (pictures + captions), its reader, and the demo dataset drawn from it."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest

from pivotal.demo.data import make_demo_dataset
from pivotal.demo.world import (
    BASE_FILLS,
    BASE_SHAPES,
    BASE_WORLD,
    EXAMPLE_CHARACTER,
    FILLS,
    FULL_WORLD,
    HELD_OUT_FILLS,
    HELD_OUT_SHAPES,
    SHAPES,
    SHIFTED_STYLE,
    Scene,
    SceneObject,
    WorldSpec,
    caption,
    render,
    sample_scene,
    world_item,
)
from pivotal.demo.world_read import read_picture
from pivotal.errors import ConfigError

HELD_OUT_WORDS = re.compile(r"\b(" + "|".join(HELD_OUT_SHAPES + HELD_OUT_FILLS) + r")s?\b")


def test_world_items_are_deterministic_and_distinct() -> None:
    a, b = world_item(3, 17), world_item(3, 17)
    assert a.image.tobytes() == b.image.tobytes() and a.caption == b.caption and a.scene == b.scene
    assert a.image.size == (64, 64) and a.image.mode == "RGB"
    others = [world_item(3, 18), world_item(4, 17)]
    assert all(o.image.tobytes() != a.image.tobytes() for o in others)


def test_captions_say_what_is_drawn() -> None:
    one = Scene("blue", (SceneObject("circle", "red", "top left"),))
    assert caption(one) == "a red circle on a blue background, top left"
    assert caption(Scene("orange", (SceneObject("square", "orange", "in the centre"),))) == \
        "an orange square on an orange background, in the centre"
    pair = Scene("white", (SceneObject("circle", "red", "top left"), SceneObject("square", "green", "bottom right")))
    assert caption(pair) == "a red circle, top left, and a green square, bottom right, on a white background"
    same = Scene("black", (SceneObject("triangle", "yellow", "top left"),
                           SceneObject("triangle", "yellow", "top right")))
    assert caption(same) == "two yellow triangles, top left and top right, on a black background"
    striped = Scene("blue", (SceneObject("star", "red", "top left", fill="striped", accent="white"),))
    assert caption(striped) == "a red and white striped star on a blue background, top left"
    character = Scene("green", (EXAMPLE_CHARACTER.at("bottom left"),))
    assert caption(character) == "mychar on a green background, bottom left"
    with pytest.raises(ConfigError):
        caption(Scene("blue", ()))


def test_base_world_never_shows_or_names_held_out_concepts() -> None:
    assert not set(BASE_SHAPES) & set(HELD_OUT_SHAPES) and not set(BASE_FILLS) & set(HELD_OUT_FILLS)
    assert set(BASE_SHAPES + HELD_OUT_SHAPES) == set(SHAPES) and set(BASE_FILLS + HELD_OUT_FILLS) == set(FILLS)
    rng = random.Random(0)
    scenes = [sample_scene(rng) for _ in range(400)]
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert all(o.shape in BASE_SHAPES and o.fill in BASE_FILLS for s in scenes for o in s.objects)
    assert not any(HELD_OUT_WORDS.search(caption(s)) for s in scenes)
    assert all(s.background not in [o.colour for o in s.objects] for s in scenes)
    full = [sample_scene(rng, FULL_WORLD) for _ in range(400)]
    assert {o.shape for s in full for o in s.objects} == set(SHAPES)
    assert any(HELD_OUT_WORDS.search(caption(s)) for s in full)


def test_held_out_shapes_and_fills_render_differently() -> None:
    pictures = {}
    for shape in SHAPES:
        for fill in FILLS:
            scene = Scene("blue", (SceneObject(shape, "red", "in the centre", fill=fill, accent="yellow"),))
            pictures[(shape, fill)] = np.asarray(render(scene))
    keys = list(pictures)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert np.abs(pictures[a].astype(int) - pictures[b]).sum() > 0, (a, b)
    with pytest.raises(ConfigError, match="unknown shape"):
        render(Scene("blue", (SceneObject("hexagon", "red", "top left"),)))
    with pytest.raises(ConfigError):
        WorldSpec(shapes=("hexagon",))


def test_shifted_style_changes_pixels_not_captions() -> None:
    base, shifted = world_item(1, 5), world_item(1, 5, style=SHIFTED_STYLE)
    assert base.caption == shifted.caption and base.scene == shifted.scene
    diff = np.abs(np.asarray(base.image, dtype=int) - np.asarray(shifted.image, dtype=int))
    assert diff.mean() > 10  # tint plus grain, not a rounding difference
    assert world_item(1, 5, style=SHIFTED_STYLE).image.tobytes() == shifted.image.tobytes()


def test_reader_reads_rendered_pictures_back() -> None:
    rng = random.Random(11)
    scenes = [sample_scene(rng, BASE_WORLD, objects=1) for _ in range(150)]
    for style in (None, SHIFTED_STYLE):
        hits = 0
        for i, scene in enumerate(scenes):
            image = render(scene, style=style, noise_seed=i) if style else render(scene)
            r = read_picture(image, style=style) if style else read_picture(image)
            o = scene.objects[0]
            hits += (r.background, r.colour, r.place, r.shape) == (scene.background, o.colour, o.place, o.shape)
        assert hits == len(scenes), style
    # A picture is not read as just any scene: against another picture's scene, it mostly misses.
    wrong = sum(read_picture(render(a)).colour == b.objects[0].colour for a, b in zip(scenes, scenes[1:]))
    assert wrong < len(scenes) / 3
    blank = read_picture(render(Scene("red", ())))
    assert blank.background == "red" and blank.colour is None and blank.coverage == 0.0


def test_reader_reads_soft_edged_shapes() -> None:
    """Decoded pictures have soft edges: the shape is read from the outline halfway between the
    background and the object, so a 1 px blur leaves most shapes readable (a fixed distance
    threshold read 80 % of these; the halfway outline 92 %)."""
    from PIL import ImageFilter

    rng = random.Random(12)
    scenes = [sample_scene(rng, BASE_WORLD, objects=1) for _ in range(100)]
    hits = sum(read_picture(render(s).filter(ImageFilter.GaussianBlur(1.0))).shape == s.objects[0].shape
               for s in scenes)
    assert hits >= 88, hits


def test_demo_dataset_of_a_character(tmp_path: Path) -> None:
    paths = make_demo_dataset(tmp_path, ["mychar"], count=4, size=64, character=EXAMPLE_CHARACTER)
    texts = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in paths]
    assert all(re.fullmatch(r"\[mychar\] on an? \w+ background, [a-z ]+\n", t) for t in texts), texts
    plain = make_demo_dataset(tmp_path / "plain", ["mychar"], count=4, size=64)
    assert [p.read_bytes() for p in paths] != [p.read_bytes() for p in plain]
