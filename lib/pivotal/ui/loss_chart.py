"""The loss chart, drawn with Pillow.

A plain image looks the same in every gradio version; gradio's plot components depend on
pandas/altair versions that differ between the webui's pins and current libraries.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 58, 14, 26, 30
RAW_COLOUR = (176, 190, 214)        # single-step losses: light, they are mostly timestep noise
SMOOTH_COLOUR = (33, 87, 196)       # the trend a user should read
VALIDATION_COLOUR = (214, 96, 32)   # held-out loss: the number that says whether it generalises
DRIFT_COLOUR = (46, 150, 84)        # drift in %: on its own scale (the legend gives its range)
GRID_COLOUR = (226, 230, 236)
TEXT_COLOUR = (60, 64, 72)
#: points drawn per series at most (a long run is thinned to about one point per pixel)
MAX_POINTS = WIDTH - MARGIN_L - MARGIN_R


def render_loss_chart(losses: Sequence[float], smoothed: Sequence[float], total_steps: int = 0,
                      first_step: int = 1, title: str = "loss",
                      validation: Sequence[Sequence[float]] = (),
                      drift: Sequence[Sequence[float]] = ()) -> Image.Image:
    """Raw and smoothed loss against the step number, as an RGB image.

    ``first_step``: the step of ``losses[0]`` (a resumed run starts part-way). ``total_steps``
    fixes the x axis to the whole run so the line grows from left to right. ``validation``:
    (step, held-out validation loss) pairs, drawn as a marked line on the same axes. ``drift``:
    (step, drift in %) pairs, a marked line on a scale of its own (its range is in the legend).
    """
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    raw = [float(v) for v in losses if _finite(v)]
    smooth = [float(v) for v in smoothed if _finite(v)]
    val = [(int(s), float(v)) for s, v in validation if _finite(v) and int(s) >= first_step]
    draw.text((MARGIN_L, 6), title, fill=TEXT_COLOUR, font=font)
    if not raw and not smooth:
        draw.text((WIDTH // 2 - 60, HEIGHT // 2), "no steps yet", fill=TEXT_COLOUR, font=font)
        return img
    last_step = first_step + max(len(raw), len(smooth)) - 1
    x_max = max(total_steps, last_step, first_step + 1)
    lo, hi = _y_range(raw + smooth + [v for _, v in val])
    plot = (MARGIN_L, MARGIN_T, WIDTH - MARGIN_R, HEIGHT - MARGIN_B)
    _grid(draw, font, plot, lo, hi, first_step, x_max)

    def xy(i: int, v: float) -> tuple[float, float]:
        step = first_step + i
        x = plot[0] + (plot[2] - plot[0]) * (step - first_step) / max(1, x_max - first_step)
        y = plot[3] - (plot[3] - plot[1]) * (v - lo) / (hi - lo)
        return x, y

    for series, colour, width in ((raw, RAW_COLOUR, 1), (smooth, SMOOTH_COLOUR, 2)):
        pts = [xy(i, v) for i, v in _thin(series)]
        if len(pts) == 1:
            x, y = pts[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        elif pts:
            draw.line(pts, fill=colour, width=width)
    val_pts = [xy(s - first_step, v) for s, v in val]
    if len(val_pts) > 1:
        draw.line(val_pts, fill=VALIDATION_COLOUR, width=2)
    for x, y in val_pts:
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=VALIDATION_COLOUR)
    drift_pts = [(int(st), float(v)) for st, v in drift if _finite(v) and int(st) >= first_step]
    if drift_pts:
        d_lo, d_hi = _y_range([v for _, v in drift_pts])
        pts = [(xy(st - first_step, lo)[0], plot[3] - (plot[3] - plot[1]) * (v - d_lo) / (d_hi - d_lo))
               for st, v in drift_pts]
        if len(pts) > 1:
            draw.line(pts, fill=DRIFT_COLOUR, width=2)
        for x, y in pts:
            draw.rectangle((x - 2, y - 2, x + 2, y + 2), fill=DRIFT_COLOUR)
        lo_v, hi_v = min(v for _, v in drift_pts), max(v for _, v in drift_pts)
        draw.line((MARGIN_L + 290, 12, MARGIN_L + 306, 12), fill=DRIFT_COLOUR, width=2)
        draw.text((MARGIN_L + 310, 6), f"drift % ({lo_v:+.2f} .. {hi_v:+.2f})", fill=TEXT_COLOUR, font=font)
    # legend beside the title, on the left: gradio puts its image buttons over the top right corner
    legend_x = MARGIN_L + 50
    draw.line((legend_x, 12, legend_x + 16, 12), fill=RAW_COLOUR, width=2)
    draw.text((legend_x + 20, 6), "step", fill=TEXT_COLOUR, font=font)
    draw.line((legend_x + 60, 12, legend_x + 76, 12), fill=SMOOTH_COLOUR, width=2)
    draw.text((legend_x + 80, 6), "smoothed", fill=TEXT_COLOUR, font=font)
    if val:
        draw.line((legend_x + 150, 12, legend_x + 166, 12), fill=VALIDATION_COLOUR, width=2)
        draw.text((legend_x + 170, 6), "validation", fill=TEXT_COLOUR, font=font)
    return img


def _finite(v: Optional[float]) -> bool:
    return v is not None and math.isfinite(float(v))


def _y_range(values: list[float]) -> tuple[float, float]:
    """Bounds of the y axis with a little headroom; never a zero-height range."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        pad = abs(hi) * 0.1 or 0.1
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.05
    return lo - pad, hi + pad


def _thin(series: list[float]) -> list[tuple[int, float]]:
    """(index, value) pairs, at most MAX_POINTS: each kept point averages its bucket so a long
    run's line keeps its shape instead of aliasing."""
    n = len(series)
    if n <= MAX_POINTS:
        return list(enumerate(series))
    out = []
    for b in range(MAX_POINTS):
        start, end = b * n // MAX_POINTS, (b + 1) * n // MAX_POINTS
        chunk = series[start:end]
        out.append(((start + end - 1) // 2, sum(chunk) / len(chunk)))
    return out


def _grid(draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, plot: tuple[int, int, int, int],
          lo: float, hi: float, first_step: int, x_max: int) -> None:
    left, top, right, bottom = plot
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = bottom - (bottom - top) * k / 4
        draw.line((left, y, right, y), fill=GRID_COLOUR)
        draw.text((4, y - 6), f"{v:.3g}", fill=TEXT_COLOUR, font=font)
    for k in range(5):
        step = round(first_step + (x_max - first_step) * k / 4)
        x = left + (right - left) * k / 4
        draw.line((x, top, x, bottom), fill=GRID_COLOUR)
        label = str(step)
        # the last label ends at the plot's edge instead of running off the image
        shift = draw.textlength(label, font=font) if k == 4 else draw.textlength(label, font=font) / 2
        draw.text((x - shift, bottom + 6), label, fill=TEXT_COLOUR, font=font)
    draw.rectangle((left, top, right, bottom), outline=(190, 196, 204))
