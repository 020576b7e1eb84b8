"""Read a one-object picture of the procedural world back into words: background colour, object
colour, place and shape. An automatic judge of whether a generated image shows what its prompt
asked for (see :mod:`pivotal.demo.pretrain.check`), deliberately simple so it can be trusted:

* background: the median colour of the picture's outer ring of pixels (objects touch little of it);
* object: the pixels far (in RGB) from that colour; its colour is their median, its place the
  palette position nearest to their centre of mass;
* shape: how much of the object's bounding box it fills (circle ~0.79, square 1, triangle 0.5),
  the object's outline taken halfway between the background and the object colour: a fixed
  distance would grow a soft-edged (decoded) shape by a margin that depends on its contrast with
  the background, which rounds squares and fills triangles out (a render blurred by 1 px read
  80 % of shapes right that way, 92 % this way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from pivotal.demo.world import BASE_SHAPES, BASE_STYLE, COLOURS, PLACES, WorldStyle

#: RGB distance beyond which a pixel is "not background". Palette colours are >= 70 apart.
OBJECT_DISTANCE = 45.0
#: Less object than this fraction of the picture: no object read.
MIN_COVERAGE = 0.01
#: Bounding-box fill of each base shape, as :func:`pivotal.demo.world.render` draws them.
BOX_FILL: dict[str, float] = {"circle": 0.785, "square": 1.0, "triangle": 0.5}


@dataclass(frozen=True)
class Reading:
    """What a picture shows. ``colour`` / ``place`` / ``shape`` are None when no object was found;
    ``coverage`` is the object's share of the picture."""

    background: str
    colour: str | None
    place: str | None
    shape: str | None
    coverage: float


def nearest_colour(rgb: Sequence[float], exclude: Sequence[str] = (), style: WorldStyle = BASE_STYLE) -> str:
    """The palette colour (as ``style`` draws it) nearest to ``rgb``, skipping ``exclude``."""
    best, best_d = "", float("inf")
    for name in COLOURS:
        if name in exclude:
            continue
        d = float(np.linalg.norm(np.asarray(style.colour(name), dtype=np.float64) - np.asarray(rgb, dtype=np.float64)))
        if d < best_d:
            best, best_d = name, d
    return best


def read_picture(image: Image.Image, style: WorldStyle = BASE_STYLE, shapes: Sequence[str] = BASE_SHAPES) -> Reading:
    """Read a one-object picture (any size). ``shapes``: the shapes to choose between."""
    px = np.asarray(image.convert("RGB"), dtype=np.float64)  # (H, W, 3)
    h, w, _ = px.shape
    ring = max(1, min(h, w) // 20)
    border = np.concatenate([px[:ring].reshape(-1, 3), px[-ring:].reshape(-1, 3),
                             px[:, :ring].reshape(-1, 3), px[:, -ring:].reshape(-1, 3)])
    bg_rgb = np.median(border, axis=0)
    background = nearest_colour(bg_rgb, style=style)
    mask = np.linalg.norm(px - bg_rgb, axis=-1) > OBJECT_DISTANCE
    coverage = float(mask.mean())
    if coverage < MIN_COVERAGE:
        return Reading(background, None, None, None, coverage)
    object_rgb = np.median(px[mask], axis=0)
    colour = nearest_colour(object_rgb, exclude=[background], style=style)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    place = min(PLACES, key=lambda p: (PLACES[p][0] - cx) ** 2 + (PLACES[p][1] - cy) ** 2)
    return Reading(background, colour, place, _shape(px, bg_rgb, object_rgb, mask, shapes), coverage)


def _shape(px: np.ndarray, bg_rgb: np.ndarray, object_rgb: np.ndarray, mask: np.ndarray,
           shapes: Sequence[str]) -> str | None:
    """The shape whose bounding-box fill is nearest to the object's: pixels (H, W, 3), ``mask``
    (H, W) the pixels far from the background; the outline is redrawn halfway to the object colour."""
    half = 0.5 * float(np.linalg.norm(object_rgb - bg_rgb))
    if half > OBJECT_DISTANCE:
        outline = np.linalg.norm(px - bg_rgb, axis=-1) > half
        if outline.sum() >= 4:
            mask = outline
    ys, xs = np.nonzero(mask)
    # Robust bounding box: a few stray pixels must not stretch it.
    x0, x1 = np.percentile(xs, [1, 99])
    y0, y1 = np.percentile(ys, [1, 99])
    box = max(1.0, (x1 - x0 + 1) * (y1 - y0 + 1))
    inside = mask[int(y0):int(y1) + 1, int(x0):int(x1) + 1].sum()
    fill = float(inside) / box
    known = [s for s in shapes if s in BOX_FILL]
    return min(known, key=lambda s: abs(BOX_FILL[s] - fill)) if known else None
