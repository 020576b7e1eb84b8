"""Helpers of the real-webui tests that read grids back: the X/Y/Z plot script over the webui's API
(its axes found by label in ``/sdapi/v1/script-info``, never by a hard-coded index) and the cells of
a Pivotal grid sheet."""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from webui_server import Webui

XYZ_SCRIPT = "x/y/z plot"
NOTHING = "Nothing"


@dataclass
class XyzCell:
    """One picture the X/Y/Z plot rendered: the axis values of its place in the grid (the webui
    returns the sub-images x fastest), its prompt and seed (from its infotext) and its pixels."""

    x: str
    y: str
    prompt: str
    seed: int
    png: bytes
    infotext: str

    def image(self) -> Any:
        from PIL import Image

        return Image.open(io.BytesIO(self.png)).convert("RGB")


def axis_index(webui: Webui, label: str) -> int:
    """The txt2img X/Y/Z plot's index of the axis ``label`` (its "X type" dropdown's choices)."""
    for script in webui.request("GET", "/sdapi/v1/script-info"):
        if script["name"] == XYZ_SCRIPT and not script["is_img2img"]:
            choices = next(a["choices"] for a in script["args"] if a["label"] == "X type")
            if label not in choices:
                raise AssertionError(f"the X/Y/Z plot has no axis {label!r}; it has {choices}")
            return choices.index(label)
    raise AssertionError("the webui's txt2img has no X/Y/Z plot script")


def xyz_txt2img(webui: Webui, body: dict[str, Any], x: tuple[str, Sequence[Any]],
                y: Optional[tuple[str, Sequence[Any]]] = None) -> tuple[bytes, list[XyzCell]]:
    """``POST /sdapi/v1/txt2img`` with the X/Y/Z plot on axes x (and y), each ``(label, values)``;
    returns (the grid PNG, the per-cell pictures with "Include Sub Images")."""
    def axis(spec: Optional[tuple[str, Sequence[Any]]]) -> list[Any]:
        if spec is None:
            return [axis_index(webui, NOTHING), "", []]
        label, values = spec
        # both forms: a text list (axes without choices) and the dropdown list (axes with choices)
        return [axis_index(webui, label), ", ".join(str(v) for v in values), [str(v) for v in values]]

    script_args = [*axis(x), *axis(y), *axis(None),
                   True,    # draw legend
                   True,    # include sub images: the cells come back one by one after the grid
                   False,   # include sub grids
                   False,   # keep -1 for seeds
                   False, False, False,  # vary seeds for x / y / z
                   0,       # margins
                   False]   # csv mode: dropdown values for axes with choices
    out = webui.request("POST", "/sdapi/v1/txt2img", {**body, "script_name": XYZ_SCRIPT,
                                                      "script_args": script_args}, timeout=1800)
    infotexts = json.loads(out["info"])["infotexts"]
    pngs = [base64.b64decode(i) for i in out["images"]]
    xs = [str(v) for v in x[1]]
    ys = [str(v) for v in y[1]] if y is not None else [""]
    assert len(pngs) == 1 + len(xs) * len(ys), f"{len(pngs)} images for a {len(xs)} x {len(ys)} plot"
    cells = [XyzCell(xs[i % len(xs)], ys[i // len(xs)], info.split("\n", 1)[0],
                     int(re.search(r"Seed: (\d+)", info).group(1)), png, info)
             for i, (png, info) in enumerate(zip(pngs[1:], infotexts[1:]))]
    return pngs[0], cells


def sheet_cell(sheet: Any, cell: dict) -> Any:
    """A Pivotal grid cell's pixels back at the size the webui rendered (the sheet enlarges small
    cells by a whole factor, nearest neighbour)."""
    from PIL import Image

    box = cell["box"]
    crop = sheet.convert("RGB").crop((box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"]))
    return crop.resize(tuple(cell["size"]), Image.Resampling.NEAREST).convert("RGB")
