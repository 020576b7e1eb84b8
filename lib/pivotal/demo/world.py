"""A procedural world of captioned pictures: coloured shapes on plain backgrounds.

The tiny pre-trained demo model (:mod:`pivotal.demo.tiny_world`) learns this world, and the demo
dataset (:mod:`pivotal.demo.data`) is drawn from it. A picture is a :class:`Scene` (a background
colour and one or two :class:`SceneObject`), drawn by :func:`render` and described in plain words
by :func:`caption`, e.g. ``"a red circle on a blue background, top left"`` or ``"a red circle, top
left, and a green square, bottom right, on a blue background"``. :func:`world_item` is the pure
function ``(seed, index) -> (image, caption, scene)``, so any picture can be re-drawn on its own.

Shapes and fills are pluggable: :data:`SHAPES` maps a shape name to a function drawing it into a
mask, :data:`FILLS` a fill name to a function painting the pattern. The base model is trained on
:data:`BASE_SHAPES` / :data:`BASE_FILLS` only; :data:`HELD_OUT_SHAPES` / :data:`HELD_OUT_FILLS`
are concepts it never saw in a caption, for learning later as embeddings. A :class:`Character`
is a named held-out look (shape + fill + colours) whose caption is its name.

:class:`WorldStyle` shifts the whole world (palette tint, background grain) without changing what
captions say; :data:`SHIFTED_STYLE` is one such shift, for a second base model continued on it.
An :class:`ObjectLook` in a style paints every object the same way (a palette shift and a texture:
an artist's "style" in this world); :data:`EXAMPLE_LOOK` is a held-out one, for learning as a style.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw

from pivotal.errors import ConfigError

RGB = tuple[int, int, int]

COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
#: Caption phrase -> object centre as fractions of (width, height).
PLACES: dict[str, tuple[float, float]] = {
    "top left": (0.3, 0.3), "top right": (0.7, 0.3), "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7), "in the centre": (0.5, 0.5),
}
#: Where the two objects of a two-object scene may stand (the centre would overlap a corner).
CORNERS = ("top left", "top right", "bottom left", "bottom right")
#: Object radius as a fraction of the picture's short side (times the object's ``scale``).
RADIUS = 0.2
#: Drawing happens at this many times the output size, then is box-filtered down: smooth edges.
SUPERSAMPLE = 4

ShapeFn = Callable[[ImageDraw.ImageDraw, float, float, float], None]
FillFn = Callable[[int, int, RGB, RGB, int], Image.Image]


# -- shapes: draw value 255 into an "L" mask, centred at (cx, cy), radius r (mask pixels) -----------
def _circle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)


def _square(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    s = 0.9 * r  # a little smaller than the circle's box, so both cover similar areas
    d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)


def _triangle(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=255)


def _star(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    points = []
    for k in range(10):  # five points, pointing up; inner radius 0.45 r
        rad = r if k % 2 == 0 else 0.45 * r
        a = -math.pi / 2 + k * math.pi / 5
        points.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    d.polygon(points, fill=255)


def _heart(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    lobe = 0.5 * r  # two lobes on top, a point at the bottom
    for sx in (-1, 1):
        x = cx + sx * lobe
        d.ellipse((x - lobe, cy - r * 0.9, x + lobe, cy - r * 0.9 + 2 * lobe), fill=255)
    d.polygon([(cx - 2 * lobe, cy - r * 0.9 + lobe), (cx + 2 * lobe, cy - r * 0.9 + lobe), (cx, cy + r)], fill=255)


SHAPES: dict[str, ShapeFn] = {"circle": _circle, "square": _square, "triangle": _triangle,
                              "star": _star, "heart": _heart}
BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
HELD_OUT_SHAPES: tuple[str, ...] = ("star", "heart")


# -- fills: an RGB canvas (width, height) of the pattern; period in canvas pixels ------------------
def _solid(width: int, height: int, colour: RGB, accent: RGB, period: int) -> Image.Image:
    return Image.new("RGB", (width, height), colour)


def _pattern(width: int, height: int, colour: RGB, accent: RGB, on_accent: np.ndarray) -> Image.Image:
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[...] = colour
    out[on_accent] = accent
    return Image.fromarray(out, "RGB")


def _striped(width: int, height: int, colour: RGB, accent: RGB, period: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return _pattern(width, height, colour, accent, ((x + y) // max(1, period // 2)) % 2 == 1)  # diagonal


def _checkered(width: int, height: int, colour: RGB, accent: RGB, period: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    cell = max(1, period // 2)
    return _pattern(width, height, colour, accent, (x // cell + y // cell) % 2 == 1)


FILLS: dict[str, FillFn] = {"solid": _solid, "striped": _striped, "checkered": _checkered}
BASE_FILLS: tuple[str, ...] = ("solid",)
HELD_OUT_FILLS: tuple[str, ...] = ("striped", "checkered")
#: Pattern period as a fraction of the picture's short side (1/8: one latent cell of a 64 px image).
PATTERN_PERIOD = 0.125


def _mix(colour: RGB, toward: RGB, share: float) -> RGB:
    return tuple(int(round((1 - share) * c + share * t)) for c, t in zip(colour, toward))  # type: ignore[return-value]


@dataclass(frozen=True)
class ObjectLook:
    """A style applied to every object (not the background): each object's colour is mixed ``mix``
    of the way toward ``tint`` and painted with the pattern ``fill``, its accent the same colour
    times ``accent_shade`` (darker checks of the object's own colour). Captions do not change:
    "a red circle" stays red, only drawn in the look."""

    name: str
    fill: str
    tint: RGB
    mix: float
    accent_shade: float

    def paint(self, colour: RGB) -> tuple[RGB, RGB]:
        """(colour, accent) of an object whose palette colour (after the world's tint) is ``colour``."""
        base = _mix(colour, self.tint, self.mix)
        return base, tuple(int(round(c * self.accent_shade)) for c in base)  # type: ignore[return-value]


#: A held-out style: pastel (40 % toward cream) with darker checks of the object's colour.
EXAMPLE_LOOK = ObjectLook("mypaint", fill="checkered", tint=(255, 240, 210), mix=0.4, accent_shade=0.6)


@dataclass(frozen=True)
class WorldStyle:
    """A global look: every palette colour is mixed ``tint_strength`` of the way toward ``tint``,
    and gaussian grain of std ``noise`` (0-255 units) is added to the finished picture. ``look``
    (optional) is then painted on every object (see :class:`ObjectLook`)."""

    name: str = "base"
    tint: RGB = (0, 0, 0)
    tint_strength: float = 0.0
    noise: float = 0.0
    look: ObjectLook | None = None

    def colour(self, name: str) -> RGB:
        return _mix(COLOURS[name], self.tint, self.tint_strength)


BASE_STYLE = WorldStyle()
#: A warm, grainy variant of the world (same captions): the "shifted world" for a second base.
SHIFTED_STYLE = WorldStyle(name="warm-grain", tint=(255, 190, 110), tint_strength=0.25, noise=6.0)


@dataclass(frozen=True)
class SceneObject:
    """One object. ``fill`` other than "solid" paints ``colour`` and ``accent`` in a pattern.
    ``scale`` multiplies the radius; ``offset`` moves the centre by fractions of the size.
    ``name``: a :class:`Character`'s name, which the caption then uses instead of a description."""

    shape: str
    colour: str
    place: str
    fill: str = "solid"
    accent: str = "white"
    scale: float = 1.0
    offset: tuple[float, float] = (0.0, 0.0)
    name: str | None = None


@dataclass(frozen=True)
class Scene:
    """A background colour and the objects on it (one or two)."""

    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Character:
    """A named look for a held-out concept: "mychar" = an orange and purple striped star."""

    name: str
    shape: str
    fill: str
    colour: str
    accent: str

    def at(self, place: str, scale: float = 1.0, offset: tuple[float, float] = (0.0, 0.0)) -> SceneObject:
        return SceneObject(self.shape, self.colour, place, self.fill, self.accent, scale, offset, self.name)


#: An example character built only from held-out parts (the base model knows neither).
EXAMPLE_CHARACTER = Character("mychar", shape="star", fill="striped", colour="orange", accent="purple")


class WorldItem(NamedTuple):
    image: Image.Image
    caption: str
    scene: Scene


def article(word: str) -> str:
    """"a" or "an" before ``word``."""
    return "an" if word[0] in "aeiou" else "a"


def object_words(obj: SceneObject) -> str:
    """``"red circle"``, ``"orange and purple striped star"``, or the character's name."""
    if obj.name:
        return obj.name
    if obj.fill == "solid":
        return f"{obj.colour} {obj.shape}"
    return f"{obj.colour} and {obj.accent} {obj.fill} {obj.shape}"


def _with_article(obj: SceneObject) -> str:
    words = object_words(obj)
    return words if obj.name else f"{article(words)} {words}"


def background_words(colour: str) -> str:
    """``"on a blue background"``."""
    return f"on {article(colour)} {colour} background"


def caption(scene: Scene) -> str:
    """The plain-words caption of ``scene`` (see the module docstring for the forms)."""
    bg = background_words(scene.background)
    objs = scene.objects
    if len(objs) == 1:
        return f"{_with_article(objs[0])} {bg}, {objs[0].place}"
    if len(objs) != 2:
        raise ConfigError(f"a scene has one or two objects, got {len(objs)}")
    a, b = objs
    if not a.name and object_words(a) == object_words(b):
        return f"two {object_words(a)}s, {a.place} and {b.place}, {bg}"
    return f"{_with_article(a)}, {a.place}, and {_with_article(b)}, {b.place}, {bg}"


def render(scene: Scene, width: int = 64, height: int = 64, style: WorldStyle = BASE_STYLE,
           noise_seed: int = 0) -> Image.Image:
    """The RGB picture of ``scene``, ``width`` x ``height``. Deterministic (the grain, when the
    style has any, comes from ``noise_seed``)."""
    for o in scene.objects:
        if o.shape not in SHAPES or o.fill not in FILLS or (style.look and style.look.fill not in FILLS):
            raise ConfigError(f"unknown shape {o.shape!r} or fill {o.fill!r} (known: {', '.join(SHAPES)}; "
                              f"{', '.join(FILLS)})")
    ss = SUPERSAMPLE
    w, h = width * ss, height * ss
    canvas = Image.new("RGB", (w, h), style.colour(scene.background))
    short = min(w, h)
    period = max(2, int(round(PATTERN_PERIOD * short)))
    for o in scene.objects:
        mask = Image.new("L", (w, h), 0)
        cx = (PLACES[o.place][0] + o.offset[0]) * w
        cy = (PLACES[o.place][1] + o.offset[1]) * h
        SHAPES[o.shape](ImageDraw.Draw(mask), cx, cy, RADIUS * short * o.scale)
        if style.look is None:
            paint = FILLS[o.fill](w, h, style.colour(o.colour), style.colour(o.accent), period)
        else:
            paint = FILLS[style.look.fill](w, h, *style.look.paint(style.colour(o.colour)), period)
        canvas.paste(paint, (0, 0), mask)
    image = canvas.resize((width, height), Image.BOX)
    if style.noise > 0:
        grain = np.random.RandomState(noise_seed % 2**32).normal(0.0, style.noise, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
    return image


@dataclass(frozen=True)
class WorldSpec:
    """Which part of the world to draw from: the shapes, fills and colours allowed, how often a
    scene has two objects (and how often those two look the same), and the position jitter."""

    shapes: tuple[str, ...] = BASE_SHAPES
    fills: tuple[str, ...] = BASE_FILLS
    colours: tuple[str, ...] = tuple(COLOURS)
    two_objects: float = 0.3
    same_pair: float = 0.5
    jitter: float = 0.04

    def __post_init__(self) -> None:
        unknown = [s for s in self.shapes if s not in SHAPES] + [f for f in self.fills if f not in FILLS]
        if unknown or not self.shapes or not self.fills or len(self.colours) < 3:
            raise ConfigError(f"world spec: unknown or too few shapes/fills/colours ({unknown or 'empty'}); "
                              "needs >= 1 shape, >= 1 fill, >= 3 colours")


BASE_WORLD = WorldSpec()
#: Every shape and fill: what a general-purpose image codec (the VAE) must reproduce.
FULL_WORLD = WorldSpec(shapes=tuple(SHAPES), fills=tuple(FILLS))


def _object(rng: random.Random, spec: WorldSpec, place: str, scale: float, taken: Sequence[str]) -> SceneObject:
    colour = rng.choice([c for c in spec.colours if c not in taken])
    fill = rng.choice(spec.fills)
    accent = rng.choice([c for c in spec.colours if c not in (*taken, colour)])
    j = spec.jitter
    return SceneObject(rng.choice(spec.shapes), colour, place, fill, accent if fill != "solid" else "white",
                       scale * rng.uniform(0.85, 1.15), (rng.uniform(-j, j), rng.uniform(-j, j)))


def sample_scene(rng: random.Random, spec: WorldSpec = BASE_WORLD, objects: int | None = None) -> Scene:
    """A random scene of ``spec`` (``objects``: force 1 or 2, else drawn with ``spec.two_objects``)."""
    background = rng.choice(spec.colours)
    count = objects if objects is not None else (2 if rng.random() < spec.two_objects else 1)
    if count == 1:
        return Scene(background, (_object(rng, spec, rng.choice(list(PLACES)), 1.0, [background]),))
    first_place, second_place = rng.sample(CORNERS, 2)
    first = _object(rng, spec, first_place, 0.8, [background])
    if rng.random() < spec.same_pair:
        j = spec.jitter
        second = SceneObject(first.shape, first.colour, second_place, first.fill, first.accent,
                             0.8 * rng.uniform(0.85, 1.15), (rng.uniform(-j, j), rng.uniform(-j, j)))
    else:
        second = _object(rng, spec, second_place, 0.8, [background])
    return Scene(background, (first, second))


def world_item(seed: int, index: int, spec: WorldSpec = BASE_WORLD, style: WorldStyle = BASE_STYLE,
               size: int = 64) -> WorldItem:
    """Picture number ``index`` of the world with ``seed``: the same arguments give the same bytes."""
    rng = random.Random(f"pivotal-world:{seed}:{index}")
    scene = sample_scene(rng, spec)
    return WorldItem(render(scene, size, size, style, noise_seed=rng.getrandbits(32)), caption(scene), scene)
