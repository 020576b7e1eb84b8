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


def xyz_script_info(webui: Webui) -> dict[str, Any]:
    """The txt2img X/Y/Z plot's entry of ``/sdapi/v1/script-info`` (its arguments, labels, defaults)."""
    for script in webui.request("GET", "/sdapi/v1/script-info"):
        if script["name"] == XYZ_SCRIPT and not script["is_img2img"]:
            return script
    raise AssertionError("the webui's txt2img has no X/Y/Z plot script")


def axis_index(info: dict[str, Any], label: str) -> int:
    """The index of the axis ``label`` among the X/Y/Z plot's axes (its "X type" dropdown's choices)."""
    choices = next(a["choices"] for a in info["args"] if a["label"] == "X type")
    if label not in choices:
        raise AssertionError(f"the X/Y/Z plot has no axis {label!r}; it has {choices}")
    return choices.index(label)


def xyz_script_args(info: dict[str, Any], x: tuple[str, Sequence[Any]],
                    y: Optional[tuple[str, Sequence[Any]]] = None) -> list[Any]:
    """The X/Y/Z plot's ``script_args``: its UI defaults, each argument found by its label (A1111
    and Forge have 18, reForge 21 in another order), with the axes set, the sub-images included."""
    labels = [a["label"] for a in info["args"]]
    args = [a["value"] for a in info["args"]]

    def put(label: str, value: Any, occurrence: int = 0) -> None:
        places = [i for i, name in enumerate(labels) if name == label]
        if len(places) <= occurrence:
            raise AssertionError(f"the X/Y/Z plot has no argument {label!r} (#{occurrence + 1}): {labels}")
        args[places[occurrence]] = value

    for axis, spec in (("X", x), ("Y", y), ("Z", None)):
        label, values = spec if spec is not None else (NOTHING, [])
        put(f"{axis} type", axis_index(info, label))
        # both forms: the text list (axes without choices) and the dropdown list (axes with choices)
        put(f"{axis} values", ", ".join(str(v) for v in values))
        put(f"{axis} values", [str(v) for v in values], occurrence=1)
    for label, value in (("Draw legend", True), ("Include Sub Images", True), ("Include Sub Grids", False),
                         ("Keep -1 for seeds", False), ("Use text inputs instead of dropdowns", False)):
        put(label, value)
    return args


def xyz_txt2img(webui: Webui, body: dict[str, Any], x: tuple[str, Sequence[Any]],
                y: Optional[tuple[str, Sequence[Any]]] = None) -> tuple[bytes, list[XyzCell]]:
    """``POST /sdapi/v1/txt2img`` with the X/Y/Z plot on axes x (and y), each ``(label, values)``;
    returns (the grid PNG, the per-cell pictures with "Include Sub Images")."""
    script_args = xyz_script_args(xyz_script_info(webui), x, y)
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
