"""The grid as one labelled PNG (column titles on top, prompts down the left) plus a JSON record of
what each cell was: its prompt with the tag, seed, infotext and where it sits on the sheet."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

from pivotal.formats.png import write_json, write_png
from pivotal.inference.grid import COLUMNS, MIN_CELL, GridResult

#: label sizes in pixels, before the cells' own size
HEADER_H = 36
ROW_LABEL_W = 200
PAD = 4
TEXT = (20, 20, 20)
BACKGROUND = (255, 255, 255)


def _font() -> Any:
    from PIL import ImageFont

    return ImageFont.load_default()


def _lines(text: str, width_px: int) -> list[str]:
    # The default bitmap font is ~6 px per character.
    return textwrap.wrap(text, max(8, width_px // 6)) or [""]


def compose_grid(result: GridResult) -> tuple[Any, dict[tuple[int, str], tuple[int, int, int, int]]]:
    """(sheet image, {(row, column): (x, y, w, h) of the cell on the sheet}).

    Cells keep their pixels; small ones are enlarged by a whole factor (nearest neighbour) so the
    labels fit, and the boxes say where each cell landed.
    """
    from PIL import Image, ImageDraw

    plan = result.plan
    sizes = [im.size for im in result.images.values()] or [(MIN_CELL, MIN_CELL)]
    cw, ch = max(w for w, _ in sizes), max(h for _, h in sizes)
    factor = max(1, -(-MIN_CELL // max(1, min(cw, ch))))
    cw, ch = cw * factor, ch * factor
    n_rows, n_cols = len(plan.rows), len(plan.columns)
    sheet = Image.new("RGB", (ROW_LABEL_W + n_cols * (cw + PAD) + PAD, HEADER_H + n_rows * (ch + PAD) + PAD),
                      BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for c, column in enumerate(plan.columns):
        x = ROW_LABEL_W + PAD + c * (cw + PAD)
        title = COLUMNS[column] + (" *" if column in plan.notes else "")
        for i, line in enumerate(_lines(title, cw)[:3]):
            draw.text((x, 4 + 11 * i), line, fill=TEXT, font=font)
    boxes: dict[tuple[int, str], tuple[int, int, int, int]] = {}
    for r, prompt in enumerate(plan.rows):
        y = HEADER_H + PAD + r * (ch + PAD)
        label = plan.row_labels[r] if plan.row_labels else f"{prompt}  (seed {plan.seeds[r]})"
        for i, line in enumerate(_lines(label, ROW_LABEL_W - 2 * PAD)[: max(1, ch // 11)]):
            draw.text((PAD, y + 11 * i), line, fill=TEXT, font=font)
        for c, column in enumerate(plan.columns):
            image = result.images.get((r, column))
            if image is None:
                continue
            x = ROW_LABEL_W + PAD + c * (cw + PAD)
            w, h = image.size[0] * factor, image.size[1] * factor
            cell = image.convert("RGB")
            if factor > 1:
                cell = cell.resize((w, h), Image.Resampling.NEAREST)
            sheet.paste(cell, (x, y))
            boxes[(r, column)] = (x, y, w, h)
    return sheet, boxes


def grid_record(result: GridResult, boxes: dict[tuple[int, str], tuple[int, int, int, int]]) -> dict[str, Any]:
    """The JSON-able record of the grid and each cell."""
    plan = result.plan
    cells = []
    for cell in plan.cells():
        key = (cell.row, cell.column)
        if key not in result.images:
            continue
        x, y, w, h = boxes[key]
        cells.append({"row": cell.row, "column": cell.column, "column_title": COLUMNS[cell.column],
                      "bundle": plan.bundle_of(cell.row),
                      "prompt": cell.prompt, "negative": cell.negative, "seed": cell.seed,
                      "box": {"x": x, "y": y, "width": w, "height": h},
                      "size": list(result.images[key].size), "infotext": result.infotexts.get(key, "")})
    return {"bundle": plan.bundle, "rows": plan.rows, "columns": plan.columns, "seeds": plan.seeds,
            "strength": plan.strength, "negative": plan.negative, "notes": plan.notes,
            "row_bundles": plan.row_bundles, "row_labels": plan.row_labels,
            "complete": len(cells) == len(plan.rows) * len(plan.columns), "cells": cells}


def grid_infotext(result: GridResult) -> str:
    """The sheet's "parameters" text: what the grid compares, then the first cell's settings line."""
    plan = result.plan
    first = next(iter(result.infotexts.values()), "")
    settings = first.splitlines()[-1] if first else ""
    head = (f"Pivotal ablation grid of <lora:{plan.bundle}>: columns {', '.join(plan.columns)}; "
            f"rows {len(plan.rows)}; seeds {', '.join(map(str, plan.seeds))}")
    if plan.row_bundles:
        head = (f"Pivotal sweep grid: rows {', '.join(plan.row_bundles)}; columns {', '.join(plan.columns)}; "
                f"prompt {plan.rows[0] if plan.rows else ''!r}; seed {plan.seeds[0] if plan.seeds else 0}")
    return "\n".join(x for x in (head, settings) if x)


def save_grid(path: str | os.PathLike, result: GridResult) -> tuple[Path, Path]:
    """Write the sheet to ``path`` (PNG, infotext inside) and its record beside it (``.json``);
    both atomically. Returns the two paths."""
    target = Path(path)
    sheet, boxes = compose_grid(result)
    record = grid_record(result, boxes)
    json_path = target.with_suffix(".json")
    write_json(json_path, record)
    write_png(target, sheet, grid_infotext(result))
    return target, json_path
